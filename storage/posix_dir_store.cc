#include "storage/posix_dir_store.h"

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "storage/store_util.h"

namespace kvstar::storage {
namespace {

constexpr uint32_t kMetaMagic = 0x4B56534D;  // "KVSM"
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kMetaHeaderBytes = 4 + 4 + 8;
constexpr uint64_t kSegmentMagic = 0x4B56535345474D31;  // "KVSSEGM1"
constexpr size_t kIndexEntryBytes = 4 + 8 + 8 + 8 + 8;
// index_offset u64, block_count u32, layer u32, generation u64, batch_segments u32,
// format_version u32, index_checksum u64, magic u64.
constexpr size_t kTrailerBytes = 8 + 4 + 4 + 8 + 4 + 4 + 8 + 8;
constexpr size_t kTrailerChecksumOffset = 32;  // index checksum covers entries + trailer[0, 32)
constexpr absl::string_view kSegmentSuffix = ".seg";
constexpr absl::string_view kMetaFileName = "meta";
constexpr size_t kMaxSequenceKeyBytes = 127;

struct Segment {
  std::string path;
  uint64_t generation = 0;
  uint32_t live_blocks = 0;  // blocks whose current copy lives here
};

struct BlockLocation {
  std::shared_ptr<Segment> segment;
  uint64_t offset = 0;
  uint64_t key_bytes = 0;
  uint64_t value_bytes = 0;
  uint64_t checksum = 0;
};

struct Sequence {
  std::string dir;
  std::string metadata;
  std::map<BlockId, BlockLocation> blocks;
  uint64_t bytes = 0;
};

// One block's entry in a segment's index.
struct SegmentEntry {
  uint32_t block_index = 0;
  BlockLocation location;  // without segment
};

struct SegmentIndex {
  uint32_t layer = 0;
  uint64_t generation = 0;
  uint32_t batch_segments = 0;
  std::vector<SegmentEntry> entries;
};

std::string SegmentFileName(uint64_t generation, uint32_t layer) {
  return absl::StrFormat("%016x-%08x%s", generation, layer, kSegmentSuffix);
}

// The index and trailer written after a segment's block bytes.
std::string EncodeSegmentIndex(const std::vector<const BlockWrite*>& blocks, uint32_t layer,
                               uint64_t generation, uint32_t batch_segments) {
  std::string encoded;
  uint64_t offset = 0;
  for (const BlockWrite* block : blocks) {
    AppendLittleEndian32(block->id.block_index, &encoded);
    AppendLittleEndian64(offset, &encoded);
    AppendLittleEndian64(block->key.size(), &encoded);
    AppendLittleEndian64(block->value.size(), &encoded);
    AppendLittleEndian64(block->checksum, &encoded);
    offset += block->key.size() + block->value.size();
  }
  AppendLittleEndian64(offset, &encoded);  // the index starts where the block bytes end
  AppendLittleEndian32(static_cast<uint32_t>(blocks.size()), &encoded);
  AppendLittleEndian32(layer, &encoded);
  AppendLittleEndian64(generation, &encoded);
  AppendLittleEndian32(batch_segments, &encoded);
  AppendLittleEndian32(kFormatVersion, &encoded);
  AppendLittleEndian64(XXH3_64bits(encoded.data(), encoded.size()), &encoded);
  AppendLittleEndian64(kSegmentMagic, &encoded);
  return encoded;
}

absl::Status MalformedSegment(const std::string& path, absl::string_view why) {
  return absl::DataLossError(absl::StrCat("segment file ", path, " is malformed: ", why));
}

absl::StatusOr<SegmentIndex> ReadSegmentIndex(FileIo* io, const std::string& path) {
  absl::StatusOr<int> fd = io->OpenForRead(path);
  if (!fd.ok()) return fd.status();
  ScopedFd file(io, *fd);
  absl::StatusOr<uint64_t> size = io->FileSize(file.get());
  if (!size.ok()) return size.status();
  if (*size < kTrailerBytes) return MalformedSegment(path, "shorter than its trailer");
  std::string trailer(kTrailerBytes, '\0');
  absl::Status read = io->ReadAt(file.get(), *size - kTrailerBytes, kTrailerBytes, trailer.data());
  if (!read.ok()) return read;
  const char* t = trailer.data();
  if (ReadLittleEndian64(t + 40) != kSegmentMagic) return MalformedSegment(path, "bad magic");
  if (ReadLittleEndian32(t + 28) != kFormatVersion) {
    return MalformedSegment(path, "unknown format version");
  }
  const uint64_t index_offset = ReadLittleEndian64(t);
  const uint32_t block_count = ReadLittleEndian32(t + 8);
  // Checked without sums of stored values, which a damaged trailer could make wrap around.
  const uint64_t index_bytes = uint64_t{block_count} * kIndexEntryBytes;
  if (index_bytes > *size - kTrailerBytes || index_offset != *size - kTrailerBytes - index_bytes) {
    return MalformedSegment(path, "index size does not match file size");
  }
  std::string index(index_bytes + kTrailerChecksumOffset, '\0');
  read = io->ReadAt(file.get(), index_offset, index.size(), index.data());
  if (!read.ok()) return read;
  if (XXH3_64bits(index.data(), index.size()) != ReadLittleEndian64(t + kTrailerChecksumOffset)) {
    return MalformedSegment(path, "index checksum mismatch");
  }
  SegmentIndex result;
  result.layer = ReadLittleEndian32(t + 12);
  result.generation = ReadLittleEndian64(t + 16);
  result.batch_segments = ReadLittleEndian32(t + 24);
  for (uint32_t i = 0; i < block_count; ++i) {
    const char* e = index.data() + i * kIndexEntryBytes;
    SegmentEntry entry;
    entry.block_index = ReadLittleEndian32(e);
    entry.location.offset = ReadLittleEndian64(e + 4);
    entry.location.key_bytes = ReadLittleEndian64(e + 12);
    entry.location.value_bytes = ReadLittleEndian64(e + 20);
    entry.location.checksum = ReadLittleEndian64(e + 28);
    // Each length on its own: their sum could wrap around and pass (a fuzzer found it).
    const BlockLocation& location = entry.location;
    if (location.offset > index_offset || location.key_bytes > index_offset - location.offset ||
        location.value_bytes > index_offset - location.offset - location.key_bytes) {
      return MalformedSegment(path, "block extends past the index");
    }
    result.entries.push_back(std::move(entry));
  }
  return result;
}

std::string EncodeMeta(absl::string_view metadata) {
  std::string header;
  AppendLittleEndian32(kMetaMagic, &header);
  AppendLittleEndian32(kFormatVersion, &header);
  AppendLittleEndian64(XXH3_64bits(metadata.data(), metadata.size()), &header);
  return header;
}

absl::StatusOr<std::string> ReadMeta(FileIo* io, const std::string& path) {
  absl::StatusOr<std::string> contents = ReadWholeFile(io, path);
  if (!contents.ok()) return contents.status();
  const absl::string_view bytes = *contents;
  if (bytes.size() < kMetaHeaderBytes || ReadLittleEndian32(bytes.data()) != kMetaMagic ||
      ReadLittleEndian32(bytes.data() + 4) != kFormatVersion) {
    return absl::DataLossError(absl::StrCat("metadata file ", path, " has a malformed header"));
  }
  const absl::string_view metadata = bytes.substr(kMetaHeaderBytes);
  if (XXH3_64bits(metadata.data(), metadata.size()) != ReadLittleEndian64(bytes.data() + 8)) {
    return absl::DataLossError(absl::StrCat("metadata file ", path, " fails its checksum"));
  }
  return std::string(metadata);
}

// Makes `location` the current copy of `id`; returns the path of a segment left with no current
// block, which the caller deletes, or "".
std::string InstallBlock(Sequence* sequence, BlockId id, BlockLocation location) {
  std::string obsolete;
  location.segment->live_blocks++;
  sequence->bytes += location.key_bytes + location.value_bytes;
  auto [it, inserted] = sequence->blocks.try_emplace(id, location);
  if (!inserted) {
    BlockLocation& old = it->second;
    sequence->bytes -= old.key_bytes + old.value_bytes;
    if (--old.segment->live_blocks == 0) obsolete = old.segment->path;
    old = std::move(location);
  }
  return obsolete;
}

class PosixDirStore final : public BlockStore {
 public:
  PosixDirStore(std::string root, FileIo* io) : root_(std::move(root)), io_(io) {}

  absl::Status Load();

  absl::Status PutSequence(absl::string_view sequence_key, absl::string_view metadata) override;
  absl::StatusOr<std::string> GetSequence(absl::string_view sequence_key) override;
  absl::StatusOr<std::vector<std::string>> ListSequences() override;
  absl::Status PutBlocks(absl::string_view sequence_key,
                         absl::Span<const BlockWrite> blocks) override;
  absl::Status GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                         std::vector<BlockData>* out) override;
  absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view sequence_key) override;
  absl::StatusOr<DropResult> DropSequence(absl::string_view sequence_key) override;
  std::vector<TierStats> Stats() override;

 private:
  // One block read planned under the lock and performed without it.
  struct PlannedRead {
    size_t output_index;
    BlockLocation location;
  };

  std::string SequencesDir() const { return root_ + "/seq"; }
  std::string TrashDir() const { return root_ + "/trash"; }
  std::string ShardDir(absl::string_view sequence_key) const {
    return absl::StrFormat("%s/%02x", SequencesDir(),
                           XXH3_64bits(sequence_key.data(), sequence_key.size()) & 0xff);
  }
  std::string SequenceDir(absl::string_view sequence_key) const {
    return absl::StrCat(ShardDir(sequence_key), "/", absl::BytesToHexString(sequence_key));
  }

  // Rebuilds one sequence from its directory, removing debris a crash left behind.
  absl::Status LoadSequence(const std::string& dir, const std::string& sequence_key);
  // Removes files; failures only leave garbage that the next open removes.
  void RemoveFiles(const std::vector<std::string>& paths);
  // One pass of GetBlocks. NotFound from opening a segment means it was superseded or dropped
  // between planning and reading; *retry is set and the caller plans again.
  absl::Status TryGetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                            std::vector<BlockData>* out, bool* retry);

  const std::string root_;
  FileIo* const io_;
  std::atomic<uint64_t> next_generation_{1};
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
  std::atomic<uint64_t> corrupt_blocks_{0};
  // Held across a mutation of one sequence, so generations of one sequence are installed in
  // increasing order and a drop never interleaves with a write. Taken before mu_, never after.
  SequenceLockTable sequence_locks_;
  absl::Mutex mu_;
  std::map<std::string, Sequence> sequences_ ABSL_GUARDED_BY(mu_);
};

absl::Status PosixDirStore::Load() {
  for (const std::string& dir : {root_, SequencesDir(), TrashDir()}) {
    absl::Status made = io_->MakeDirectory(dir);
    if (!made.ok()) return made;
  }
  // Finish drops a crash interrupted.
  absl::StatusOr<std::vector<std::string>> trash = io_->ListDirectory(TrashDir());
  if (!trash.ok()) return trash.status();
  for (const std::string& name : *trash) {
    absl::Status removed = io_->RemoveTree(absl::StrCat(TrashDir(), "/", name));
    if (!removed.ok()) return removed;
  }
  absl::StatusOr<std::vector<std::string>> shards = io_->ListDirectory(SequencesDir());
  if (!shards.ok()) return shards.status();
  for (const std::string& shard : *shards) {
    const std::string shard_dir = absl::StrCat(SequencesDir(), "/", shard);
    absl::StatusOr<bool> is_directory = io_->IsDirectory(shard_dir);
    if (!is_directory.ok()) return is_directory.status();
    if (!*is_directory) continue;
    absl::StatusOr<std::vector<std::string>> names = io_->ListDirectory(shard_dir);
    if (!names.ok()) return names.status();
    for (const std::string& name : *names) {
      const std::string dir = absl::StrCat(shard_dir, "/", name);
      const std::string sequence_key = absl::HexStringToBytes(name);
      if (absl::StartsWith(name, kTempFilePrefix) || absl::BytesToHexString(sequence_key) != name ||
          SequenceDir(sequence_key) != dir) {
        continue;  // not ours
      }
      absl::Status loaded = LoadSequence(dir, sequence_key);
      if (!loaded.ok()) return loaded;
    }
  }
  return absl::OkStatus();
}

absl::Status PosixDirStore::LoadSequence(const std::string& dir, const std::string& sequence_key) {
  absl::StatusOr<std::vector<std::string>> names = io_->ListDirectory(dir);
  if (!names.ok()) return names.status();
  bool has_meta = false;
  std::vector<std::string> garbage;
  std::map<uint64_t, std::vector<std::pair<std::string, SegmentIndex>>> batches;
  for (const std::string& name : *names) {
    const std::string path = absl::StrCat(dir, "/", name);
    if (absl::StartsWith(name, kTempFilePrefix)) {
      garbage.push_back(path);  // a write that crashed before its rename: never acknowledged
    } else if (name == kMetaFileName) {
      has_meta = true;
    } else if (absl::EndsWith(name, kSegmentSuffix)) {
      absl::StatusOr<SegmentIndex> index = ReadSegmentIndex(io_, path);
      if (!index.ok()) return index.status();
      const uint64_t generation = index->generation;
      batches[generation].emplace_back(path, *std::move(index));
    }
  }
  if (!has_meta) {
    // A PutSequence that crashed before publishing its metadata; nothing in it was acknowledged.
    return io_->RemoveTree(dir);
  }
  absl::StatusOr<std::string> metadata = ReadMeta(io_, absl::StrCat(dir, "/", kMetaFileName));
  if (!metadata.ok()) return metadata.status();

  Sequence sequence;
  sequence.dir = dir;
  sequence.metadata = *std::move(metadata);
  std::vector<std::shared_ptr<Segment>> segments;
  for (auto& [generation, batch] : batches) {  // oldest first, so newer copies win
    if (generation >= next_generation_.load())
      next_generation_.store(generation + 1);  // open is single-threaded
    if (batch.size() != batch.front().second.batch_segments) {
      // A batch a crash cut short between renames: it was never acknowledged, drop it whole.
      for (const auto& file : batch) garbage.push_back(file.first);
      continue;
    }
    for (auto& [path, index] : batch) {
      auto segment = std::make_shared<Segment>();
      segment->path = path;
      segment->generation = generation;
      segments.push_back(segment);
      for (SegmentEntry& entry : index.entries) {
        entry.location.segment = segment;
        InstallBlock(&sequence, BlockId{index.layer, entry.block_index}, std::move(entry.location));
      }
    }
  }
  for (const auto& segment : segments) {
    if (segment->live_blocks == 0) garbage.push_back(segment->path);
  }
  RemoveFiles(garbage);
  absl::MutexLock lock(&mu_);
  sequences_[sequence_key] = std::move(sequence);
  return absl::OkStatus();
}

void PosixDirStore::RemoveFiles(const std::vector<std::string>& paths) {
  for (const std::string& path : paths) io_->Unlink(path).IgnoreError();
}

absl::Status PosixDirStore::PutSequence(absl::string_view sequence_key,
                                        absl::string_view metadata) {
  if (sequence_key.empty()) return absl::InvalidArgumentError("sequence key is empty");
  if (sequence_key.size() > kMaxSequenceKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(DescribeSequence(sequence_key), " is ", sequence_key.size(),
                     " bytes; the directory store allows at most ", kMaxSequenceKeyBytes));
  }
  absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
  const std::string shard_dir = ShardDir(sequence_key);
  const std::string dir = SequenceDir(sequence_key);
  absl::Status status = io_->MakeDirectory(shard_dir);
  if (status.ok()) status = io_->MakeDirectory(dir);
  const std::string header = EncodeMeta(metadata);
  const absl::string_view pieces[] = {header, metadata};
  if (status.ok()) status = WriteFileAtomically(io_, dir, std::string(kMetaFileName), pieces);
  // The rename, the sequence directory and the shard directory must all reach the disk.
  for (const std::string& parent : {dir, shard_dir, SequencesDir()}) {
    if (status.ok()) status = io_->SyncDirectory(parent);
  }
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("writing metadata of ", DescribeSequence(sequence_key), ": ",
                                     status.message()));
  }
  absl::MutexLock lock(&mu_);
  Sequence& sequence = sequences_[std::string(sequence_key)];
  sequence.dir = dir;
  sequence.metadata = std::string(metadata);
  return absl::OkStatus();
}

absl::StatusOr<std::string> PosixDirStore::GetSequence(absl::string_view sequence_key) {
  absl::MutexLock lock(&mu_);
  auto found = sequences_.find(std::string(sequence_key));
  if (found == sequences_.end()) return SequenceNotFound(sequence_key);
  return found->second.metadata;
}

absl::StatusOr<std::vector<std::string>> PosixDirStore::ListSequences() {
  absl::MutexLock lock(&mu_);
  return SortedSequenceKeys(sequences_);
}

absl::Status PosixDirStore::PutBlocks(absl::string_view sequence_key,
                                      absl::Span<const BlockWrite> blocks) {
  absl::Status status = ValidateBlockWrites(sequence_key, blocks);
  if (!status.ok()) return status;
  absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
  std::string dir;
  {
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(std::string(sequence_key));
    if (found == sequences_.end()) return SequenceNotFound(sequence_key);
    dir = found->second.dir;
  }
  if (blocks.empty()) return absl::OkStatus();

  std::map<uint32_t, std::vector<const BlockWrite*>> by_layer;
  for (const BlockWrite& block : blocks) by_layer[block.id.layer].push_back(&block);
  const uint64_t generation = next_generation_.fetch_add(1);
  std::vector<std::string> published;
  for (const auto& [layer, layer_blocks] : by_layer) {
    const std::string index =
        EncodeSegmentIndex(layer_blocks, layer, generation, static_cast<uint32_t>(by_layer.size()));
    std::vector<absl::string_view> pieces;
    pieces.reserve(2 * layer_blocks.size() + 1);
    for (const BlockWrite* block : layer_blocks) {
      pieces.push_back(block->key);
      pieces.push_back(block->value);
    }
    pieces.push_back(index);
    const std::string name = SegmentFileName(generation, layer);
    status = WriteFileAtomically(io_, dir, name, pieces);
    if (!status.ok()) break;
    published.push_back(absl::StrCat(dir, "/", name));
  }
  if (status.ok()) status = io_->SyncDirectory(dir);
  if (!status.ok()) {
    // Not acknowledged: take back what was published (a crash instead leaves an incomplete
    // batch, which the next open discards).
    RemoveFiles(published);
    return absl::Status(status.code(),
                        absl::StrCat("writing ", blocks.size(), " blocks of ",
                                     DescribeSequence(sequence_key), ": ", status.message()));
  }

  std::vector<std::string> obsolete;
  {
    absl::MutexLock lock(&mu_);
    Sequence& sequence = sequences_[std::string(sequence_key)];
    size_t next_path = 0;
    for (const auto& [layer, layer_blocks] : by_layer) {
      auto segment = std::make_shared<Segment>();
      segment->path = published[next_path++];
      segment->generation = generation;
      uint64_t offset = 0;
      for (const BlockWrite* block : layer_blocks) {
        BlockLocation location{segment, offset, block->key.size(), block->value.size(),
                               block->checksum};
        offset += block->key.size() + block->value.size();
        std::string emptied = InstallBlock(&sequence, block->id, std::move(location));
        if (!emptied.empty()) obsolete.push_back(std::move(emptied));
      }
    }
  }
  // After the new segments are durable; a crash before this leaves superseded segments that the
  // next open deletes.
  RemoveFiles(obsolete);
  return absl::OkStatus();
}

absl::Status PosixDirStore::GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                      std::vector<BlockData>* out) {
  constexpr int kAttempts = 3;
  absl::Status status;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    bool retry = false;
    status = TryGetBlocks(sequence_key, ids, out, &retry);
    if (!retry) break;
  }
  return status;
}

absl::Status PosixDirStore::TryGetBlocks(absl::string_view sequence_key,
                                         absl::Span<const BlockId> ids, std::vector<BlockData>* out,
                                         bool* retry) {
  // Plan under the lock: which file and offset holds each block, grouped by segment.
  std::map<std::string, std::vector<PlannedRead>> reads_by_segment;
  {
    absl::MutexLock lock(&mu_);
    auto found = sequences_.find(std::string(sequence_key));
    if (found == sequences_.end()) return SequenceNotFound(sequence_key);
    for (size_t i = 0; i < ids.size(); ++i) {
      auto block = found->second.blocks.find(ids[i]);
      if (block == found->second.blocks.end()) {
        misses_.fetch_add(1, std::memory_order_relaxed);
        return BlockNotFound(sequence_key, ids[i]);
      }
      reads_by_segment[block->second.segment->path].push_back({i, block->second});
    }
  }
  // Read without it: each segment opened once, its blocks read in file order.
  out->resize(ids.size());
  for (auto& [path, reads] : reads_by_segment) {
    absl::StatusOr<int> fd = io_->OpenForRead(path);
    if (absl::IsNotFound(fd.status())) *retry = true;
    if (!fd.ok()) return fd.status();
    ScopedFd file(io_, *fd);
    std::sort(reads.begin(), reads.end(), [](const PlannedRead& a, const PlannedRead& b) {
      return a.location.offset < b.location.offset;
    });
    for (const PlannedRead& read : reads) {
      const BlockLocation& location = read.location;
      BlockData& block = (*out)[read.output_index];
      block.id = ids[read.output_index];
      block.checksum = location.checksum;
      block.key.resize(location.key_bytes);
      block.value.resize(location.value_bytes);
      absl::Status status =
          io_->ReadAt(file.get(), location.offset, location.key_bytes, block.key.data());
      if (status.ok()) {
        status = io_->ReadAt(file.get(), location.offset + location.key_bytes, location.value_bytes,
                             block.value.data());
      }
      if (status.ok()) {
        status =
            VerifyStoredBlock(sequence_key, block.id, block.key, block.value, location.checksum);
      }
      // A checksum mismatch, or a segment shorter than its index says.
      if (absl::IsDataLoss(status)) {
        ReportCorruptBlock("nfs", sequence_key, block.id, status, &corrupt_blocks_);
      }
      if (!status.ok()) return status;
    }
  }
  hits_.fetch_add(ids.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<BlockId>> PosixDirStore::ListBlocks(absl::string_view sequence_key) {
  absl::MutexLock lock(&mu_);
  return SortedBlockIds(sequences_, sequence_key);
}

absl::StatusOr<DropResult> PosixDirStore::DropSequence(absl::string_view sequence_key) {
  absl::StatusOr<DropResult> result;
  std::string trash;
  decltype(sequences_)::node_type index;  // a big sequence's index is freed outside mu_
  {
    absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
    {
      absl::MutexLock lock(&mu_);
      result = DropTotals(sequences_, sequence_key);
    }
    if (!result.ok()) return result;
    // Nothing else changes the sequence while its lock is held, so its directory is stable.
    const std::string dir = SequenceDir(sequence_key);
    // One rename makes the drop atomic: a crash leaves either the whole sequence or a trash entry
    // that the next open finishes deleting.
    trash = absl::StrCat(TrashDir(), "/", next_generation_.fetch_add(1), "-",
                         absl::BytesToHexString(sequence_key));
    absl::Status status = io_->Rename(dir, trash);
    if (status.ok()) status = io_->SyncDirectory(ShardDir(sequence_key));
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat("dropping ", DescribeSequence(sequence_key),
                                                      ": ", status.message()));
    }
    absl::MutexLock lock(&mu_);
    index = sequences_.extract(std::string(sequence_key));
  }
  // The trash entry's name is unique and no call reaches it, so its files are deleted without the
  // sequence's lock (a stripe other sequences share, held for as long as thousands of unlinks take
  // on NFS); the key can be created again meanwhile.
  absl::Status status = io_->RemoveTree(trash);
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat(DescribeSequence(sequence_key),
                                     " is dropped but its files were not all removed (the next "
                                     "open retries): ",
                                     status.message()));
  }
  return result;
}

std::vector<TierStats> PosixDirStore::Stats() {
  absl::MutexLock lock(&mu_);
  TierStats stats = CatalogStats("nfs", sequences_);
  stats.hits = hits_.load(std::memory_order_relaxed);
  stats.misses = misses_.load(std::memory_order_relaxed);
  stats.corrupt_blocks = corrupt_blocks_.load(std::memory_order_relaxed);
  return {stats};
}

}  // namespace

absl::StatusOr<std::unique_ptr<BlockStore>> OpenPosixDirStoreWithIo(const std::string& dir,
                                                                    FileIo* io) {
  auto store = std::make_unique<PosixDirStore>(dir, io);
  absl::Status loaded = store->Load();
  if (!loaded.ok()) return loaded;
  return std::unique_ptr<BlockStore>(std::move(store));
}

absl::StatusOr<std::unique_ptr<BlockStore>> OpenPosixDirStore(const std::string& dir) {
  return OpenPosixDirStoreWithIo(dir, DefaultFileIo());
}

}  // namespace kvstar::storage
