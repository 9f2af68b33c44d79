#include "storage/rocksdb_store.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "rocksdb/cache.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"
#include "spdlog/spdlog.h"
#include "storage/store_util.h"

namespace kvstar::storage {
namespace {

constexpr char kBlockTag = 'B';
constexpr char kMetadataTag = 'M';
constexpr char kReclaimTag = 'R';
constexpr uint32_t kValueMagic = 0x4B565342;  // "KVSB"
constexpr uint32_t kValueFormatVersion = 1;
constexpr size_t kValueHeaderBytes = 4 + 4 + 8 + 8;
constexpr size_t kBlockKeySuffixBytes = 8;    // BE u32 layer + BE u32 block_index
constexpr size_t kReclaimKeySuffixBytes = 8;  // BE u64 drop number
// A reclaim that failed (other than by being cancelled) is tried again after this long.
constexpr absl::Duration kReclaimRetryDelay = absl::Seconds(5);

std::string SequencePrefix(char tag, absl::string_view sequence_key) {
  std::string prefix(1, tag);
  AppendBigEndian32(static_cast<uint32_t>(sequence_key.size()), &prefix);
  prefix.append(sequence_key.data(), sequence_key.size());
  return prefix;
}

// Every block key of a sequence lies in [begin, end): block keys are the prefix plus exactly
// eight bytes, all of which sort below the prefix plus nine 0xff bytes.
struct KeyRange {
  std::string begin;
  std::string end;
};
KeyRange SequenceBlockRange(absl::string_view sequence_key) {
  KeyRange range;
  range.begin = SequencePrefix(kBlockTag, sequence_key);
  range.end = range.begin + std::string(kBlockKeySuffixBytes + 1, '\xff');
  return range;
}

rocksdb::Slice ToSlice(absl::string_view s) { return rocksdb::Slice(s.data(), s.size()); }
// Debian's Abseil has its own string_view type (not std::string_view).
absl::string_view ToView(const rocksdb::Slice& s) { return absl::string_view(s.data(), s.size()); }

absl::Status FromRocksDb(const rocksdb::Status& status, absl::string_view context) {
  if (status.ok()) return absl::OkStatus();
  const std::string message = absl::StrCat(context, ": rocksdb: ", status.ToString());
  switch (status.code()) {
    case rocksdb::Status::kNotFound:
      return absl::NotFoundError(message);
    case rocksdb::Status::kCorruption:
      return absl::DataLossError(message);
    case rocksdb::Status::kInvalidArgument:
      return absl::InvalidArgumentError(message);
    case rocksdb::Status::kNotSupported:
      return absl::UnimplementedError(message);
    case rocksdb::Status::kBusy:
    case rocksdb::Status::kTimedOut:
    case rocksdb::Status::kTryAgain:
      return absl::UnavailableError(message);
    case rocksdb::Status::kAborted:
      return absl::AbortedError(message);
    case rocksdb::Status::kIOError:
      if (status.IsNoSpace()) return absl::ResourceExhaustedError(message);
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

// What the store keeps in memory about one sequence: enough for ListBlocks, Stats and
// DropResult without touching RocksDB.
struct SequenceIndex {
  std::map<BlockId, uint64_t> blocks;  // K+V bytes of each stored block
  uint64_t bytes = 0;
};

// A drop whose disk space the background reclaim has not given back yet.
struct PendingReclaim {
  std::string sequence_key;
  uint64_t bytes = 0;  // K+V bytes dropped, for Stats
};

class RocksDbStore final : public BlockStore {
 public:
  RocksDbStore(std::string dir, rocksdb::Options options, std::unique_ptr<rocksdb::DB> db)
      : dir_(std::move(dir)), options_(std::move(options)), db_(std::move(db)) {}

  // Stops the background reclaim: a compaction in progress is cancelled (RocksDB stops it within
  // a few keys), and the drops not yet reclaimed keep their markers, so the next open resumes.
  ~RocksDbStore() override {
    {
      absl::MutexLock lock(&reclaim_mu_);
      stopping_ = true;
    }
    compaction_canceled_.store(true);
    if (reclaim_thread_.joinable()) reclaim_thread_.join();
  }

  // Starts the thread that reclaims dropped sequences' space; called once, after LoadIndex.
  void StartReclaim() {
    reclaim_thread_ = std::thread([this] { ReclaimLoop(); });
  }

  // Builds the in-memory index with one scan of the whole key space. The scan reads values too
  // (RocksDB stores them inline with keys), so opening costs a sequential read of the store;
  // it bypasses the block cache so it does not evict anything.
  absl::Status LoadIndex() ABSL_LOCKS_EXCLUDED(db_mu_) {
    absl::ReaderMutexLock lock(&db_mu_);
    return LoadIndexLocked();
  }

  absl::Status PutSequence(absl::string_view sequence_key, absl::string_view metadata) override;
  absl::StatusOr<std::string> GetSequence(absl::string_view sequence_key) override;
  absl::StatusOr<std::vector<std::string>> ListSequences() override;
  absl::Status PutBlocks(absl::string_view sequence_key,
                         absl::Span<const BlockWrite> blocks) override;
  absl::Status GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                         std::vector<BlockData>* out) override;
  absl::StatusOr<std::vector<BlockId>> ListBlocks(absl::string_view sequence_key) override;
  absl::StatusOr<DropResult> DropSequence(absl::string_view sequence_key) override;
  void WaitForBackgroundWork() override ABSL_LOCKS_EXCLUDED(reclaim_mu_);
  std::vector<TierStats> Stats() override;

 private:
  // Every acknowledged mutation is synced: RocksDB's WAL write alone only reaches the OS page
  // cache, which survives kill -9 of this process but not a power loss or kernel crash. The
  // contract says an OK PutBlocks survives both, so the WAL is fsynced before we answer.
  // Concurrent sync writes are group-committed by RocksDB, which amortises the fsync.
  static rocksdb::WriteOptions SyncWrite() {
    rocksdb::WriteOptions options;
    options.sync = true;
    return options;
  }

  bool SequenceExists(absl::string_view sequence_key) ABSL_LOCKS_EXCLUDED(mu_);

  absl::Status LoadIndexLocked() ABSL_SHARED_LOCKS_REQUIRED(db_mu_);

  // Writes `batch` with SyncWrite(); `context` prefixes an error. A failed WAL write or sync
  // makes RocksDB (paranoid checks) refuse every later write, whichever sequence it is for, until
  // it resumes or is reopened; so after a failure this resumes or reopens it before answering, and
  // the store takes writes again as soon as the device does. The failed write is not retried.
  absl::Status WriteSynced(rocksdb::WriteBatch* batch, absl::string_view context)
      ABSL_LOCKS_EXCLUDED(db_mu_, mu_);
  // One db_->Write under db_mu_; IOError when db_ is closed. Sets *generation to db_'s.
  rocksdb::Status WriteOnce(rocksdb::WriteBatch* batch, uint64_t* generation)
      ABSL_LOCKS_EXCLUDED(db_mu_);
  // Makes db_ take writes again after a write of generation `failed_generation` failed: RocksDB's
  // Resume if it can, else close, reopen (replaying the WAL) and rebuild the index from the DB.
  // Nothing if another writer already did it since.
  absl::Status RecoverFromWriteError(uint64_t failed_generation) ABSL_LOCKS_EXCLUDED(db_mu_, mu_);
  // Unavailable naming the reason db_ is closed.
  absl::Status Closed() const ABSL_SHARED_LOCKS_REQUIRED(db_mu_);

  // The reclaim thread: takes every pending drop, compacts each dropped key range and deletes the
  // markers of the ranges it compacted, until the store is destroyed.
  void ReclaimLoop() ABSL_LOCKS_EXCLUDED(reclaim_mu_, db_mu_);
  // One pass over `round` (marker key -> drop). Returns the drops it could not reclaim, and in
  // *error the first failure that was not a cancellation.
  std::map<std::string, PendingReclaim> Reclaim(std::map<std::string, PendingReclaim> round,
                                                absl::Status* error)
      ABSL_LOCKS_EXCLUDED(reclaim_mu_, db_mu_);
  bool ReclaimHasWorkOrStops() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(reclaim_mu_);
  bool ReclaimIdle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(reclaim_mu_);

  const std::string dir_;
  const rocksdb::Options options_;
  // Every use of db_ holds db_mu_ shared; replacing it holds it exclusively. Taken after a
  // sequence lock and before mu_. db_ is null only after a reopen failed; the next write retries.
  mutable absl::Mutex db_mu_;
  std::unique_ptr<rocksdb::DB> db_ ABSL_GUARDED_BY(db_mu_);
  uint64_t db_generation_ ABSL_GUARDED_BY(db_mu_) = 0;
  std::string reopen_error_ ABSL_GUARDED_BY(db_mu_);
  // Held across a mutation of one sequence so RocksDB and the index change together. Taken
  // before mu_, never after.
  SequenceLockTable sequence_locks_;
  absl::Mutex mu_;
  std::map<std::string, SequenceIndex> sequences_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
  std::atomic<uint64_t> corrupt_blocks_{0};

  // Background reclaim of dropped sequences' disk space. A drop's range tombstone hides its
  // blocks at once, but their bytes stay in memtables, the WAL and table files until a compaction
  // of that range reaches the bottom level, where the tombstone and the data it covers are both
  // discarded. That compaction rewrites every table file overlapping the range (1.5 s for a 256 MiB
  // sequence under bench/load_test, during which other drops waited), so it runs here, never on
  // the caller's path. It is safe against a re-created
  // sequence of the same key: a range tombstone only covers writes older than itself, so the
  // compaction keeps every block written after the drop. reclaim_mu_ is a leaf: nothing else is
  // taken while holding it, and it is held only to move entries, never across RocksDB calls.
  absl::Mutex reclaim_mu_;
  // Drops not taken by the reclaim thread yet, by marker key.
  std::map<std::string, PendingReclaim> reclaim_pending_ ABSL_GUARDED_BY(reclaim_mu_);
  uint64_t reclaim_in_flight_bytes_ ABSL_GUARDED_BY(reclaim_mu_) = 0;
  bool reclaim_busy_ ABSL_GUARDED_BY(reclaim_mu_) = false;    // a round is running
  bool reclaim_failed_ ABSL_GUARDED_BY(reclaim_mu_) = false;  // waiting to retry after an error
  bool stopping_ ABSL_GUARDED_BY(reclaim_mu_) = false;
  // Cancels a running CompactRange: set for good by the destructor, and for a moment by a reopen
  // after a write error (which needs db_mu_ exclusively and must not wait for a long compaction).
  std::atomic<bool> compaction_canceled_{false};
  std::atomic<uint64_t> next_drop_number_{1};
  std::thread reclaim_thread_;
};

absl::Status RocksDbStore::LoadIndexLocked() {
  if (db_ == nullptr) return Closed();
  rocksdb::ReadOptions options;
  options.fill_cache = false;
  options.readahead_size = 2 << 20;
  // The scan needs keys and value sizes only. Verifying here would make one damaged block fail
  // the whole open; GetBlocks verifies every block it reads and answers DataLoss for that block.
  options.verify_checksums = false;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(options));
  std::map<std::string, SequenceIndex> sequences;
  std::map<std::string, SequenceIndex> blocks_by_sequence;
  std::map<std::string, PendingReclaim> reclaims;
  uint64_t last_drop_number = 0;
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    const bool is_block = key.size() >= 5 && key[0] == kBlockTag;
    const bool is_metadata = key.size() >= 5 && key[0] == kMetadataTag;
    const bool is_reclaim = key.size() >= 5 && key[0] == kReclaimTag;
    const uint32_t sequence_bytes = key.size() >= 5 ? ReadBigEndian32(key.data() + 1) : 0;
    const size_t expected = 5 + sequence_bytes + (is_block ? kBlockKeySuffixBytes : 0) +
                            (is_reclaim ? kReclaimKeySuffixBytes : 0);
    if ((!is_block && !is_metadata && !is_reclaim) || key.size() != expected) {
      return absl::DataLossError(absl::StrCat("rocksdb store has a malformed key \"",
                                              absl::CHexEscape(ToView(key)), "\""));
    }
    std::string sequence_key(key.data() + 5, sequence_bytes);
    if (is_metadata) {
      sequences.try_emplace(std::move(sequence_key));
      continue;
    }
    if (is_reclaim) {
      // A drop acknowledged before a crash or shutdown whose space was not reclaimed yet.
      const char* suffix = key.data() + 5 + sequence_bytes;
      const uint64_t drop_number =
          (uint64_t{ReadBigEndian32(suffix)} << 32) | ReadBigEndian32(suffix + 4);
      last_drop_number = std::max(last_drop_number, drop_number);
      const uint64_t bytes =
          it->value().size() == 8 ? ReadLittleEndian64(it->value().data()) : uint64_t{0};
      reclaims.emplace(std::string(key.data(), key.size()),
                       PendingReclaim{std::move(sequence_key), bytes});
      continue;
    }
    const char* suffix = key.data() + 5 + sequence_bytes;
    const BlockId id{ReadBigEndian32(suffix), ReadBigEndian32(suffix + 4)};
    const uint64_t stored = it->value().size();
    const uint64_t bytes = stored >= kValueHeaderBytes ? stored - kValueHeaderBytes : 0;
    SequenceIndex& index = blocks_by_sequence[sequence_key];
    index.blocks[id] = bytes;
    index.bytes += bytes;
  }
  if (!it->status().ok()) return FromRocksDb(it->status(), "scanning the store at open");
  // 'B' sorts before 'M', so blocks were seen before their metadata. Blocks without metadata
  // cannot be written (PutBlocks requires it, DropSequence removes both in one batch).
  for (auto& [sequence_key, index] : blocks_by_sequence) {
    auto found = sequences.find(sequence_key);
    if (found != sequences.end()) found->second = std::move(index);
  }
  {
    absl::MutexLock lock(&mu_);
    sequences_ = std::move(sequences);
  }
  // Drop numbers only grow (drops may run during a reopen), so a marker found is never reused.
  uint64_t next = next_drop_number_.load();
  while (next <= last_drop_number &&
         !next_drop_number_.compare_exchange_weak(next, last_drop_number + 1)) {
  }
  // After a reopen some of these may be queued or in flight already; reclaiming a range twice
  // costs a compaction that finds nothing, never data.
  absl::MutexLock lock(&reclaim_mu_);
  for (auto& [marker, reclaim] : reclaims) reclaim_pending_.try_emplace(marker, std::move(reclaim));
  return absl::OkStatus();
}

absl::Status RocksDbStore::Closed() const {
  return absl::UnavailableError(
      absl::StrCat("rocksdb store at ", dir_,
                   " is closed after a write error: reopening it failed: ", reopen_error_));
}

rocksdb::Status RocksDbStore::WriteOnce(rocksdb::WriteBatch* batch, uint64_t* generation) {
  absl::ReaderMutexLock lock(&db_mu_);
  *generation = db_generation_;
  if (db_ == nullptr) return rocksdb::Status::IOError("the store is closed after a write error");
  return db_->Write(SyncWrite(), batch);
}

absl::Status RocksDbStore::WriteSynced(rocksdb::WriteBatch* batch, absl::string_view context) {
  uint64_t generation = 0;
  bool closed = false;
  {
    absl::ReaderMutexLock lock(&db_mu_);
    closed = db_ == nullptr;
    generation = db_generation_;
  }
  if (closed) {
    // An earlier reopen failed; this write never reached the device, so it may go after one.
    absl::Status recovered = RecoverFromWriteError(generation);
    if (!recovered.ok()) {
      return absl::Status(recovered.code(), absl::StrCat(context, ": ", recovered.message()));
    }
  }
  const rocksdb::Status written = WriteOnce(batch, &generation);
  if (written.ok() || written.IsInvalidArgument()) return FromRocksDb(written, context);
  absl::Status recovered = RecoverFromWriteError(generation);
  if (!recovered.ok()) {
    spdlog::error("event=rocksdb_recovering dir={} message={}", LogValue(dir_),
                  LogValue(recovered.ToString()));
  }
  return FromRocksDb(written, context);
}

absl::Status RocksDbStore::RecoverFromWriteError(uint64_t failed_generation) {
  // A background compaction holds db_mu_ shared for as long as it runs; cancel it rather than
  // hold every reader off behind this lock meanwhile. The reclaim thread retries it afterwards.
  compaction_canceled_.store(true);
  absl::MutexLock lock(&db_mu_);
  compaction_canceled_.store(false);  // the store is not being destroyed: calls are running
  if (db_generation_ != failed_generation && db_ != nullptr) return absl::OkStatus();
  ++db_generation_;
  if (db_ != nullptr) {
    // OK when RocksDB has no background error, or could clear it in place.
    if (db_->Resume().ok()) return absl::OkStatus();
    db_->Close().PermitUncheckedError();
    db_.reset();
  }
  rocksdb::DB* raw_db = nullptr;
  const rocksdb::Status opened = rocksdb::DB::Open(options_, dir_, &raw_db);
  if (!opened.ok()) {
    reopen_error_ = opened.ToString();
    return FromRocksDb(opened, absl::StrCat("reopening rocksdb store at ", dir_));
  }
  db_.reset(raw_db);
  spdlog::warn("event=rocksdb_reopened dir={} (after a write error)", LogValue(dir_));
  // The failed write may be in the replayed WAL (written, then its sync failed): the index must
  // say what the DB holds.
  return LoadIndexLocked();
}

bool RocksDbStore::SequenceExists(absl::string_view sequence_key) {
  absl::MutexLock lock(&mu_);
  return sequences_.find(std::string(sequence_key)) != sequences_.end();
}

absl::Status RocksDbStore::PutSequence(absl::string_view sequence_key, absl::string_view metadata) {
  if (sequence_key.empty()) return absl::InvalidArgumentError("sequence key is empty");
  absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
  rocksdb::WriteBatch batch;
  absl::Status written = FromRocksDb(
      batch.Put(ToSlice(RocksDbMetadataKey(sequence_key)), ToSlice(metadata)), "batching metadata");
  if (written.ok()) {
    written =
        WriteSynced(&batch, absl::StrCat("writing metadata of ", DescribeSequence(sequence_key)));
  }
  if (!written.ok()) return written;
  absl::MutexLock lock(&mu_);
  sequences_.try_emplace(std::string(sequence_key));
  return absl::OkStatus();
}

absl::StatusOr<std::string> RocksDbStore::GetSequence(absl::string_view sequence_key) {
  std::string metadata;
  absl::ReaderMutexLock db_lock(&db_mu_);
  if (db_ == nullptr) return Closed();
  const rocksdb::Status status =
      db_->Get(rocksdb::ReadOptions(), ToSlice(RocksDbMetadataKey(sequence_key)), &metadata);
  if (status.IsNotFound()) return SequenceNotFound(sequence_key);
  if (!status.ok()) {
    return FromRocksDb(status,
                       absl::StrCat("reading metadata of ", DescribeSequence(sequence_key)));
  }
  return metadata;
}

absl::StatusOr<std::vector<std::string>> RocksDbStore::ListSequences() {
  absl::MutexLock lock(&mu_);
  return SortedSequenceKeys(sequences_);
}

absl::Status RocksDbStore::PutBlocks(absl::string_view sequence_key,
                                     absl::Span<const BlockWrite> blocks) {
  absl::Status valid = ValidateBlockWrites(sequence_key, blocks);
  if (!valid.ok()) return valid;
  absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
  if (!SequenceExists(sequence_key)) return SequenceNotFound(sequence_key);

  rocksdb::WriteBatch batch;
  std::vector<std::string> headers(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const BlockWrite& block = blocks[i];
    AppendLittleEndian32(kValueMagic, &headers[i]);
    AppendLittleEndian32(kValueFormatVersion, &headers[i]);
    AppendLittleEndian64(block.checksum, &headers[i]);
    AppendLittleEndian64(block.key.size(), &headers[i]);
    const std::string key = RocksDbBlockKey(sequence_key, block.id);
    const rocksdb::Slice key_slice = ToSlice(key);
    // SliceParts lets the batch copy header, K and V once, without assembling them first.
    const rocksdb::Slice value_parts[3] = {ToSlice(headers[i]), ToSlice(block.key),
                                           ToSlice(block.value)};
    absl::Status added = FromRocksDb(
        batch.Put(rocksdb::SliceParts(&key_slice, 1), rocksdb::SliceParts(value_parts, 3)),
        absl::StrCat("batching ", DescribeBlock(sequence_key, block.id)));
    if (!added.ok()) return added;
  }
  absl::Status written = WriteSynced(&batch, absl::StrCat("writing ", blocks.size(), " blocks of ",
                                                          DescribeSequence(sequence_key)));
  if (!written.ok()) return written;

  absl::MutexLock lock(&mu_);
  SequenceIndex& index = sequences_[std::string(sequence_key)];
  for (const BlockWrite& block : blocks) {
    uint64_t& bytes = index.blocks[block.id];
    index.bytes -= bytes;  // 0 for a new block
    bytes = block.key.size() + block.value.size();
    index.bytes += bytes;
  }
  return absl::OkStatus();
}

absl::Status RocksDbStore::GetBlocks(absl::string_view sequence_key, absl::Span<const BlockId> ids,
                                     std::vector<BlockData>* out) {
  if (!SequenceExists(sequence_key)) return SequenceNotFound(sequence_key);
  std::vector<std::string> keys;
  keys.reserve(ids.size());
  for (const BlockId& id : ids) keys.push_back(RocksDbBlockKey(sequence_key, id));
  std::vector<rocksdb::Slice> key_slices(keys.begin(), keys.end());
  std::vector<rocksdb::PinnableSlice> values(ids.size());
  std::vector<rocksdb::Status> statuses(ids.size());
  {
    absl::ReaderMutexLock db_lock(&db_mu_);
    if (db_ == nullptr) return Closed();
    db_->MultiGet(rocksdb::ReadOptions(), db_->DefaultColumnFamily(), ids.size(), key_slices.data(),
                  values.data(), statuses.data());
  }
  out->resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (statuses[i].IsNotFound()) {
      misses_.fetch_add(1, std::memory_order_relaxed);
      return BlockNotFound(sequence_key, ids[i]);
    }
    absl::Status read =
        FromRocksDb(statuses[i], absl::StrCat("reading ", DescribeBlock(sequence_key, ids[i])));
    if (read.ok())
      read = DecodeRocksDbBlockValue(sequence_key, ids[i], ToView(values[i]), &(*out)[i]);
    // RocksDB's block checksum (Corruption) or the store's own: either way the bytes are bad.
    if (absl::IsDataLoss(read)) {
      ReportCorruptBlock("rocksdb", sequence_key, ids[i], read, &corrupt_blocks_);
    }
    if (!read.ok()) return read;
  }
  hits_.fetch_add(ids.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<BlockId>> RocksDbStore::ListBlocks(absl::string_view sequence_key) {
  absl::MutexLock lock(&mu_);
  return SortedBlockIds(sequences_, sequence_key);
}

absl::StatusOr<DropResult> RocksDbStore::DropSequence(absl::string_view sequence_key) {
  absl::MutexLock sequence_lock(&sequence_locks_.For(sequence_key));
  absl::StatusOr<DropResult> result;
  {
    absl::MutexLock lock(&mu_);
    result = DropTotals(sequences_, sequence_key);
  }
  if (!result.ok()) return result;
  // One synced batch makes the drop durable: the range tombstone hides every block, the metadata
  // goes, and the marker records that the range's space is still to be reclaimed (in the
  // background, so a crash before that only delays it to the next open).
  const KeyRange range = SequenceBlockRange(sequence_key);
  const std::string marker = RocksDbReclaimMarkerKey(sequence_key, next_drop_number_.fetch_add(1));
  std::string marker_value;
  AppendLittleEndian64(result->bytes, &marker_value);
  rocksdb::WriteBatch batch;
  absl::Status batched = FromRocksDb(batch.DeleteRange(ToSlice(range.begin), ToSlice(range.end)),
                                     "batching a range delete");
  if (batched.ok()) {
    batched = FromRocksDb(batch.Delete(ToSlice(RocksDbMetadataKey(sequence_key))),
                          "batching a metadata delete");
  }
  if (batched.ok()) {
    batched =
        FromRocksDb(batch.Put(ToSlice(marker), ToSlice(marker_value)), "batching a reclaim marker");
  }
  if (!batched.ok()) return batched;
  absl::Status written =
      WriteSynced(&batch, absl::StrCat("dropping ", DescribeSequence(sequence_key)));
  if (!written.ok()) return written;
  decltype(sequences_)::node_type index;  // a big sequence's index is freed outside mu_
  {
    absl::MutexLock lock(&mu_);
    index = sequences_.extract(std::string(sequence_key));
  }
  absl::MutexLock lock(&reclaim_mu_);
  reclaim_pending_.try_emplace(marker, PendingReclaim{std::string(sequence_key), result->bytes});
  return result;
}

bool RocksDbStore::ReclaimHasWorkOrStops() const { return stopping_ || !reclaim_pending_.empty(); }

bool RocksDbStore::ReclaimIdle() const {
  return stopping_ || reclaim_failed_ || (reclaim_pending_.empty() && !reclaim_busy_);
}

void RocksDbStore::WaitForBackgroundWork() {
  absl::MutexLock lock(&reclaim_mu_);
  reclaim_mu_.Await(absl::Condition(this, &RocksDbStore::ReclaimIdle));
}

void RocksDbStore::ReclaimLoop() {
  while (true) {
    std::map<std::string, PendingReclaim> round;
    {
      absl::MutexLock lock(&reclaim_mu_);
      reclaim_mu_.Await(absl::Condition(this, &RocksDbStore::ReclaimHasWorkOrStops));
      if (stopping_) return;
      round.swap(reclaim_pending_);
      reclaim_in_flight_bytes_ = 0;
      for (const auto& entry : round) reclaim_in_flight_bytes_ += entry.second.bytes;
      reclaim_busy_ = true;
    }
    absl::Status error;
    std::map<std::string, PendingReclaim> left = Reclaim(std::move(round), &error);
    absl::MutexLock lock(&reclaim_mu_);
    reclaim_busy_ = false;
    reclaim_in_flight_bytes_ = 0;
    for (auto& [marker, reclaim] : left) reclaim_pending_.try_emplace(marker, std::move(reclaim));
    if (error.ok() || stopping_) continue;
    spdlog::warn("event=rocksdb_reclaim_failed dir={} pending={} retry_s={} message={}",
                 LogValue(dir_), reclaim_pending_.size(), absl::ToInt64Seconds(kReclaimRetryDelay),
                 LogValue(error.ToString()));
    // Lets WaitForBackgroundWork return rather than wait for a device that may stay broken.
    reclaim_failed_ = true;
    reclaim_mu_.AwaitWithTimeout(absl::Condition(&stopping_), kReclaimRetryDelay);
    reclaim_failed_ = false;
  }
}

std::map<std::string, PendingReclaim> RocksDbStore::Reclaim(
    std::map<std::string, PendingReclaim> round, absl::Status* error) {
  // Several drops of one key (dropped, created again, dropped) need one compaction: each of
  // their tombstones was written before this round began.
  std::map<std::string, std::vector<std::string>> markers_by_sequence;
  for (const auto& [marker, reclaim] : round) {
    markers_by_sequence[reclaim.sequence_key].push_back(marker);
  }
  rocksdb::CompactRangeOptions compact;
  compact.exclusive_manual_compaction = false;
  // To the bottom level, where the tombstone and the data it covers are both discarded.
  compact.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForceOptimized;
  compact.canceled = &compaction_canceled_;
  std::map<std::string, PendingReclaim> left;
  for (const auto& [sequence_key, markers] : markers_by_sequence) {
    const KeyRange range = SequenceBlockRange(sequence_key);
    const rocksdb::Slice begin = ToSlice(range.begin);
    const rocksdb::Slice end = ToSlice(range.end);
    rocksdb::Status compacted;
    bool canceled = false;
    {
      // Waits here while a reopen holds db_mu_, which resets the cancellation before it lets go.
      absl::ReaderMutexLock db_lock(&db_mu_);
      if (db_ == nullptr) {
        compacted = rocksdb::Status::IOError("the store is closed after a write error");
      } else if (compaction_canceled_.load()) {
        canceled = true;
      } else {
        compacted = db_->CompactRange(compact, &begin, &end);
        canceled = compacted.IsIncomplete() && compaction_canceled_.load();
      }
      if (!canceled && compacted.ok()) {
        // Into the memtable only, persisted by its next flush (or the close's): a marker that a
        // crash brings back costs one compaction that finds nothing to discard, while a WAL
        // record would start a fresh log file, which RocksDB preallocates (~70 MiB on disk).
        rocksdb::WriteOptions memtable_only;
        memtable_only.disableWAL = true;
        rocksdb::WriteBatch batch;
        for (const std::string& marker : markers) {
          batch.Delete(ToSlice(marker)).PermitUncheckedError();
        }
        const rocksdb::Status deleted = db_->Write(memtable_only, &batch);
        if (!deleted.ok() && error->ok()) {
          *error = FromRocksDb(deleted, "deleting reclaim markers");
        }
      }
    }
    if (!canceled && compacted.ok()) continue;
    // The markers stay: the next round (after a cancelling reopen or an error) or the next open
    // (after destruction) tries again.
    for (const std::string& marker : markers) left.emplace(marker, std::move(round[marker]));
    if (!canceled && error->ok()) {
      *error = FromRocksDb(
          compacted, absl::StrCat("compacting away dropped ", DescribeSequence(sequence_key)));
    }
  }
  return left;
}

std::vector<TierStats> RocksDbStore::Stats() {
  absl::MutexLock lock(&mu_);
  TierStats stats = CatalogStats("rocksdb", sequences_);
  stats.hits = hits_.load(std::memory_order_relaxed);
  stats.misses = misses_.load(std::memory_order_relaxed);
  stats.corrupt_blocks = corrupt_blocks_.load(std::memory_order_relaxed);
  absl::MutexLock reclaim_lock(&reclaim_mu_);
  stats.reclaim_pending_bytes = reclaim_in_flight_bytes_;
  for (const auto& entry : reclaim_pending_) stats.reclaim_pending_bytes += entry.second.bytes;
  return {stats};
}

}  // namespace

std::string RocksDbBlockKey(absl::string_view sequence_key, BlockId id) {
  std::string key = SequencePrefix(kBlockTag, sequence_key);
  AppendBigEndian32(id.layer, &key);
  AppendBigEndian32(id.block_index, &key);
  return key;
}

std::string RocksDbMetadataKey(absl::string_view sequence_key) {
  return SequencePrefix(kMetadataTag, sequence_key);
}

std::string RocksDbReclaimMarkerKey(absl::string_view sequence_key, uint64_t drop_number) {
  std::string key = SequencePrefix(kReclaimTag, sequence_key);
  AppendBigEndian32(static_cast<uint32_t>(drop_number >> 32), &key);
  AppendBigEndian32(static_cast<uint32_t>(drop_number), &key);
  return key;
}

absl::StatusOr<std::unique_ptr<BlockStore>> OpenRocksDbStoreWithEnv(const std::string& dir,
                                                                    rocksdb::Env* env) {
  rocksdb::Options options;
  options.create_if_missing = true;
  if (env != nullptr) options.env = env;
  // Corruption is never silent. RocksDB's default recovery (kPointInTimeRecovery) stops replaying
  // the WAL at the first damaged record and opens cleanly without every later record, which are
  // acknowledged, intact writes. kTolerateCorruptedTailRecords accepts only a torn last record (a
  // synced write a crash cut short, so never acknowledged) and refuses to open on any other
  // damage; paranoid checks make a failed write stop further writes instead of being skipped.
  options.wal_recovery_mode = rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;
  options.paranoid_checks = true;
  // A WAL file that is missing or shorter than its last synced size fails the open too.
  options.track_and_verify_wals_in_manifest = true;
  // KV blocks are bf16/fp16 activations: effectively incompressible, so compression would only
  // cost CPU on every flush, compaction and read.
  options.compression = rocksdb::kNoCompression;
  options.bottommost_compression = rocksdb::kDisableCompressionOption;
  // Blocks are 100s of KiB; a 64 MiB memtable holds a few hundred before a flush.
  options.write_buffer_size = 64 << 20;
  options.max_write_buffer_number = 3;
  // Keeps the space overhead of obsolete versions near 10% instead of growing with level count.
  options.level_compaction_dynamic_level_bytes = true;
  options.max_background_jobs = 2;
  options.keep_log_file_num = 4;
  rocksdb::BlockBasedTableOptions table;
  // Values are large and cached by the DRAM tier above; a small block cache holds index blocks.
  table.block_cache = rocksdb::NewLRUCache(32 << 20);
  options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  rocksdb::DB* raw_db = nullptr;
  const rocksdb::Status open_status = rocksdb::DB::Open(options, dir, &raw_db);
  if (open_status.IsCorruption()) {
    return absl::DataLossError(absl::StrCat(
        "opening rocksdb store at ", dir, ": rocksdb: ", open_status.ToString(),
        "; its write-ahead log, MANIFEST or a table file is damaged, and the store refuses to "
        "open rather than drop acknowledged writes (",
        dir, "/LOG names the file and offset)"));
  }
  absl::Status opened = FromRocksDb(open_status, absl::StrCat("opening rocksdb store at ", dir));
  if (!opened.ok()) return opened;
  auto store = std::make_unique<RocksDbStore>(dir, options, std::unique_ptr<rocksdb::DB>(raw_db));
  absl::Status loaded = store->LoadIndex();
  if (!loaded.ok()) return loaded;
  store->StartReclaim();
  return std::unique_ptr<BlockStore>(std::move(store));
}

absl::StatusOr<std::unique_ptr<BlockStore>> OpenRocksDbStore(const std::string& dir) {
  return OpenRocksDbStoreWithEnv(dir, nullptr);
}

absl::Status DecodeRocksDbBlockValue(absl::string_view sequence_key, BlockId id,
                                     absl::string_view stored, BlockData* out) {
  if (stored.size() < kValueHeaderBytes || ReadLittleEndian32(stored.data()) != kValueMagic ||
      ReadLittleEndian32(stored.data() + 4) != kValueFormatVersion ||
      ReadLittleEndian64(stored.data() + 16) > stored.size() - kValueHeaderBytes) {
    return absl::DataLossError(absl::StrCat("stored ", DescribeBlock(sequence_key, id),
                                            " has a malformed header (", stored.size(), " bytes)"));
  }
  const uint64_t checksum = ReadLittleEndian64(stored.data() + 8);
  const uint64_t key_bytes = ReadLittleEndian64(stored.data() + 16);
  const absl::string_view key = stored.substr(kValueHeaderBytes, key_bytes);
  const absl::string_view value = stored.substr(kValueHeaderBytes + key_bytes);
  absl::Status verified = VerifyStoredBlock(sequence_key, id, key, value, checksum);
  if (!verified.ok()) return verified;
  out->id = id;
  out->key.assign(key.data(), key.size());
  out->value.assign(value.data(), value.size());
  out->checksum = checksum;
  return absl::OkStatus();
}

}  // namespace kvstar::storage
