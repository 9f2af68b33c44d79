#include "client/scatter_plan.h"

#include <algorithm>

namespace kvstar::client_internal {
namespace {

constexpr size_t kAlign = 16;  // the scatter kernel's vector width

// Lays runs into landing rounds. A run that does not fit the round's remaining room is split;
// splits fall on 16-byte boundaries of the landing buffer, so aligned runs stay aligned.
class Packer {
 public:
  Packer(ScatterPlan* plan, size_t capacity) : plan_(plan), capacity_(capacity) {}

  // The next run continues nothing already landed (a new span of contiguous sources).
  void StartSpan() { copy_open_ = false; }

  void Add(const CopySegment& run) {
    const char* src = static_cast<const char*>(run.src);
    char* dst = static_cast<char*>(run.dst);
    size_t left = run.bytes;
    while (left > 0) {
      if (plan_->rounds.empty() || round_full_) {
        plan_->rounds.emplace_back();
        round_full_ = false;
        copy_open_ = false;
      }
      ScatterRound& round = plan_->rounds.back();
      size_t offset = round.landing_bytes;
      if (!copy_open_) {
        const size_t residue = reinterpret_cast<uintptr_t>(src) % kAlign;
        offset = (offset + kAlign - 1) / kAlign * kAlign + residue;
        if (offset >= capacity_) {
          round_full_ = true;
          continue;
        }
      }
      const size_t take = std::min(left, capacity_ - offset);
      if (copy_open_) {
        round.copies.back().bytes += take;
      } else {
        round.copies.push_back({offset, src, take});
        copy_open_ = true;
      }
      round.pieces.push_back({dst, offset, take});
      round.landing_bytes = offset + take;
      round_full_ = round.landing_bytes == capacity_;
      src += take;
      dst += take;
      left -= take;
    }
  }

 private:
  ScatterPlan* const plan_;
  const size_t capacity_;
  bool copy_open_ = false;
  bool round_full_ = false;
};

}  // namespace

size_t ScatterPlan::scattered_bytes() const {
  size_t bytes = 0;
  for (const ScatterRound& round : rounds) {
    for (const ScatterPiece& piece : round.pieces) bytes += piece.bytes;
  }
  return bytes;
}

size_t ScatterPlan::direct_bytes() const {
  size_t bytes = 0;
  for (const CopySegment& segment : direct) bytes += segment.bytes;
  return bytes;
}

ScatterPlan PlanScatteredCopy(absl::Span<const CopySegment> segments,
                              const ScatterPlanOptions& options) {
  // Offsets and sizes in the kernel's arguments are 32-bit.
  const size_t capacity =
      std::min<size_t>(std::max<size_t>(options.landing_capacity_bytes, 64), size_t{1} << 31) /
      kAlign * kAlign;
  std::vector<CopySegment> runs;
  for (const CopySegment& segment : segments) {
    if (segment.bytes == 0) continue;
    if (!runs.empty() && static_cast<char*>(runs.back().dst) + runs.back().bytes == segment.dst &&
        static_cast<const char*>(runs.back().src) + runs.back().bytes == segment.src) {
      runs.back().bytes += segment.bytes;
      continue;
    }
    runs.push_back(segment);
  }
  ScatterPlan plan;
  Packer packer(&plan, capacity);
  auto small = [&](size_t i) { return runs[i].bytes < options.direct_min_bytes; };
  size_t begin = 0;
  while (begin < runs.size()) {
    if (!small(begin)) {
      plan.direct.push_back(runs[begin++]);
      continue;
    }
    // A span: small runs each of whose sources starts where the previous one ended.
    size_t end = begin + 1;
    while (end < runs.size() && small(end) &&
           static_cast<const char*>(runs[end - 1].src) + runs[end - 1].bytes == runs[end].src) {
      ++end;
    }
    if (end - begin == 1) {
      // Alone, landing it first would only add a device copy.
      plan.direct.push_back(runs[begin++]);
      continue;
    }
    packer.StartSpan();
    for (; begin < end; ++begin) packer.Add(runs[begin]);
  }
  for (const ScatterRound& round : plan.rounds) {
    plan.landing_bytes = std::max(plan.landing_bytes, round.landing_bytes);
  }
  return plan;
}

}  // namespace kvstar::client_internal
