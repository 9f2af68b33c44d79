// RetrievalScheduler: the background thread that batches due sequences into one Retrieve and
// loads the replies.
#include "client/retrieval_scheduler.h"

#include <algorithm>
#include <map>
#include <string>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/channel.h"
#include "client/client_impl.h"

namespace kvstar::client_internal {

RetrievalScheduler::RetrievalScheduler(Channel* channel) : channel_(channel) {
  thread_ = std::thread([this] { Loop(); });
}

RetrievalScheduler::~RetrievalScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

namespace {

bool Holds(const std::vector<SequenceImpl*>& sequences, const SequenceImpl* sequence) {
  return std::find(sequences.begin(), sequences.end(), sequence) != sequences.end();
}

}  // namespace

void RetrievalScheduler::Submit(std::vector<SequenceImpl*> due) {
  if (due.empty()) return;
  absl::MutexLock lock(&mu_);
  // The engine overwrites a taken sequence's previous window from now on: wait until it was
  // copied out (it is as soon as the retrieval thread starts the job).
  const auto copied_out = [this, &due]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (stopping_) return true;
    for (const SequenceImpl* sequence : due) {
      if (Holds(snapshot_pending_, sequence)) return false;
    }
    return true;
  };
  mu_.Await(absl::Condition(&copied_out));
  for (SequenceImpl* sequence : due) {
    if (Holds(queue_, sequence)) {
      ++stats_.retrievals_skipped;  // still queued: it goes once, with this latest window
      continue;
    }
    queue_.push_back(sequence);
  }
}

void RetrievalScheduler::Forget(SequenceImpl* sequence) {
  absl::MutexLock lock(&mu_);
  queue_.erase(std::remove(queue_.begin(), queue_.end(), sequence), queue_.end());
  const auto released = [this, sequence]()
                            ABSL_NO_THREAD_SAFETY_ANALYSIS { return !Holds(in_flight_, sequence); };
  mu_.Await(absl::Condition(&released));
}

void RetrievalScheduler::WaitIdle() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](RetrievalScheduler* scheduler) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return scheduler->stopping_ || (scheduler->queue_.empty() && scheduler->in_flight_.empty());
      },
      this));
}

absl::Status RetrievalScheduler::TakeError() {
  absl::MutexLock lock(&mu_);
  absl::Status status = std::move(error_);
  error_ = absl::OkStatus();
  return status;
}

ClientStats RetrievalScheduler::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void RetrievalScheduler::Loop() {
  while (true) {
    std::vector<SequenceImpl*> due;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](RetrievalScheduler* scheduler) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return !scheduler->queue_.empty() || scheduler->stopping_;
          },
          this));
      if (stopping_) {
        queue_.clear();
        return;
      }
      due.swap(queue_);
      in_flight_ = due;
      snapshot_pending_ = due;
    }
    absl::Status status = Run(due);
    absl::MutexLock lock(&mu_);
    ++stats_.retrievals_completed;
    in_flight_.clear();
    snapshot_pending_.clear();
    if (!status.ok() && error_.ok()) error_ = status;
  }
}

absl::Status RetrievalScheduler::Run(const std::vector<SequenceImpl*>& due) {
  const absl::Time start = absl::Now();
  absl::Duration segment_wait, first_reply, load, call_end;
  // Counted whatever the outcome; the loop counts the retrieval completed.
  auto count_time = absl::MakeCleanup([&] {
    absl::MutexLock lock(&mu_);
    stats_.retrieve_micros += absl::ToInt64Microseconds(absl::Now() - start);
    stats_.segment_wait_micros += absl::ToInt64Microseconds(segment_wait);
    stats_.first_reply_micros += absl::ToInt64Microseconds(first_reply);
    stats_.load_micros += absl::ToInt64Microseconds(load);
    stats_.call_end_micros += absl::ToInt64Microseconds(call_end);
  });
  v1::RetrieveRequest request;
  std::map<std::string, std::pair<SequenceImpl*, std::vector<uint32_t>>> known_blocks;
  absl::Status first;
  for (SequenceImpl* sequence : due) {
    std::vector<uint32_t> known;
    v1::SequenceQueries queries;
    absl::Status status = sequence->BuildRetrieval(&queries, &known);
    if (!status.ok()) {
      if (first.ok()) first = status;
      continue;
    }
    *request.add_sequences() = std::move(queries);
    known_blocks[sequence->id()] = {sequence, std::move(known)};
  }
  {
    absl::MutexLock lock(&mu_);
    snapshot_pending_.clear();
    ++stats_.retrievals_sent;
  }
  if (request.sequences_size() == 0) return first;
  // The engine goes on meanwhile: what follows may wait for the server and the device.
  absl::StatusOr<std::shared_ptr<const BlockDataPlane>> chosen =
      channel_->DataPlaneForRetrieval(/*ask_again=*/false);
  if (!chosen.ok()) return chosen.status();
  std::shared_ptr<const BlockDataPlane> plane = *std::move(chosen);
  // The server reuses a sequence's regions as soon as its next Retrieve arrives.
  const absl::Time wait_start = absl::Now();
  {
    v1::RetrieveRequest ready;
    for (v1::SequenceQueries& part : *request.mutable_sequences()) {
      SequenceImpl* sequence = known_blocks.at(part.sequence_id()).first;
      if (absl::Status status = sequence->WaitSegmentReads(); !status.ok()) {
        if (first.ok()) first = status;
        known_blocks.erase(part.sequence_id());
        continue;
      }
      part.set_shared_memory(plane->wants_shared_memory());
      *ready.add_sequences() = std::move(part);
    }
    request = std::move(ready);
  }
  segment_wait = absl::Now() - wait_start;
  if (request.sequences_size() == 0) return first;
  bool segment_checked = false;  // re-resolved after a reply named an unknown segment
  grpc::ClientContext context;
  channel_->PrepareContext(&context);
  const absl::Time call_start = absl::Now();
  std::unique_ptr<grpc::ClientReader<v1::RetrieveResponse>> reader =
      channel_->stub()->Retrieve(&context, request);
  // A layer may come as several replies (`more`); its new blocks add up until the last one.
  std::map<std::pair<std::string, uint32_t>, std::vector<v1::Block>> partial;
  v1::RetrieveResponse reply;
  // Each Read starts where the previous reply's handling ended; the last one, which finds the
  // stream's end, starts the call's end.
  absl::Time read_start;
  for (read_start = absl::Now(); reader->Read(&reply); read_start = absl::Now()) {
    if (first_reply == absl::ZeroDuration()) first_reply = absl::Now() - call_start;
    {
      absl::MutexLock lock(&mu_);
      ++stats_.retrieve_replies;
    }
    auto found = known_blocks.find(reply.sequence_id());
    if (found == known_blocks.end()) {
      if (first.ok()) {
        first = absl::InternalError(
            absl::StrCat("Retrieve reply for sequence ", reply.sequence_id(), " not asked for"));
      }
      continue;
    }
    const uint32_t layer = reply.selection().layer();
    std::vector<v1::Block>& data = partial[{reply.sequence_id(), layer}];
    uint64_t shared_blocks = 0;
    for (v1::Block& block : *reply.mutable_new_blocks()) {
      if (block.has_shared()) {
        ++shared_blocks;
        // A server restarted on the same address (the channel reconnects by itself) has a new
        // segment: map it.
        if (!segment_checked && !plane->Readable(block)) {
          segment_checked = true;
          absl::StatusOr<std::shared_ptr<const BlockDataPlane>> again =
              channel_->DataPlaneForRetrieval(/*ask_again=*/true);
          if (again.ok()) plane = *std::move(again);
        }
      }
      data.push_back(std::move(block));
    }
    {
      absl::MutexLock lock(&mu_);
      stats_.blocks_received_shared += shared_blocks;
      stats_.blocks_received_bytes += reply.new_blocks_size() - shared_blocks;
    }
    if (reply.more()) continue;
    SequenceImpl* sequence = found->second.first;
    const std::vector<uint32_t>& known = found->second.second;
    std::vector<uint32_t> blocks(reply.selection().block_indices().begin(),
                                 reply.selection().block_indices().end());
    const absl::Time load_start = absl::Now();
    absl::Status status =
        sequence->LoadSelection(layer, std::move(blocks), layer < known.size() ? known[layer] : 0,
                                reply.decode_step(), std::move(data), plane);
    load += absl::Now() - load_start;
    partial.erase({reply.sequence_id(), layer});
    if (!status.ok() && first.ok()) first = status;
  }
  absl::Status status = FromGrpc(reader->Finish(), "Retrieve");
  call_end = absl::Now() - read_start;
  return status.ok() ? first : status;
}

}  // namespace kvstar::client_internal
