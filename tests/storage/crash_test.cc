// Crash test against an expected state (the idea of RocksDB's db_stress expected_state): a child
// process (crash_writer) writes rounds through the real store and logs "begin"/"ack" lines; it is
// killed with SIGKILL, either by this test after a random number of acknowledged writes or by a
// kill point at a random N-th write, fsync, rename or create in its own I/O (a write at a kill
// point is torn in half). After each kill the store is reopened here and must hold, for every
// sequence, the last acknowledged round or the one in flight when the child died, every block
// bit-exact and all from the same round; no temporary files may be left.
//
// KVSTAR_CRASH_ROUNDS (default 12 per backend) and KVSTAR_CRASH_SEED make it a longer tool run.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "storage/block_store.h"
#include "storage/fault_injection.h"
#include "tests/storage/crash_blocks.h"
#include "tests/storage/store_test_util.h"

extern char** environ;

namespace kvstar::storage {
namespace {

namespace fs = std::filesystem;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  uint64_t value = 0;
  return text != nullptr && absl::SimpleAtoi(text, &value) ? value : fallback;
}

std::string WriterBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir != nullptr && workspace != nullptr) {
    return absl::StrCat(srcdir, "/", workspace, "/tests/storage/crash_writer");
  }
  return "bazel-bin/tests/storage/crash_writer";
}

// What the test knows about one sequence from the expected-state files.
struct SequenceState {
  std::optional<uint64_t> acknowledged;  // the last acknowledged round
  std::optional<uint64_t> in_flight;  // begun after it, not acknowledged: may or may not be there
};

struct Totals {
  uint64_t rounds = 0;
  uint64_t acknowledged_writes = 0;
  uint64_t killed_by_test = 0;
  uint64_t killed_at_io = 0;
  uint64_t in_flight_landed = 0;
  uint64_t lost = 0;
};

class CrashTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    state_dir_ = MakeTempDir();
  }

  // Runs one child to its death; returns the number of acks it reported.
  void RunChild(uint64_t first_round, std::optional<std::pair<IoOperation, uint64_t>> kill_point,
                std::optional<uint64_t> kill_after_acks, const std::string& state_path) {
    int ack_pipe[2];
    ASSERT_EQ(::pipe(ack_pipe), 0);
    std::vector<std::string> args = {WriterBinary(),
                                     GetParam(),
                                     dir_,
                                     state_path,
                                     std::to_string(ack_pipe[1]),
                                     std::to_string(first_round),
                                     std::to_string(kMaxWritesPerChild)};
    if (kill_point.has_value()) {
      args.push_back(std::to_string(static_cast<int>(kill_point->first)));
      args.push_back(std::to_string(kill_point->second));
    }
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addclose(&actions, ack_pipe[0]);
    pid_t pid = -1;
    const int spawned = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(ack_pipe[1]);
    ASSERT_EQ(spawned, 0) << "posix_spawn " << argv[0];

    // Blocks on the child's acks (never on time): kill it right after the k-th, while it is
    // already inside the next write.
    uint64_t acks = 0;
    char byte = 0;
    while (::read(ack_pipe[0], &byte, 1) == 1) {
      ++acks;
      if (kill_after_acks.has_value() && acks == *kill_after_acks) {
        ::kill(pid, SIGKILL);
        break;
      }
    }
    ::close(ack_pipe[0]);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    const bool finished = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    ASSERT_TRUE(killed || finished) << "crash_writer failed, status " << status;
    if (killed && kill_after_acks.has_value() && acks == *kill_after_acks) {
      ++totals_.killed_by_test;
    } else if (killed) {
      ++totals_.killed_at_io;
    }
  }

  // Folds one child's expected-state file into states_ (an incomplete last line is ignored: the
  // child died writing it, so what it describes is no more than in flight).
  void ReadExpectedState(const std::string& path) {
    std::ifstream in(path);
    std::stringstream contents;
    contents << in.rdbuf();
    const std::string text = contents.str();
    size_t start = 0;
    for (size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1) {
      std::istringstream line(text.substr(start, end - start));
      std::string what;
      uint32_t sequence = 0;
      uint64_t round = 0;
      ASSERT_TRUE(line >> what >> sequence >> round) << text.substr(start, end - start);
      SequenceState& state = states_[sequence];
      if (what == "begin") {
        state.in_flight = round;
      } else {
        ASSERT_EQ(what, "ack");
        ASSERT_EQ(state.in_flight, round);
        state.acknowledged = round;
        state.in_flight.reset();
        ++totals_.acknowledged_writes;
      }
    }
  }

  // Reopens the store and checks every sequence against states_.
  void CheckStore() {
    absl::StatusOr<std::unique_ptr<BlockStore>> store =
        GetParam() == "rocksdb" ? OpenRocksDbStore(dir_) : OpenPosixDirStore(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    for (auto& [sequence, state] : states_) {
      const std::string key = CrashSequenceKey(sequence);
      std::vector<BlockData> out;
      const absl::Status read = (*store)->GetBlocks(key, CrashBlockIds(), &out);
      if (!state.acknowledged.has_value() && absl::IsNotFound(read)) {
        state.in_flight.reset();  // the only write never landed
        continue;
      }
      if (!read.ok()) {
        ++totals_.lost;
        ADD_FAILURE() << key << " lost acknowledged round " << state.acknowledged.value_or(0)
                      << ": " << read;
        continue;
      }
      const uint64_t round = CrashRoundOf(out[0].key);
      const bool is_acknowledged = state.acknowledged == round;
      const bool is_in_flight = state.in_flight == round;
      if (!is_acknowledged && !is_in_flight) {
        ++totals_.lost;
        ADD_FAILURE() << key << " holds round " << round << "; acknowledged "
                      << state.acknowledged.value_or(0) << ", in flight "
                      << state.in_flight.value_or(0);
        continue;
      }
      for (size_t i = 0; i < out.size(); ++i) {
        const CrashBlock expected = MakeCrashBlock(sequence, round, CrashBlockIds()[i]);
        EXPECT_TRUE(out[i].key == expected.key && out[i].value == expected.value)
            << key << " block " << i << " is not bit-exact round " << round;
      }
      absl::StatusOr<std::vector<BlockId>> ids = (*store)->ListBlocks(key);
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(*ids, CrashBlockIds()) << key;
      if (is_in_flight && !is_acknowledged) ++totals_.in_flight_landed;
      state.acknowledged = round;
      state.in_flight.reset();
    }
    for (const auto& entry : fs::recursive_directory_iterator(dir_)) {
      EXPECT_FALSE(absl::StartsWith(entry.path().filename().string(), kTempFilePrefix))
          << "left behind: " << entry.path();
    }
  }

  static constexpr uint64_t kMaxWritesPerChild = 24;

  std::string dir_;
  std::string state_dir_;
  std::map<uint32_t, SequenceState> states_;
  Totals totals_;
};

TEST_P(CrashTest, EveryAcknowledgedWriteSurvivesKill9AtRandomPoints) {
  const uint64_t rounds = EnvOr("KVSTAR_CRASH_ROUNDS", 12);
  const uint64_t seed = EnvOr("KVSTAR_CRASH_SEED", 20261201);
  std::mt19937_64 rng(seed);
  const IoOperation kill_operations[] = {IoOperation::kWrite, IoOperation::kSync,
                                         IoOperation::kRename, IoOperation::kCreate};
  uint64_t next_round = 1;
  for (uint64_t round = 0; round < rounds; ++round) {
    SCOPED_TRACE(absl::StrCat("crash round ", round, ", seed ", seed));
    std::optional<std::pair<IoOperation, uint64_t>> kill_point;
    std::optional<uint64_t> kill_after_acks;
    if (round % 2 == 0) {
      kill_after_acks = 1 + rng() % kMaxWritesPerChild;
    } else {
      // Counted from the child's open, so early ones land in recovery and sequence creation.
      // RocksDB creates and renames a file only a few times per open (WAL, MANIFEST, CURRENT).
      const IoOperation operation = kill_operations[rng() % 4];
      const bool rare = GetParam() == "rocksdb" &&
                        (operation == IoOperation::kRename || operation == IoOperation::kCreate);
      kill_point = {operation, 1 + rng() % (rare ? 4 : 50)};
    }
    const std::string state_path = absl::StrCat(state_dir_, "/expected-", round);
    ASSERT_NO_FATAL_FAILURE(RunChild(next_round, kill_point, kill_after_acks, state_path));
    next_round += kMaxWritesPerChild;
    ASSERT_NO_FATAL_FAILURE(ReadExpectedState(state_path));
    ASSERT_NO_FATAL_FAILURE(CheckStore());
    ++totals_.rounds;
  }
  std::printf(
      "crash test (%s): %llu rounds, %llu acknowledged writes (%zu blocks each), %llu "
      "kills by the test, %llu at I/O kill points, %llu in-flight writes landed, %llu "
      "lost\n",
      GetParam().c_str(), static_cast<unsigned long long>(totals_.rounds),
      static_cast<unsigned long long>(totals_.acknowledged_writes), CrashBlockIds().size(),
      static_cast<unsigned long long>(totals_.killed_by_test),
      static_cast<unsigned long long>(totals_.killed_at_io),
      static_cast<unsigned long long>(totals_.in_flight_landed),
      static_cast<unsigned long long>(totals_.lost));
  EXPECT_EQ(totals_.lost, 0u);
  EXPECT_GT(totals_.acknowledged_writes, 0u);
  EXPECT_GT(totals_.killed_by_test + totals_.killed_at_io, 0u);
}

INSTANTIATE_TEST_SUITE_P(Backends, CrashTest, ::testing::Values("rocksdb", "nfs"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvstar::storage
