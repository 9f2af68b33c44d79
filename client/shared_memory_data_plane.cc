// The shared-memory data plane: blocks as regions of this tenant's segment (received from the
// server), copied from there straight into slots; blocks that did not fit it come as bytes. A
// region of any other segment (another tenant's, or a restarted server's) is never read.
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/data_plane.h"

namespace kvstar::client_internal {
namespace {

class SharedMemoryPlane : public BlockDataPlane {
 public:
  explicit SharedMemoryPlane(std::unique_ptr<SharedSegment> segment)
      : segment_(std::move(segment)) {}

  DataPlane kind() const override { return DataPlane::kSharedMemory; }
  const std::string& segment_name() const override { return segment_->name(); }
  bool Readable(const v1::Block& block) const override {
    return !block.has_shared() || block.shared().segment() == segment_->name();
  }
  absl::StatusOr<const char*> Locate(const v1::Block& block, uint64_t key_bytes) const override {
    if (!block.has_shared()) {
      if (absl::Status status = CheckBlockBytes(block, key_bytes); !status.ok()) return status;
      return nullptr;
    }
    const v1::SharedMemoryRef& region = block.shared();
    const char* source = region.length() == key_bytes && Readable(block)
                             ? segment_->Region(region.offset(), key_bytes)
                             : nullptr;
    if (source == nullptr) {
      return absl::DataLossError(absl::StrCat(
          "block ", block.block_index(), " of layer ", block.layer(), ": shared region of segment ",
          region.segment(), " at offset ", region.offset(), " of ", region.length(),
          " bytes per K/V (expected ", key_bytes, ") does not fit segment ", segment_->name(),
          " of ", segment_->size(), " bytes"));
    }
    return source;
  }

 private:
  const std::unique_ptr<SharedSegment> segment_;
};

}  // namespace

std::shared_ptr<const BlockDataPlane> MakeSharedMemoryDataPlane(
    std::unique_ptr<SharedSegment> segment) {
  return std::make_shared<SharedMemoryPlane>(std::move(segment));
}

}  // namespace kvstar::client_internal
