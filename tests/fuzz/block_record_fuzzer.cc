// libFuzzer target over the decoding of stored blocks. The first byte picks what the rest is:
//   0: a RocksDB block value, decoded by DecodeRocksDbBlockValue (rocksdb_store.h);
//   1: a POSIX store segment file (block bytes, index, trailer) of one sequence, read back by
//      opening the store and reading every block it lists;
//   2: a POSIX store metadata file of one sequence, read back by opening the store.
// The POSIX store checksums its segment index: the harness recomputes that checksum whenever the
// trailer's sizes are consistent, so the fuzzer reaches the index entries instead of stopping at
// the checksum. A crash, a sanitizer report or an allocation beyond libFuzzer's limit (a size
// read from a damaged file and trusted) is a bug; Status errors are the expected outcome.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "spdlog/spdlog.h"
#include "storage/block_store.h"
#include "storage/posix_io.h"
#include "storage/rocksdb_store.h"

namespace kvstar::storage {
namespace {

constexpr size_t kTrailerBytes = 48;  // posix_dir_store.cc's segment trailer
constexpr size_t kIndexEntryBytes = 36;
constexpr size_t kTrailerChecksumOffset = 32;

uint64_t Little64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

void PutLittle64(uint64_t v, char* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(v >> (8 * i));
}

void Fail(const std::string& what) {
  fprintf(stderr, "block_record_fuzzer: %s\n", what.c_str());
  abort();
}

// A POSIX store with one sequence ("fuzz", metadata "m"), made once by the store itself; the
// harness then swaps files in its directory.
struct PosixFixture {
  std::string root;
  std::string sequence_dir;
};

const PosixFixture& Fixture() {
  static const PosixFixture* fixture = [] {
    spdlog::set_level(spdlog::level::off);  // every damaged block logs a line
    auto* f = new PosixFixture;
    const char* tmp = getenv("TMPDIR");
    std::string pattern = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/block_fuzz.XXXXXX");
    if (mkdtemp(pattern.data()) == nullptr) Fail("mkdtemp failed");
    f->root = pattern;
    auto store = OpenPosixDirStore(f->root);
    if (!store.ok()) Fail(store.status().ToString());
    if (!(*store)->PutSequence("fuzz", "m").ok()) Fail("PutSequence failed");
    store->reset();
    // seq/<shard>/<hex key>: find it rather than repeat the store's naming.
    FileIo* io = DefaultFileIo();
    auto shards = io->ListDirectory(f->root + "/seq");
    if (!shards.ok() || shards->size() != 1) Fail("expected one shard directory");
    const std::string shard = absl::StrCat(f->root, "/seq/", (*shards)[0]);
    auto names = io->ListDirectory(shard);
    if (!names.ok() || names->size() != 1) Fail("expected one sequence directory");
    f->sequence_dir = absl::StrCat(shard, "/", (*names)[0]);
    return f;
  }();
  return *fixture;
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  FILE* file = fopen(path.c_str(), "wb");
  if (file == nullptr) Fail("cannot write " + path);
  if (!bytes.empty()) fwrite(bytes.data(), 1, bytes.size(), file);
  fclose(file);
}

void FixSegmentChecksum(std::string* segment) {
  if (segment->size() < kTrailerBytes) return;
  char* trailer = segment->data() + segment->size() - kTrailerBytes;
  const uint64_t index_offset = Little64(trailer);
  uint32_t block_count = 0;
  for (int i = 3; i >= 0; --i)
    block_count = (block_count << 8) | static_cast<uint8_t>(trailer[8 + i]);
  const uint64_t index_bytes = uint64_t{block_count} * kIndexEntryBytes;
  const uint64_t body = segment->size() - kTrailerBytes;
  if (index_offset > body || index_bytes != body - index_offset) return;
  PutLittle64(XXH3_64bits(segment->data() + index_offset, index_bytes + kTrailerChecksumOffset),
              trailer + kTrailerChecksumOffset);
}

void OpenAndReadEverything() {
  auto store = OpenPosixDirStore(Fixture().root);
  if (!store.ok()) return;
  auto ids = (*store)->ListBlocks("fuzz");
  if (!ids.ok()) return;
  std::vector<BlockData> blocks;
  (*store)->GetBlocks("fuzz", *ids, &blocks).IgnoreError();
  (*store)->Stats();
}

void FuzzSegment(absl::string_view bytes) {
  const PosixFixture& fixture = Fixture();
  std::string segment(bytes);
  FixSegmentChecksum(&segment);
  // Generation 1 of layer 0; a batch of one segment unless the trailer says otherwise.
  const std::string path = fixture.sequence_dir + "/0000000000000001-00000000.seg";
  WriteFile(path, segment);
  OpenAndReadEverything();
  DefaultFileIo()->Unlink(path).IgnoreError();
}

void FuzzMeta(absl::string_view bytes) {
  const PosixFixture& fixture = Fixture();
  const std::string path = fixture.sequence_dir + "/meta";
  std::string saved;
  {
    FILE* file = fopen(path.c_str(), "rb");
    if (file == nullptr) Fail("no meta file");
    char buffer[256];
    size_t n;
    while ((n = fread(buffer, 1, sizeof buffer, file)) > 0) saved.append(buffer, n);
    fclose(file);
  }
  WriteFile(path, bytes);
  OpenAndReadEverything();
  WriteFile(path, saved);
}

}  // namespace
}  // namespace kvstar::storage

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvstar::storage;
  if (size == 0) return 0;
  const absl::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 3) {
    case 0: {
      BlockData out;
      const absl::Status decoded = DecodeRocksDbBlockValue("fuzz", BlockId{1, 2}, bytes, &out);
      if (decoded.ok() && out.key.size() + out.value.size() + 24 != bytes.size()) {
        Fail("a decoded block does not account for every stored byte");
      }
      break;
    }
    case 1:
      FuzzSegment(bytes);
      break;
    default:
      FuzzMeta(bytes);
      break;
  }
  return 0;
}
