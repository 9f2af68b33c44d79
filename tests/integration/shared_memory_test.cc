// Per-tenant shared memory against the real kvstar_server on loopback, with two tenants' tokens:
// each tenant's client receives only its own segment (a sealed memfd, handed over a Unix socket
// after its token is checked), never reads another tenant's regions or bytes, cannot write or
// resize its mapping, sees zeros where a dropped sequence's blocks were, and finds nothing left in
// /dev/shm or on the socket after the server is killed. The handshake refuses wrong, missing and
// malformed requests without harming the server, and the budget is split over the tenants.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/data_plane.h"
#include "client/device_backend.h"
#include "client/shared_segment.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstar/v1/kvstar.grpc.pb.h"
#include "tests/integration/block_fixtures.h"
#include "tests/integration/server_process.h"

namespace kvstar::testing {
namespace {

using client_internal::ReceivedSegment;
using client_internal::ReceiveSegment;
using client_internal::SharedSegment;
using ::testing::HasSubstr;

constexpr char kTokenA[] = "token-of-tenant-a-0123456789";
constexpr char kTokenB[] = "token-of-tenant-b-9876543210";
constexpr char kTokenC[] = "token-of-tenant-c-5555555555";
constexpr uint32_t kLayers = 2;
constexpr uint32_t kQHeads = 4;
constexpr uint32_t kKvHeads = 2;
constexpr uint32_t kHeadDim = 64;
constexpr uint32_t kBlockSize = 64;
constexpr uint32_t kBlocks = 16;
constexpr uint32_t kStride = 8;
constexpr uint64_t kKeyBytes = uint64_t{kBlockSize} * kKvHeads * kHeadDim * 2;
constexpr uint64_t kSharedMemoryBytes = 8 << 20;  // two tenants: 4 MiB each
constexpr int kTimeoutMs = 5000;

// /dev/shm's entry names.
std::set<std::string> DevShmEntries() {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

bool IsAllZero(const char* bytes, uint64_t size) {
  for (uint64_t i = 0; i < size; ++i) {
    if (bytes[i] != 0) return false;
  }
  return true;
}

// Sends `frame` raw on the handshake socket and parses the answer (no descriptor expected).
absl::StatusOr<v1::SharedMemoryHandshakeResponse> RawHandshake(const std::string& address,
                                                               const std::string& frame) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, address.data(), address.size());
  addr.sun_path[0] = '\0';  // the server's default: an abstract name
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr),
              offsetof(sockaddr_un, sun_path) + address.size()) != 0) {
    close(fd);
    return absl::UnavailableError(std::strerror(errno));
  }
  send(fd, frame.data(), frame.size(), MSG_NOSIGNAL);
  shutdown(fd, SHUT_WR);  // nothing more comes: the server need not wait for its timeout
  std::string answer;
  char buffer[4096];
  for (ssize_t n; (n = recv(fd, buffer, sizeof(buffer), 0)) > 0;) answer.append(buffer, n);
  close(fd);
  v1::SharedMemoryHandshakeResponse response;
  if (answer.size() < 4 || !response.ParseFromString(answer.substr(4))) {
    return absl::DataLossError(absl::StrCat("answer of ", answer.size(), " bytes"));
  }
  return response;
}

class SharedMemoryTest : public ::testing::Test {
 protected:
  // A memory-backend server whose token file names tenants alpha (A), beta (B) and, with
  // `three_tenants`, gamma (C).
  void StartServer(std::vector<std::string> flags, bool three_tenants = false) {
    const std::string dir = MakeTempDir("shared_memory");
    const std::string tokens = dir + "/tokens";
    std::ofstream file(tokens);
    file << kTokenA << " alpha\n" << kTokenB << " beta\n";
    if (three_tenants) file << kTokenC << " gamma\n";
    file.close();
    flags.insert(flags.end(), {"--backend=memory", "--data_dir=" + dir + "/data",
                               "--auth_tokens_file=" + tokens, "--log_level=warn"});
    server_ = std::make_unique<ServerProcess>(flags);
    absl::Status started = server_->Start();
    ASSERT_TRUE(started.ok()) << started;
  }
  void StartServer() { StartServer({absl::StrCat("--shared_memory_bytes=", kSharedMemoryBytes)}); }

  static std::unique_ptr<grpc::ClientContext> As(const std::string& token) {
    auto context = std::make_unique<grpc::ClientContext>();
    context->AddMetadata("authorization", "Bearer " + token);
    return context;
  }

  v1::ServerInfoResponse Info(const std::string& token) {
    v1::ServerInfoResponse info;
    grpc::Status status = server_->stub().GetServerInfo(As(token).get(), {}, &info);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return info;
  }

  // Creates, fills (blocks seeded by `seed`) and seals sequence `id` of the token's tenant.
  void Offload(const std::string& token, const std::string& id, uint64_t seed) {
    v1::CreateSequenceRequest create;
    create.set_sequence_id(id);
    v1::ModelProfile* profile = create.mutable_profile();
    profile->set_num_layers(kLayers);
    profile->set_num_q_heads(kQHeads);
    profile->set_num_kv_heads(kKvHeads);
    profile->set_head_dim(kHeadDim);
    profile->set_block_size(kBlockSize);
    profile->set_dtype(v1::DTYPE_BF16);
    v1::CreateSequenceResponse created;
    grpc::Status status = server_->stub().CreateSequence(As(token).get(), create, &created);
    ASSERT_TRUE(status.ok()) << status.error_message();

    auto context = As(token);
    v1::PutBlocksResponse put;
    auto writer = server_->stub().PutBlocks(context.get(), &put);
    v1::PutBlocksRequest message;
    message.set_sequence_id(id);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t b = 0; b < kBlocks; ++b) {
        v1::Block block = MakeBf16Block(seed, layer, b, kKeyBytes);
        blocks_[{token, id, layer, b}] = block.key() + block.value();
        *message.add_blocks() = std::move(block);
      }
    }
    writer->Write(message);
    writer->WritesDone();
    status = writer->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();

    v1::SealRequest seal;
    seal.set_sequence_id(id);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::LayerQueries* queries = seal.add_queries();
      queries->set_layer(layer);
      queries->set_num_queries(kStride);
      queries->mutable_queries()->resize(uint64_t{kStride} * kQHeads * kHeadDim * 2);
      FillBf16Normal(seed * 100 + layer, queries->mutable_queries());
    }
    v1::SealResponse sealed;
    status = server_->stub().Seal(As(token).get(), seal, &sealed);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  // One Retrieve of `id` asking for shared memory, holding nothing (or, with `hold_all`, every
  // block): the new blocks of every layer's selection.
  std::vector<v1::Block> RetrieveShared(const std::string& token, const std::string& id,
                                        uint64_t step, bool hold_all = false) {
    v1::RetrieveRequest request;
    v1::SequenceQueries* part = request.add_sequences();
    part->set_sequence_id(id);
    part->set_decode_step(step);
    part->set_include_data(true);
    part->set_shared_memory(true);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      v1::LayerQueries* queries = part->add_queries();
      queries->set_layer(layer);
      queries->set_num_queries(kStride);
      queries->mutable_queries()->resize(uint64_t{kStride} * kQHeads * kHeadDim * 2);
      FillBf16Normal(step * 1000 + layer, queries->mutable_queries());
      if (hold_all) {
        v1::HeldBlocks* held = part->add_held();
        held->set_layer(layer);
        for (uint32_t b = 0; b < kBlocks; ++b) held->add_block_indices(b);
      }
    }
    auto context = As(token);
    auto reader = server_->stub().Retrieve(context.get(), request);
    std::vector<v1::Block> blocks;
    v1::RetrieveResponse reply;
    while (reader->Read(&reply)) {
      for (const v1::Block& block : reply.new_blocks()) blocks.push_back(block);
    }
    grpc::Status status = reader->Finish();
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(blocks.empty(), hold_all);
    return blocks;
  }

  grpc::Status Drop(const std::string& token, const std::string& id) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", std::string("Bearer ") + token);
    v1::DropSequenceRequest drop;
    drop.set_sequence_id(id);
    v1::DropSequenceResponse dropped;
    return server_->stub().DropSequence(&context, drop, &dropped);
  }

  // Whether the segment region a reply named for `block` holds its K then V as stored.
  bool HoldsStored(const SharedSegment& segment, const std::string& token, const std::string& id,
                   const v1::Block& block) {
    return std::memcmp(segment.Region(block.shared().offset(), kKeyBytes),
                       Stored(token, id, block).data(), 2 * kKeyBytes) == 0;
  }

  // Whether that region reads all zeros.
  static bool ReadsZeros(const SharedSegment& segment, const v1::Block& block) {
    return IsAllZero(segment.Region(block.shared().offset(), kKeyBytes), 2 * kKeyBytes);
  }

  // K then V of a block as stored.
  const std::string& Stored(const std::string& token, const std::string& id,
                            const v1::Block& block) {
    return blocks_.at({token, id, block.layer(), block.block_index()});
  }

  std::unique_ptr<SharedSegment> Receive(const std::string& token) {
    const v1::ServerInfoResponse info = Info(token);
    EXPECT_FALSE(info.shared_memory_socket().empty());
    absl::StatusOr<std::unique_ptr<SharedSegment>> segment =
        SharedSegment::Receive(info.shared_memory_socket(), token, kTimeoutMs, backend_.get());
    EXPECT_TRUE(segment.ok()) << segment.status();
    return segment.ok() ? *std::move(segment) : nullptr;
  }

  std::unique_ptr<client_internal::DeviceBackend> backend_ =
      *client_internal::SelectBackend(BackendKind::kHost, 0);
  std::unique_ptr<ServerProcess> server_;
  std::map<std::tuple<std::string, std::string, uint32_t, uint32_t>, std::string> blocks_;
};

TEST_F(SharedMemoryTest, EachTenantReceivesOnlyItsOwnSegmentAndNeverReadsAnotherTenantsBytes) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  // The same sequence id in both tenants, different bytes.
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenA, "s", 1));
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenB, "s", 2));
  std::unique_ptr<SharedSegment> segment_a = Receive(kTokenA);
  std::unique_ptr<SharedSegment> segment_b = Receive(kTokenB);
  ASSERT_TRUE(segment_a != nullptr && segment_b != nullptr);
  EXPECT_NE(segment_a->name(), segment_b->name());
  EXPECT_EQ(segment_a->size(), kSharedMemoryBytes / 2);
  EXPECT_EQ(segment_b->size(), kSharedMemoryBytes / 2);
  EXPECT_THAT(segment_a->name(), HasSubstr("alpha"));

  // A's replies name A's segment, whose regions hold A's bytes.
  const std::vector<v1::Block> a_blocks = RetrieveShared(kTokenA, "s", 1);
  for (const v1::Block& block : a_blocks) {
    ASSERT_TRUE(block.has_shared()) << "block " << block.block_index() << " came as bytes";
    EXPECT_EQ(block.shared().segment(), segment_a->name());
    const char* region = segment_a->Region(block.shared().offset(), kKeyBytes);
    ASSERT_NE(region, nullptr);
    EXPECT_EQ(std::memcmp(region, Stored(kTokenA, "s", block).data(), 2 * kKeyBytes), 0);
  }

  // B's client, holding only B's segment, refuses every region of A's replies...
  std::shared_ptr<const client_internal::BlockDataPlane> plane_b =
      client_internal::MakeSharedMemoryDataPlane(Receive(kTokenB));
  for (const v1::Block& block : a_blocks) {
    EXPECT_FALSE(plane_b->Readable(block)) << "B would read A's region";
    EXPECT_EQ(plane_b->Locate(block, kKeyBytes).status().code(), absl::StatusCode::kDataLoss);
  }
  // ... and A's bytes are nowhere in B's segment, not even after B's own retrieval filled it.
  const std::vector<v1::Block> b_blocks = RetrieveShared(kTokenB, "s", 1);
  for (const v1::Block& block : b_blocks) {
    ASSERT_TRUE(block.has_shared());
    EXPECT_EQ(block.shared().segment(), segment_b->name());
    EXPECT_TRUE(HoldsStored(*segment_b, kTokenB, "s", block));
  }
  for (const v1::Block& block : a_blocks) {
    const std::string& a_bytes = Stored(kTokenA, "s", block);
    EXPECT_EQ(memmem(segment_b->base(), segment_b->size(), a_bytes.data(), 256), nullptr)
        << "A's block " << block.block_index() << " is visible in B's segment";
  }

  // Nothing to open by name: no /dev/shm entry names a segment, and the server maps no file
  // of /dev/shm, only its memfds.
  for (const std::string& name : DevShmEntries()) {
    EXPECT_THAT(name, ::testing::Not(HasSubstr(segment_a->name())));
    EXPECT_THAT(name, ::testing::Not(HasSubstr(segment_b->name())));
  }
  std::ifstream maps(absl::StrCat("/proc/", server_->pid(), "/maps"));
  std::string line;
  int memfd_lines = 0;
  while (std::getline(maps, line)) {
    EXPECT_THAT(line, ::testing::Not(HasSubstr("/dev/shm"))) << line;
    memfd_lines += line.find("memfd:kvstar-") != std::string::npos;
  }
  EXPECT_EQ(memfd_lines, 2) << "one mapping per tenant's segment";
}

TEST_F(SharedMemoryTest, TheHandshakeRefusesWrongMissingAndMalformedRequestsAndKeepsServing) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  const std::string socket = Info(kTokenA).shared_memory_socket();
  ASSERT_EQ(socket[0], '@') << "the default is an abstract name: " << socket;

  absl::StatusOr<ReceivedSegment> wrong =
      ReceiveSegment(socket, "not-a-token-of-this-server", kTimeoutMs);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kUnauthenticated) << wrong.status();
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("unknown bearer token"));
  absl::StatusOr<ReceivedSegment> missing = ReceiveSegment(socket, "", kTimeoutMs);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kUnauthenticated) << missing.status();

  // A length over the limit, then bytes that are no request, then a client that says nothing.
  absl::StatusOr<v1::SharedMemoryHandshakeResponse> huge =
      RawHandshake(socket, std::string("\xff\xff\xff\x7f", 4));
  ASSERT_TRUE(huge.ok()) << huge.status();
  EXPECT_EQ(huge->code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  absl::StatusOr<v1::SharedMemoryHandshakeResponse> garbage =
      RawHandshake(socket, std::string("\x02\x00\x00\x00\x0a\x7f", 6));
  ASSERT_TRUE(garbage.ok()) << garbage.status();
  EXPECT_EQ(garbage->code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(garbage->message(), HasSubstr("not a SharedMemoryHandshakeRequest"));
  EXPECT_EQ(RawHandshake(socket, "").status().code(), absl::StatusCode::kDataLoss)
      << "an empty request gets no answer";

  // The server still serves, both the handshake and gRPC.
  absl::StatusOr<ReceivedSegment> right = ReceiveSegment(socket, kTokenA, kTimeoutMs);
  ASSERT_TRUE(right.ok()) << right.status();
  close(right->fd);
  EXPECT_EQ(Info(kTokenB).shared_memory_bytes(), kSharedMemoryBytes / 2);
}

TEST_F(SharedMemoryTest, TheClientsMappingIsReadOnlyAndTheSegmentCannotBeResized) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  absl::StatusOr<ReceivedSegment> received =
      ReceiveSegment(Info(kTokenA).shared_memory_socket(), kTokenA, kTimeoutMs);
  ASSERT_TRUE(received.ok()) << received.status();
  const int fd = received->fd;
  const uint64_t size = received->bytes;

  EXPECT_EQ(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
  EXPECT_EQ(write(fd, "x", 1), -1);
  EXPECT_NE(ftruncate(fd, 0), 0);
  EXPECT_NE(ftruncate(fd, static_cast<off_t>(2 * size)), 0);
  EXPECT_NE(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), 0) << "the seals themselves are sealed";
  // Reopening the descriptor read-write through /proc gives no way around the seal.
  const int reopened = open(absl::StrCat("/proc/self/fd/", fd).c_str(), O_RDWR);
  if (reopened >= 0) {
    EXPECT_EQ(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, reopened, 0), MAP_FAILED);
    EXPECT_EQ(write(reopened, "x", 1), -1);
    close(reopened);
  }

  void* view = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(view, MAP_FAILED);
  close(fd);
  EXPECT_NE(mprotect(view, size, PROT_READ | PROT_WRITE), 0);
  EXPECT_EQ(errno, EACCES);
  // A store into the mapping faults.
  const pid_t child = fork();
  if (child == 0) {
    // The default action, not a sanitizer's SIGSEGV handler (which exits with its own code).
    signal(SIGSEGV, SIG_DFL);
    static_cast<volatile char*>(view)[0] = 1;
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV) << "status " << status;
  munmap(view, size);
}

TEST_F(SharedMemoryTest, ReusedRegionsHoldOnlyTheNewBlocksAndDroppedOnesReadZeros) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenA, "s", 1));
  std::unique_ptr<SharedSegment> segment = Receive(kTokenA);
  ASSERT_NE(segment, nullptr);

  const std::vector<v1::Block> first = RetrieveShared(kTokenA, "s", 1);
  for (const v1::Block& block : first) {
    ASSERT_TRUE(block.has_shared());
    EXPECT_FALSE(ReadsZeros(*segment, block));
  }
  // The next Retrieve releases the previous one's regions (holding every block, it takes none);
  // they held this live sequence's own blocks and are not cleared. The one after reuses them:
  // each region it names holds exactly its new block.
  RetrieveShared(kTokenA, "s", 2, /*hold_all=*/true);
  const std::vector<v1::Block> second = RetrieveShared(kTokenA, "s", 3);
  size_t reused = 0;
  for (const v1::Block& block : second) {
    for (const v1::Block& old : first) reused += old.shared().offset() == block.shared().offset();
  }
  EXPECT_GT(reused, 0u) << "the released regions should have been allocated again";
  for (const v1::Block& block : second) {
    ASSERT_TRUE(block.has_shared());
    EXPECT_TRUE(HoldsStored(*segment, kTokenA, "s", block));
  }
  // DropSequence zeroes every region its last reply named before it returns, and every region
  // it released earlier that nobody reused.
  ASSERT_TRUE(Drop(kTokenA, "s").ok());
  for (const v1::Block& block : second) {
    EXPECT_TRUE(ReadsZeros(*segment, block))
        << "the dropped sequence's block " << block.block_index() << " is still readable";
  }
  // So do the regions its earlier retrievals released, reused since or not.
  for (const v1::Block& block : first) {
    EXPECT_TRUE(ReadsZeros(*segment, block))
        << "a region the dropped sequence released still holds block " << block.block_index();
  }
}

TEST_F(SharedMemoryTest, ADroppedSequencesReleasedRegionsReadZeros) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenA, "s", 1));
  std::unique_ptr<SharedSegment> segment = Receive(kTokenA);
  ASSERT_NE(segment, nullptr);
  const std::vector<v1::Block> first = RetrieveShared(kTokenA, "s", 1);
  ASSERT_FALSE(first.empty());
  // Holding every block, the next Retrieve takes no region and releases the first one's: their
  // bytes stay (the sequence is live, its tenant may read them), and nobody reuses them.
  RetrieveShared(kTokenA, "s", 2, /*hold_all=*/true);
  for (const v1::Block& block : first) {
    EXPECT_TRUE(HoldsStored(*segment, kTokenA, "s", block))
        << "a released region was cleared or reused";
  }
  ASSERT_TRUE(Drop(kTokenA, "s").ok());
  for (const v1::Block& block : first) {
    EXPECT_TRUE(ReadsZeros(*segment, block))
        << "the dropped sequence's released block " << block.block_index() << " is readable";
  }
}

TEST_F(SharedMemoryTest, AfterTheServerIsKilledNothingIsLeftInDevShmOrOnItsSocket) {
  const std::set<std::string> before = DevShmEntries();
  ASSERT_NO_FATAL_FAILURE(StartServer());
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenA, "s", 1));
  const std::string socket = Info(kTokenA).shared_memory_socket();
  std::unique_ptr<SharedSegment> segment = Receive(kTokenA);
  ASSERT_NE(segment, nullptr);
  const std::vector<v1::Block> blocks = RetrieveShared(kTokenA, "s", 1);
  const pid_t pid = server_->pid();
  for (const std::string& name : DevShmEntries()) {
    if (before.count(name) == 0) ADD_FAILURE() << "the server made /dev/shm/" << name;
  }

  server_->Kill();  // SIGKILL: no destructor runs
  for (const std::string& name : DevShmEntries()) {
    EXPECT_THAT(name, ::testing::Not(HasSubstr(segment->name())));
    EXPECT_THAT(name, ::testing::Not(HasSubstr(absl::StrCat(pid))));
  }
  // The abstract socket went with the process.
  absl::StatusOr<ReceivedSegment> after = ReceiveSegment(socket, kTokenA, kTimeoutMs);
  EXPECT_EQ(after.status().code(), absl::StatusCode::kUnavailable) << after.status();
  // The client's mapping stays valid (the memfd lives while mapped, then goes with it).
  for (const v1::Block& block : blocks) {
    EXPECT_TRUE(HoldsStored(*segment, kTokenA, "s", block));
  }
}

TEST_F(SharedMemoryTest, ResidentBlocksAreNamedWhereTheyWerePutAndReplacedOnesRetireSafely) {
  ASSERT_NO_FATAL_FAILURE(StartServer(
      {absl::StrCat("--shared_memory_bytes=", kSharedMemoryBytes), "--segment_resident_blocks"}));
  std::unique_ptr<SharedSegment> segment = Receive(kTokenA);  // before the blocks are put
  ASSERT_NE(segment, nullptr);
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenA, "s", 1));
  auto stats = [&] {
    v1::StatsResponse response;
    grpc::Status status = server_->stub().Stats(As(kTokenA).get(), {}, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  };

  // The blocks lie in the segment since they were put: replies name them, nothing is copied,
  // and the same queries name the same regions again.
  const std::vector<v1::Block> first = RetrieveShared(kTokenA, "s", 1);
  ASSERT_FALSE(first.empty());
  std::map<std::pair<uint32_t, uint32_t>, uint64_t> where;
  for (const v1::Block& block : first) {
    ASSERT_TRUE(block.has_shared());
    EXPECT_TRUE(HoldsStored(*segment, kTokenA, "s", block));
    where[{block.layer(), block.block_index()}] = block.shared().offset();
  }
  const std::vector<v1::Block> again = RetrieveShared(kTokenA, "s", 1);
  ASSERT_EQ(again.size(), first.size());
  for (const v1::Block& block : again) {
    EXPECT_EQ(block.shared().offset(), where.at({block.layer(), block.block_index()}));
  }
  EXPECT_EQ(stats().retrieve_copy_micros(), 0u);
  EXPECT_EQ(stats().blocks_sent_shared(), first.size() + again.size());

  // A block put again gets a new region: the one earlier replies named keeps its old bytes, so
  // a client still reading it never sees a torn block, until the next Retrieve releases it.
  const v1::Block& replaced = first.front();
  const std::string old_bytes = Stored(kTokenA, "s", replaced);
  {
    auto context = As(kTokenA);
    v1::PutBlocksResponse put;
    auto writer = server_->stub().PutBlocks(context.get(), &put);
    v1::PutBlocksRequest message;
    message.set_sequence_id("s");
    v1::Block block = MakeBf16Block(7, replaced.layer(), replaced.block_index(), kKeyBytes);
    blocks_[{kTokenA, "s", replaced.layer(), replaced.block_index()}] = block.key() + block.value();
    *message.add_blocks() = std::move(block);
    ASSERT_TRUE(writer->Write(message));
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  EXPECT_EQ(std::memcmp(segment->Region(replaced.shared().offset(), kKeyBytes), old_bytes.data(),
                        2 * kKeyBytes),
            0)
      << "the region an earlier reply named was overwritten in place";
  // Every block a later Retrieve names holds its current bytes (the new ones for that block).
  const std::vector<v1::Block> later = RetrieveShared(kTokenA, "s", 2);
  for (const v1::Block& block : later) {
    ASSERT_TRUE(block.has_shared());
    EXPECT_TRUE(HoldsStored(*segment, kTokenA, "s", block)) << block.block_index();
    if (block.layer() == replaced.layer() && block.block_index() == replaced.block_index()) {
      EXPECT_NE(block.shared().offset(), replaced.shared().offset());
    }
  }

  // DropSequence zeroes every region that held its blocks, the retired one included.
  ASSERT_TRUE(Drop(kTokenA, "s").ok());
  for (const std::vector<v1::Block>* reply : {&first, &later}) {
    for (const v1::Block& block : *reply) {
      EXPECT_TRUE(ReadsZeros(*segment, block))
          << "the dropped sequence's block " << block.block_index() << " is still readable";
    }
  }
}

TEST_F(SharedMemoryTest, TenantsGetTheirAllotmentOfTheBudgetAndBlocksBeyondItComeAsBytes) {
  // Default: the budget split evenly over the token file's three tenants.
  ASSERT_NO_FATAL_FAILURE(StartServer({"--shared_memory_bytes=3145728"}, /*three_tenants=*/true));
  EXPECT_EQ(Info(kTokenA).shared_memory_bytes(), 1u << 20);
  EXPECT_EQ(Info(kTokenC).shared_memory_bytes(), 1u << 20);
  ASSERT_TRUE(server_->Stop().ok());

  // 2 MiB per tenant out of 3 MiB: A gets 2, B the 1 left, C none and its blocks come as bytes.
  ASSERT_NO_FATAL_FAILURE(StartServer(
      {"--shared_memory_bytes=3145728", "--shared_memory_bytes_per_tenant=2097152"}, true));
  std::unique_ptr<SharedSegment> a = Receive(kTokenA);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->size(), 2u << 20);
  EXPECT_EQ(Info(kTokenB).shared_memory_bytes(), 1u << 20);
  std::unique_ptr<SharedSegment> b = Receive(kTokenB);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->size(), 1u << 20);
  const v1::ServerInfoResponse c_info = Info(kTokenC);
  EXPECT_EQ(c_info.shared_memory_bytes(), 0u);
  EXPECT_TRUE(c_info.shared_memory_socket().empty());
  absl::StatusOr<ReceivedSegment> c =
      ReceiveSegment(Info(kTokenA).shared_memory_socket(), kTokenC, kTimeoutMs);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  ASSERT_NO_FATAL_FAILURE(Offload(kTokenC, "s", 5));
  for (const v1::Block& block : RetrieveShared(kTokenC, "s", 1)) {
    EXPECT_FALSE(block.has_shared());
    EXPECT_EQ(block.key() + block.value(), Stored(kTokenC, "s", block));
  }
}

}  // namespace
}  // namespace kvstar::testing
