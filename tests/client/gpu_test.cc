// The client on the CUDA backend: offload from device memory, Seal, per-step loads into device
// slots (64 KiB slots: one landing copy plus the scatter kernel per layer), the backend's
// scattered copy on every path, and a race test: cudaMemcpy readers on the engine's stream read
// every slot of every table while the next selections load; and the shared-memory data plane
// against the real server (device slots loaded from the registered segment equal those loaded
// from gRPC bytes); two sequences sharing one slot pool in the engine's device memory. Skipped
// without a usable GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/device_backend.h"
#include "client/scatter_plan.h"
#include "gtest/gtest.h"
#include "kvstar/client.h"
#include "tests/client/client_test_util.h"
#include "tests/client/fake_kv_store.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

constexpr uint32_t kStride = 4;
constexpr uint32_t kBlocks = 32;

std::vector<uint32_t> MovingSelection(uint32_t, uint32_t num_blocks, uint64_t step) {
  const uint32_t shift = static_cast<uint32_t>(step / kStride) * 3;
  std::vector<uint32_t> blocks = {0};
  for (uint32_t i = 0; i < 8; ++i) blocks.push_back(1 + (shift + i * 3) % (num_blocks - 3));
  blocks.push_back(num_blocks - 2);
  blocks.push_back(num_blocks - 1);
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  return blocks;
}

#define ASSERT_CUDA(call)                                                                  \
  do {                                                                                     \
    const cudaError_t cuda_error = (call);                                                 \
    ASSERT_EQ(cuda_error, cudaSuccess) << #call << ": " << cudaGetErrorString(cuda_error); \
  } while (0)

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::Status usable = client_internal::CudaUsable(0);
    if (!usable.ok()) GTEST_SKIP() << "no usable GPU: " << usable;
    ASSERT_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    fake_ = std::make_unique<FakeKvStore>();
    fake_->set_selector(MovingSelection);
    ClientOptions options;
    options.address = fake_->address();
    options.backend = BackendKind::kCuda;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    ASSERT_EQ(client_->backend(), BackendKind::kCuda);
    absl::StatusOr<Sequence*> sequence =
        client_->CreateSequence("gpu", SmallProfile(), SmallConfig(kStride), {0, kBlocks + 8});
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    sequence_ = *sequence;
  }
  void TearDown() override {
    client_.reset();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  uint64_t key_bytes() const { return SmallProfile().block_key_bytes(); }

  // Offloads the prompt from device memory (as an engine's prefill leaves it) and seals.
  void OffloadFromDeviceAndSeal() {
    void* device = nullptr;
    ASSERT_CUDA(cudaMalloc(&device, 2 * key_bytes()));
    char* key = static_cast<char*>(device);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t index = 0; index < kBlocks; ++index) {
        const v1::Block block = TestBlock(kSeed, layer, index, key_bytes());
        ASSERT_CUDA(
            cudaMemcpyAsync(key, block.key().data(), key_bytes(), cudaMemcpyHostToDevice, stream_));
        ASSERT_CUDA(cudaMemcpyAsync(key + key_bytes(), block.value().data(), key_bytes(),
                                    cudaMemcpyHostToDevice, stream_));
        ASSERT_TRUE(
            sequence_->Offload(layer, index, key, key + key_bytes(), MemoryKind::kDevice, stream_)
                .ok());
        // The engine reuses its buffer only once the library's copy is ordered before it.
        ASSERT_CUDA(cudaStreamSynchronize(stream_));
      }
    }
    ASSERT_TRUE(sequence_->Flush().ok());
    EXPECT_EQ(fake_->blocks_put(), kLayers * kBlocks);
    const std::string queries = MakeQueries(SmallProfile(), kStride, 1);
    void* device_queries = nullptr;
    ASSERT_CUDA(cudaMalloc(&device_queries, queries.size()));
    ASSERT_CUDA(cudaMemcpy(device_queries, queries.data(), queries.size(), cudaMemcpyHostToDevice));
    absl::Status sealed = sequence_->Seal(device_queries, kStride, MemoryKind::kDevice, stream_);
    ASSERT_TRUE(sealed.ok()) << sealed;
    cudaFree(device_queries);
    cudaFree(device);
  }

  // What one layer's reader saw in one step: the table and the bytes it read from each slot.
  struct Read {
    uint32_t layer;
    std::vector<uint32_t> blocks;
    std::vector<int32_t> host_slots;
    std::vector<int32_t> device_slots;
    std::vector<char> bytes;
  };

  void CheckRead(const Read& read) {
    ASSERT_EQ(read.device_slots, read.host_slots) << "device table differs from host table";
    for (size_t i = 0; i < read.blocks.size(); ++i) {
      const v1::Block expected = TestBlock(kSeed, read.layer, read.blocks[i], key_bytes());
      const char* got = read.bytes.data() + i * 2 * key_bytes();
      ASSERT_EQ(std::memcmp(got, expected.key().data(), key_bytes()), 0)
          << "K of layer " << read.layer << " block " << read.blocks[i] << " overwritten";
      ASSERT_EQ(std::memcmp(got + key_bytes(), expected.value().data(), key_bytes()), 0)
          << "V of layer " << read.layer << " block " << read.blocks[i] << " overwritten";
    }
  }

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<FakeKvStore> fake_;
  std::unique_ptr<Client> client_;
  Sequence* sequence_ = nullptr;
};

TEST_F(GpuTest, SlotsHoldTheSelectedBlocksAndReadersNeverSeeAnOverwrite) {
  OffloadFromDeviceAndSeal();
  std::vector<char> query(SmallProfile().query_bytes(), 0);
  void* device_query = nullptr;
  ASSERT_CUDA(cudaMalloc(&device_query, query.size()));
  ASSERT_CUDA(cudaMemset(device_query, 0, query.size()));
  for (uint32_t step = 0; step < 10 * kStride; ++step) {
    std::vector<Read> reads(kLayers);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      absl::StatusOr<SlotTable> table = sequence_->Acquire(layer, stream_);
      ASSERT_TRUE(table.ok()) << table.status();
      Read& read = reads[layer];
      read.layer = layer;
      read.blocks.assign(table->block_indices, table->block_indices + table->count);
      read.host_slots.assign(table->host_slots, table->host_slots + table->count);
      read.device_slots.resize(table->count);
      read.bytes.resize(table->count * table->slot_bytes);
      // The "attention kernel": copies reading the device table and every slot, on the stream.
      ASSERT_CUDA(cudaMemcpyAsync(read.device_slots.data(), table->device_slots,
                                  table->count * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
      for (uint32_t i = 0; i < table->count; ++i) {
        const char* slot = static_cast<const char*>(table->slot_pool) +
                           uint64_t(table->host_slots[i]) * table->slot_bytes;
        ASSERT_CUDA(cudaMemcpyAsync(read.bytes.data() + i * table->slot_bytes, slot,
                                    table->slot_bytes, cudaMemcpyDeviceToHost, stream_));
      }
      ASSERT_TRUE(sequence_->RecordQuery(layer, device_query, MemoryKind::kDevice, stream_).ok());
      ASSERT_TRUE(sequence_->Release(layer, stream_).ok());
    }
    absl::Status stepped = client_->Step();
    ASSERT_TRUE(stepped.ok()) << stepped;
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    for (const Read& read : reads) CheckRead(read);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const SequenceStats stats = sequence_->stats();
  EXPECT_GE(stats.selections_published, 8u * kLayers);
  EXPECT_GT(stats.blocks_loaded, kLayers * 11u);
  EXPECT_LE(stats.max_staleness_steps, kStride + 1);
  cudaFree(device_query);
}

TEST_F(GpuTest, DecodeBlocksFromDeviceMemoryJoinTheTable) {
  OffloadFromDeviceAndSeal();
  void* device = nullptr;
  ASSERT_CUDA(cudaMalloc(&device, 2 * key_bytes()));
  char* key = static_cast<char*>(device);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const v1::Block block = TestBlock(kSeed, layer, kBlocks, key_bytes());
    ASSERT_CUDA(cudaMemcpy(key, block.key().data(), key_bytes(), cudaMemcpyHostToDevice));
    ASSERT_CUDA(
        cudaMemcpy(key + key_bytes(), block.value().data(), key_bytes(), cudaMemcpyHostToDevice));
    ASSERT_TRUE(
        sequence_->AppendBlock(layer, key, key + key_bytes(), MemoryKind::kDevice, stream_).ok());
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
  }
  ASSERT_TRUE(client_->Step().ok());
  absl::StatusOr<SlotTable> table = sequence_->Acquire(1, stream_);
  ASSERT_TRUE(table.ok());
  ASSERT_EQ(table->block_indices[table->count - 1], kBlocks);
  std::vector<char> bytes(table->slot_bytes);
  const char* slot = static_cast<const char*>(table->slot_pool) +
                     uint64_t(table->host_slots[table->count - 1]) * table->slot_bytes;
  ASSERT_CUDA(cudaMemcpyAsync(bytes.data(), slot, bytes.size(), cudaMemcpyDeviceToHost, stream_));
  ASSERT_TRUE(sequence_->Release(1, stream_).ok());
  ASSERT_CUDA(cudaStreamSynchronize(stream_));
  const v1::Block expected = TestBlock(kSeed, 1, kBlocks, key_bytes());
  EXPECT_EQ(std::memcmp(bytes.data(), expected.key().data(), key_bytes()), 0);
  ASSERT_TRUE(sequence_->Flush().ok());
  EXPECT_TRUE(fake_->has_block(1, kBlocks));
  cudaFree(device);
}

// The backend's scattered copy on every path (landing + scatter kernel, several rounds, direct),
// with awkward sizes and misaligned ends, against memcpy on the host.
TEST(GpuScatterTest, ScatteredCopiesAreBitExactOnEveryPath) {
  absl::Status usable = client_internal::CudaUsable(0);
  if (!usable.ok()) GTEST_SKIP() << "no usable GPU: " << usable;
  using client_internal::CopySegment;
  using client_internal::ScatterPlanOptions;
  std::vector<ScatterPlanOptions> paths(4);
  paths[1].direct_min_bytes = SIZE_MAX;      // everything through the landing buffer
  paths[2].landing_capacity_bytes = 300000;  // many rounds, blocks split across them
  paths[2].direct_min_bytes = SIZE_MAX;
  paths[3].direct_min_bytes = 0;  // everything direct
  std::mt19937 random(3);
  const std::vector<size_t> sizes = {64 << 10, 64 << 10, 17,   1,         100000,   128 << 10,
                                     2 << 20,  64 << 10, 4099, 256 << 10, 64 << 10, 512 << 10};
  size_t total = 0;
  for (size_t size : sizes) total += size;
  for (const ScatterPlanOptions& options : paths) {
    std::unique_ptr<client_internal::DeviceBackend> backend =
        client_internal::MakeCudaBackend(0, options);
    absl::StatusOr<void*> pinned = backend->AllocPinned(total + 64);
    absl::StatusOr<void*> device = backend->AllocDevice(2 * total + 4096);
    absl::StatusOr<client_internal::StreamHandle> stream = backend->CreateStream();
    ASSERT_TRUE(pinned.ok() && device.ok() && stream.ok());
    char* source = static_cast<char*>(*pinned);
    for (size_t i = 0; i < total + 64; ++i) source[i] = static_cast<char>(random());
    std::vector<char> expected(2 * total + 4096, 0);
    ASSERT_CUDA(cudaMemset(*device, 0, expected.size()));
    // Destinations shuffled with odd gaps; sources contiguous except one jump.
    std::vector<size_t> order(sizes.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), random);
    std::vector<size_t> dst_offset(sizes.size());
    size_t cursor = 3;
    for (size_t i : order) {
      dst_offset[i] = cursor;
      cursor += sizes[i] + (i % 2 == 0 ? 0 : 13);
    }
    std::vector<CopySegment> segments;
    size_t src_offset = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (i == 6) src_offset += 32;  // a new span of sources
      segments.push_back(
          {static_cast<char*>(*device) + dst_offset[i], source + src_offset, sizes[i]});
      std::memcpy(expected.data() + dst_offset[i], source + src_offset, sizes[i]);
      src_offset += sizes[i];
      if (i == 6) src_offset -= 32;
    }
    ASSERT_LE(src_offset + 32, total + 64);
    for (int repeat = 0; repeat < 2; ++repeat) {  // the second reuses the landing buffer
      absl::Status copied = backend->CopyToDeviceBatch(segments.data(), segments.size(), *stream);
      ASSERT_TRUE(copied.ok()) << copied;
    }
    ASSERT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(*stream)));
    std::vector<char> got(expected.size());
    ASSERT_CUDA(cudaMemcpy(got.data(), *device, got.size(), cudaMemcpyDeviceToHost));
    EXPECT_TRUE(got == expected) << "landing capacity " << options.landing_capacity_bytes
                                 << ", direct from " << options.direct_min_bytes << " bytes";
    backend->DestroyStream(*stream);
    backend->FreeDevice(*device);
    backend->FreePinned(*pinned);
  }
}

// The CUDA backend against the real server in both data planes, with a segment that holds every
// retrieval and one that holds 3 blocks (mixed): every table's device slots hold its blocks.
TEST(GpuDataPlaneTest, SharedMemoryAndBytesLoadTheSameDeviceSlots) {
  absl::Status usable = client_internal::CudaUsable(0);
  if (!usable.ok()) GTEST_SKIP() << "no usable GPU: " << usable;
  const uint64_t key_bytes = SmallProfile().block_key_bytes();
  for (uint64_t segment_bytes : {uint64_t{64} << 20, 3 * 2 * key_bytes}) {
    for (DataPlane plane : {DataPlane::kSharedMemory, DataPlane::kGrpcBytes}) {
      SCOPED_TRACE(absl::StrCat(DataPlaneName(plane), ", segment of ", segment_bytes, " bytes"));
      ServerProcess server({"--backend=memory", "--data_dir=" + MakeTempDir("gpu_plane"),
                            "--log_level=warn",
                            absl::StrCat("--shared_memory_bytes=", segment_bytes)});
      ASSERT_TRUE(server.Start().ok());
      ClientOptions options;
      options.address = server.address();
      options.backend = BackendKind::kCuda;
      options.data_plane = plane;
      absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
      ASSERT_TRUE(client.ok()) << client.status();
      absl::StatusOr<Sequence*> sequence =
          (*client)->CreateSequence("seq", SmallProfile(), SmallConfig(kStride), {0, kBlocks + 8});
      ASSERT_TRUE(sequence.ok()) << sequence.status();  // kSharedMemory: registration worked
      ASSERT_EQ((*client)->data_plane(), plane);
      ASSERT_TRUE(OffloadBlocks(*sequence, 0, kBlocks).ok());
      const std::string queries = MakeQueries(SmallProfile(), kStride, 3);
      ASSERT_TRUE((*sequence)->Seal(queries.data(), kStride, MemoryKind::kHost, nullptr).ok());
      cudaStream_t stream = nullptr;
      ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      for (uint32_t step = 0; step < 10 * kStride; ++step) {
        const std::string query = MakeQueries(SmallProfile(), 1, 1000 + step);
        std::vector<std::vector<char>> bytes(kLayers);
        std::vector<std::vector<uint32_t>> blocks(kLayers);
        for (uint32_t layer = 0; layer < kLayers; ++layer) {
          absl::StatusOr<SlotTable> table = (*sequence)->Acquire(layer, stream);
          ASSERT_TRUE(table.ok()) << table.status();
          blocks[layer].assign(table->block_indices, table->block_indices + table->count);
          bytes[layer].resize(table->count * table->slot_bytes);
          for (uint32_t i = 0; i < table->count; ++i) {
            const char* slot = static_cast<const char*>(table->slot_pool) +
                               uint64_t(table->host_slots[i]) * table->slot_bytes;
            ASSERT_CUDA(cudaMemcpyAsync(bytes[layer].data() + i * table->slot_bytes, slot,
                                        table->slot_bytes, cudaMemcpyDeviceToHost, stream));
          }
          const char* row = query.data() + layer * SmallProfile().query_bytes();
          ASSERT_TRUE((*sequence)->RecordQuery(layer, row, MemoryKind::kHost, stream).ok());
          ASSERT_TRUE((*sequence)->Release(layer, stream).ok());
        }
        absl::Status stepped = (*client)->Step();
        ASSERT_TRUE(stepped.ok()) << stepped;
        ASSERT_CUDA(cudaStreamSynchronize(stream));
        for (uint32_t layer = 0; layer < kLayers; ++layer) {
          for (size_t i = 0; i < blocks[layer].size(); ++i) {
            const v1::Block expected = TestBlock(kSeed, layer, blocks[layer][i], key_bytes);
            const char* got = bytes[layer].data() + i * 2 * key_bytes;
            ASSERT_EQ(std::memcmp(got, expected.key().data(), key_bytes), 0)
                << "K of layer " << layer << " block " << blocks[layer][i] << " step " << step;
            ASSERT_EQ(std::memcmp(got + key_bytes, expected.value().data(), key_bytes), 0)
                << "V of layer " << layer << " block " << blocks[layer][i] << " step " << step;
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      ASSERT_CUDA(cudaStreamDestroy(stream));
      const ClientStats stats = (*client)->stats();
      EXPECT_GE((*sequence)->stats().selections_published, 8u * kLayers);
      if (plane == DataPlane::kSharedMemory) {
        EXPECT_GT(stats.blocks_received_shared, 0u);
      } else {
        EXPECT_EQ(stats.blocks_received_shared, 0u);
      }
      grpc::ClientContext context;
      v1::StatsResponse server_stats;
      ASSERT_TRUE(server.stub().Stats(&context, v1::StatsRequest(), &server_stats).ok());
      EXPECT_EQ(server_stats.blocks_sent_shared(), stats.blocks_received_shared);
      client->reset();                  // unregisters and unmaps the segment
      EXPECT_TRUE(server.Stop().ok());  // a clean stop unlinks it
    }
  }
}

TEST(GpuSharedPoolTest, TwoSequencesShareAPoolInEngineDeviceMemory) {
  absl::Status usable = client_internal::CudaUsable(0);
  if (!usable.ok()) GTEST_SKIP() << "no usable GPU: " << usable;
  FakeKvStore fake;
  fake.set_selector(MovingSelection);
  ClientOptions options;
  options.address = fake.address();
  options.backend = BackendKind::kCuda;
  absl::StatusOr<std::unique_ptr<Client>> connected = Client::Connect(options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  Client& client = **connected;
  const ModelProfile profile = SmallProfile();
  const uint64_t key_bytes = profile.block_key_bytes();
  SlotPoolOptions pool = SlotPoolFor(profile, SmallConfig(kStride), kBlocks + 8, 2, 0.5);
  void* memory = nullptr;  // the engine's, e.g. its paged KV pool
  ASSERT_CUDA(cudaMalloc(&memory, pool.num_slots * pool.slot_bytes));
  pool.memory = memory;
  pool.memory_bytes = pool.num_slots * pool.slot_bytes;
  ASSERT_TRUE(client.CreateSlotPool(pool).ok());
  cudaStream_t stream = nullptr;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<Sequence*> sequences;
  const std::string queries = MakeQueries(profile, kStride, 1);
  for (const char* id : {"gpu-shared-0", "gpu-shared-1"}) {
    absl::StatusOr<Sequence*> sequence =
        client.CreateSequence(id, profile, SmallConfig(kStride), {0, kBlocks + 8});
    ASSERT_TRUE(sequence.ok()) << sequence.status();
    ASSERT_TRUE(OffloadBlocks(*sequence, 0, kBlocks).ok());
    absl::Status sealed = (*sequence)->Seal(queries.data(), kStride, MemoryKind::kHost, nullptr);
    ASSERT_TRUE(sealed.ok()) << sealed;
    sequences.push_back(*sequence);
  }
  for (uint32_t step = 0; step < 3 * kStride; ++step) {
    const std::string query = MakeQueries(profile, 1, 100 + step);
    for (Sequence* sequence : sequences) {
      for (uint32_t layer = 0; layer < kLayers; ++layer) {
        ASSERT_TRUE(sequence->Acquire(layer, stream).ok());
        ASSERT_TRUE(sequence
                        ->RecordQuery(layer, query.data() + layer * profile.query_bytes(),
                                      MemoryKind::kHost, stream)
                        .ok());
        ASSERT_TRUE(sequence->Release(layer, stream).ok());
      }
    }
    absl::Status stepped = client.Step();
    ASSERT_TRUE(stepped.ok()) << stepped;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::vector<std::set<int32_t>> slots(sequences.size());
  for (size_t s = 0; s < sequences.size(); ++s) {
    EXPECT_GE(sequences[s]->stats().selections_published, kLayers * 2u);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      absl::StatusOr<SlotTable> table = sequences[s]->Acquire(layer, stream);
      ASSERT_TRUE(table.ok()) << table.status();
      ASSERT_EQ(table->slot_pool, memory);
      std::vector<int32_t> device_slots(table->count);
      ASSERT_CUDA(cudaMemcpyAsync(device_slots.data(), table->device_slots,
                                  table->count * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
      std::vector<char> bytes(table->slot_bytes);
      for (uint32_t i = 0; i < table->count; ++i) {
        ASSERT_CUDA(cudaMemcpyAsync(
            bytes.data(),
            static_cast<const char*>(memory) + uint64_t(table->host_slots[i]) * table->slot_bytes,
            bytes.size(), cudaMemcpyDeviceToHost, stream));
        ASSERT_CUDA(cudaStreamSynchronize(stream));
        const v1::Block expected = TestBlock(kSeed, layer, table->block_indices[i], key_bytes);
        ASSERT_EQ(std::memcmp(bytes.data(), expected.key().data(), key_bytes), 0)
            << "K of sequence " << s << " layer " << layer << " block " << table->block_indices[i];
        ASSERT_EQ(std::memcmp(bytes.data() + key_bytes, expected.value().data(), key_bytes), 0);
        slots[s].insert(table->host_slots[i]);
      }
      ASSERT_CUDA(cudaStreamSynchronize(stream));
      EXPECT_EQ(device_slots,
                std::vector<int32_t>(table->host_slots, table->host_slots + table->count));
      ASSERT_TRUE(sequences[s]->Release(layer, stream).ok());
    }
  }
  for (int32_t slot : slots[0]) EXPECT_EQ(slots[1].count(slot), 0u) << "slot " << slot;
  ASSERT_TRUE(client.DropSequence("gpu-shared-0").ok());
  ASSERT_TRUE(client.DropSequence("gpu-shared-1").ok());
  EXPECT_EQ(client.slot_pool_stats()->slots_in_use, 0u);
  connected->reset();
  cudaStreamDestroy(stream);
  cudaFree(memory);
}

}  // namespace
}  // namespace kvstar::testing
