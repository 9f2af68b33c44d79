// The crash test's child: writes rounds through a real store until it is killed (by the test, or
// by a kill point in its own I/O) or has written --max_writes rounds. Before each write it appends
// "begin S R" to the expected-state file and after the store acknowledged it "ack S R", then one
// byte to --ack_fd; the file is appended with write(2), so what it says survives kill -9.
//
//   crash_writer BACKEND DIR EXPECTED_STATE ACK_FD FIRST_ROUND MAX_WRITES [KILL_OP KILL_NTH]
// BACKEND is rocksdb or nfs; KILL_OP is an IoOperation number (fault_injection.h), and the
// KILL_NTH-th such call on the store's files kills the process.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "rocksdb/env.h"
#include "rocksdb/file_system.h"
#include "storage/block_store.h"
#include "storage/fault_injection.h"
#include "storage/posix_dir_store.h"
#include "storage/rocksdb_store.h"
#include "tests/storage/crash_blocks.h"

namespace kvstar::storage {
namespace {

bool AppendLine(int fd, const std::string& line) {
  return ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
}

int Run(int argc, char** argv) {
  uint64_t ack_fd = 0, first_round = 0, max_writes = 0, kill_op = 0, kill_nth = 0;
  if ((argc != 7 && argc != 9) || !absl::SimpleAtoi(argv[4], &ack_fd) ||
      !absl::SimpleAtoi(argv[5], &first_round) || !absl::SimpleAtoi(argv[6], &max_writes) ||
      (argc == 9 &&
       (!absl::SimpleAtoi(argv[7], &kill_op) || !absl::SimpleAtoi(argv[8], &kill_nth)))) {
    std::fprintf(stderr,
                 "usage: crash_writer BACKEND DIR EXPECTED_STATE ACK_FD FIRST_ROUND "
                 "MAX_WRITES [KILL_OP KILL_NTH]\n");
    return 64;
  }
  const std::string backend = argv[1];
  const std::string dir = argv[2];
  const int state_fd = ::open(argv[3], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (state_fd < 0) {
    std::perror(argv[3]);
    return 1;
  }

  FaultInjector faults;
  if (argc == 9) {
    faults.Arm({static_cast<IoOperation>(kill_op), FaultKind::kCrash, kill_nth, 1, ""});
  }
  FaultInjectingFileIo file_io(DefaultFileIo(), &faults);
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(
      NewFaultInjectingFileSystem(rocksdb::FileSystem::Default(), &faults));
  absl::StatusOr<std::unique_ptr<BlockStore>> store = backend == "rocksdb"
                                                          ? OpenRocksDbStoreWithEnv(dir, env.get())
                                                          : OpenPosixDirStoreWithIo(dir, &file_io);
  if (!store.ok()) {
    std::fprintf(stderr, "open: %s\n", store.status().ToString().c_str());
    return 1;
  }
  for (uint32_t sequence = 0; sequence < kCrashSequences; ++sequence) {
    absl::Status created = (*store)->PutSequence(CrashSequenceKey(sequence), "crash profile");
    if (!created.ok()) {
      std::fprintf(stderr, "PutSequence: %s\n", created.ToString().c_str());
      return 1;
    }
  }
  for (uint64_t i = 0; i < max_writes; ++i) {
    const uint64_t round = first_round + i;
    const uint32_t sequence = static_cast<uint32_t>(round % kCrashSequences);
    std::vector<CrashBlock> blocks;
    std::vector<BlockWrite> writes;
    for (const BlockId& id : CrashBlockIds()) blocks.push_back(MakeCrashBlock(sequence, round, id));
    for (const CrashBlock& block : blocks) {
      writes.push_back({block.id, block.key, block.value, BlockChecksum(block.key, block.value)});
    }
    if (!AppendLine(state_fd, absl::StrCat("begin ", sequence, " ", round, "\n"))) return 1;
    const absl::Status put = (*store)->PutBlocks(CrashSequenceKey(sequence), writes);
    if (!put.ok()) {
      std::fprintf(stderr, "PutBlocks: %s\n", put.ToString().c_str());
      return 1;
    }
    if (!AppendLine(state_fd, absl::StrCat("ack ", sequence, " ", round, "\n"))) return 1;
    if (::write(static_cast<int>(ack_fd), "a", 1) != 1) return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvstar::storage

int main(int argc, char** argv) { return kvstar::storage::Run(argc, argv); }
