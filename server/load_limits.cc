#include "server/load_limits.h"

#include <cassert>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvstar::server {

LoadLimits::LoadLimits(LoadLimitsOptions options, std::function<void(bool)> on_serving_change)
    : options_(options), on_serving_change_(std::move(on_serving_change)) {}

absl::Status LoadLimits::OpenStream(absl::string_view tenant) {
  absl::MutexLock lock(&mu_);
  if (total_.open_streams >= options_.max_open_streams) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "open streams limit reached: ", total_.open_streams,
        " streams are open on this node (--max_open_streams=", options_.max_open_streams, ")"));
  }
  Usage& usage = tenants_[tenant];
  if (usage.open_streams >= options_.max_open_streams_per_tenant) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "open streams limit of tenant ", tenant, " reached: ", usage.open_streams,
        " streams are open (--max_open_streams_per_tenant=", options_.max_open_streams_per_tenant,
        ")"));
  }
  ++usage.open_streams;
  ++total_.open_streams;
  NotifyLocked();
  return absl::OkStatus();
}

void LoadLimits::CloseStream(absl::string_view tenant) {
  absl::MutexLock lock(&mu_);
  auto it = tenants_.find(tenant);
  assert(it != tenants_.end() && it->second.open_streams > 0);
  --it->second.open_streams;
  --total_.open_streams;
  TrimLocked(tenant);
  NotifyLocked();
}

absl::Status LoadLimits::ReservePutBytes(absl::string_view tenant, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (total_.inflight_put_bytes + bytes > options_.max_inflight_put_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("in-flight put bytes limit reached: ", total_.inflight_put_bytes,
                     " bytes of PutBlocks messages wait to be stored and this message adds ", bytes,
                     " (--max_inflight_put_bytes=", options_.max_inflight_put_bytes, ")"));
  }
  Usage& usage = tenants_[tenant];
  if (usage.inflight_put_bytes + bytes > options_.max_inflight_put_bytes_per_tenant) {
    const uint64_t held = usage.inflight_put_bytes;
    TrimLocked(tenant);
    return absl::ResourceExhaustedError(absl::StrCat(
        "in-flight put bytes limit of tenant ", tenant, " reached: ", held,
        " bytes of its PutBlocks messages wait to be stored and this message adds ", bytes,
        " (--max_inflight_put_bytes_per_tenant=", options_.max_inflight_put_bytes_per_tenant, ")"));
  }
  usage.inflight_put_bytes += bytes;
  total_.inflight_put_bytes += bytes;
  NotifyLocked();
  return absl::OkStatus();
}

void LoadLimits::ReleasePutBytes(absl::string_view tenant, uint64_t bytes) {
  if (bytes == 0) return;
  absl::MutexLock lock(&mu_);
  auto it = tenants_.find(tenant);
  assert(it != tenants_.end() && it->second.inflight_put_bytes >= bytes);
  it->second.inflight_put_bytes -= bytes;
  total_.inflight_put_bytes -= bytes;
  TrimLocked(tenant);
  NotifyLocked();
}

bool LoadLimits::CanTakeWork() const {
  absl::MutexLock lock(&mu_);
  return CanTakeWorkLocked();
}

uint64_t LoadLimits::open_streams() const {
  absl::MutexLock lock(&mu_);
  return total_.open_streams;
}

uint64_t LoadLimits::inflight_put_bytes() const {
  absl::MutexLock lock(&mu_);
  return total_.inflight_put_bytes;
}

bool LoadLimits::CanTakeWorkLocked() const {
  return total_.open_streams < options_.max_open_streams &&
         total_.inflight_put_bytes < options_.max_inflight_put_bytes;
}

void LoadLimits::NotifyLocked() {
  const bool serving = CanTakeWorkLocked();
  if (serving == serving_) return;
  serving_ = serving;
  if (on_serving_change_) on_serving_change_(serving);
}

void LoadLimits::TrimLocked(absl::string_view tenant) {
  auto it = tenants_.find(tenant);
  if (it != tenants_.end() && it->second.open_streams == 0 && it->second.inflight_put_bytes == 0) {
    tenants_.erase(it);
  }
}

}  // namespace kvstar::server
