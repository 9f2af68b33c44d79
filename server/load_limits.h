// LoadLimits: what a storage node admits at once, per tenant and in total: open streaming calls
// (PutBlocks, Retrieve, GetBlocks) and bytes of PutBlocks messages received but not yet written
// to the store. A call over a limit is refused with RESOURCE_EXHAUSTED naming the limit and its
// flag, instead of growing memory or threads without bound. Reports whether the node can take
// work (no total limit reached), for the health service.
// Thread-safe.
#ifndef KVSTAR_SERVER_LOAD_LIMITS_H_
#define KVSTAR_SERVER_LOAD_LIMITS_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace kvstar::server {

struct LoadLimitsOptions {
  uint64_t max_open_streams = 1024;
  uint64_t max_open_streams_per_tenant = 512;
  uint64_t max_inflight_put_bytes = uint64_t{512} << 20;
  uint64_t max_inflight_put_bytes_per_tenant = uint64_t{256} << 20;
};

class LoadLimits {
 public:
  // `on_serving_change(can_take_work)` is called (under the limits' lock, so calls are ordered)
  // whenever CanTakeWork() changes; it must not call back into LoadLimits.
  explicit LoadLimits(LoadLimitsOptions options,
                      std::function<void(bool)> on_serving_change = nullptr);

  // Admits one more open stream of `tenant`, or RESOURCE_EXHAUSTED naming the limit.
  absl::Status OpenStream(absl::string_view tenant) ABSL_LOCKS_EXCLUDED(mu_);
  // REQUIRES: a matching OpenStream returned OK.
  void CloseStream(absl::string_view tenant) ABSL_LOCKS_EXCLUDED(mu_);

  // Admits `bytes` more in-flight put bytes of `tenant`, or RESOURCE_EXHAUSTED naming the limit.
  absl::Status ReservePutBytes(absl::string_view tenant, uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // REQUIRES: at most what ReservePutBytes admitted for `tenant` and not yet released.
  void ReleasePutBytes(absl::string_view tenant, uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);

  // False while a total limit is reached.
  bool CanTakeWork() const ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t open_streams() const ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t inflight_put_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  const LoadLimitsOptions& options() const { return options_; }

 private:
  struct Usage {
    uint64_t open_streams = 0;
    uint64_t inflight_put_bytes = 0;
  };
  bool CanTakeWorkLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Calls on_serving_change_ if CanTakeWork changed since the last call.
  void NotifyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets a tenant that holds nothing.
  void TrimLocked(absl::string_view tenant) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const LoadLimitsOptions options_;
  const std::function<void(bool)> on_serving_change_;

  mutable absl::Mutex mu_;
  Usage total_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Usage> tenants_ ABSL_GUARDED_BY(mu_);
  bool serving_ ABSL_GUARDED_BY(mu_) = true;
};

}  // namespace kvstar::server

#endif  // KVSTAR_SERVER_LOAD_LIMITS_H_
