// The gRPC-bytes data plane: block bytes in the messages, staged before the copy into slots.
#include "absl/strings/str_cat.h"
#include "client/data_plane.h"

namespace kvstar::client_internal {

absl::Status CheckBlockBytes(const v1::Block& block, uint64_t key_bytes) {
  if (block.key().size() != key_bytes || block.value().size() != key_bytes) {
    return absl::DataLossError(absl::StrCat("block ", block.block_index(), " of layer ",
                                            block.layer(), ": K/V of ", block.key().size(), "/",
                                            block.value().size(), " bytes, expected ", key_bytes));
  }
  return absl::OkStatus();
}

namespace {

class GrpcBytesPlane : public BlockDataPlane {
 public:
  DataPlane kind() const override { return DataPlane::kGrpcBytes; }
  const std::string& segment_name() const override { return no_segment_; }
  bool Readable(const v1::Block& block) const override { return !block.has_shared(); }
  absl::StatusOr<const char*> Locate(const v1::Block& block, uint64_t key_bytes) const override {
    if (block.has_shared()) {
      return absl::DataLossError(absl::StrCat("block ", block.block_index(), " of layer ",
                                              block.layer(),
                                              " came as a shared-memory region, but no segment is "
                                              "mapped (gRPC-bytes data plane)"));
    }
    if (absl::Status status = CheckBlockBytes(block, key_bytes); !status.ok()) return status;
    return nullptr;
  }

 private:
  const std::string no_segment_;
};

}  // namespace

std::shared_ptr<const BlockDataPlane> GrpcBytesDataPlane() {
  static const std::shared_ptr<const BlockDataPlane>* const plane =
      new std::shared_ptr<const BlockDataPlane>(std::make_shared<GrpcBytesPlane>());
  return *plane;
}

}  // namespace kvstar::client_internal
