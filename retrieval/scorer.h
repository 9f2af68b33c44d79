// Fused block scoring: one pass over a (layer, KV head) representation with an online softmax.
#ifndef KVSTAR_RETRIEVAL_SCORER_H_
#define KVSTAR_RETRIEVAL_SCORER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "hwy/aligned_allocator.h"
#include "retrieval/representation.h"

namespace kvstar::retrieval {

// Reusable working memory of the scorer; one per thread. Not thread-safe.
class ScoreScratch {
 public:
  // Returns at least `floats` floats, 64-byte aligned; contents unspecified.
  float* Get(size_t floats);

 private:
  hwy::AlignedFreeUniquePtr<float[]> buffer_;
  size_t capacity_ = 0;
};

// Scores the blocks of (layer, kv_head) against the g query heads of kv_head:
// S = Q R^T / sqrt(head_dim) over all n*M representation vectors, softmax per query row,
// head_scores[b] = sum over rows and over block b's M vectors of the probabilities (with
// knobs().block_vote kMax: the largest over rows of that row's sum over block b's M vectors).
// `queries`: [num_queries][num_q_heads][head_dim] in the index's dtype.
// REQUIRES: the layer is sealed, queries has shape().query_bytes(num_queries) bytes,
// head_scores.size() == num_blocks(layer). Fused: each representation row is read once and
// dotted with every query row in registers; the score matrix is never materialised. Split into
// ChunksPerHead(num_blocks) chunks exactly as Retriever does, so the scores are bit-identical.
// Allocates. Thread-safe for concurrent calls with distinct scratch.
void ScoreKvHead(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                 absl::Span<const uint8_t> queries, uint32_t num_queries,
                 absl::Span<float> head_scores, ScoreScratch& scratch);

// Split-K scoring, for spreading one (layer, KV head) over several threads. Its blocks are cut
// into `num_chunks` chunks of whole groups of kBlocksPerGroup blocks (balanced). ScoreChunk scans
// one chunk with its own online softmax per query row (reference max, denominator, per-block
// numerators relative to that max) into the head's partials buffer; chunks may run on any
// thread in any order. When every chunk is done, MergeChunks rescales them to each row's common
// max and writes the head's scores. The result depends on num_chunks (rounding only), never on
// which thread ran which chunk.

// Chunks of a head of num_blocks blocks: at least kMinGroupsPerChunk groups each (so a chunk
// amortises its setup), at most kMaxChunksPerHead. Depends on num_blocks only, so scores do not
// depend on the number of threads.
inline constexpr uint32_t kMinGroupsPerChunk = 4;
inline constexpr uint32_t kMaxChunksPerHead = 4;
uint32_t ChunksPerHead(uint32_t num_blocks);

// Query rows of one KV head: num_queries * group size.
size_t NumQueryRows(const SequenceIndex& index, uint32_t num_queries);
// Floats of one head's gathered queries: the rows [NumQueryRows][kept()], their norms, and the
// rows as bf16 pairs and int8 quads for the x86 paths (internal::GatheredLayout).
size_t GatheredQueryFloats(const SequenceIndex& index, uint32_t num_queries);

// Gathers kv_head's query rows on its kept channels, pre-scaled for the scorer, and their L2
// norms into `gathered` (GatheredQueryFloats floats), once per head for all its chunks.
// REQUIRES: as ScoreKvHead. Thread-safe.
void GatherHeadQueries(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                       absl::Span<const uint8_t> queries, uint32_t num_queries,
                       absl::Span<float> gathered);

// Floats of one head's partials buffer (a multiple of 16, so consecutive buffers of a 64-byte
// aligned array stay 64-byte aligned).
size_t HeadPartialsFloats(uint32_t num_blocks, size_t num_rows, uint32_t num_chunks);

// Scans chunk `chunk` (< num_chunks <= groups) of (layer, kv_head) into its part of `partials`
// (HeadPartialsFloats floats, 64-byte aligned, shared by the head's chunks: each writes only its
// own part). `gathered`: from GatherHeadQueries. Thread-safe for distinct chunks and scratch.
void ScoreChunk(const SequenceIndex& index, uint32_t layer, uint32_t kv_head,
                absl::Span<const float> gathered, size_t num_rows, uint32_t chunk,
                uint32_t num_chunks, absl::Span<float> partials, ScoreScratch& scratch);

// Merges the num_chunks chunks of `partials` (all scored) into head_scores (num_blocks floats);
// merges in chunk order, so the result does not depend on the order the chunks ran in.
// vote kSum adds the rows' shares of each block (head_scores[b] = sum over rows), kMax keeps the
// largest (max over rows).
void MergeChunks(uint32_t num_blocks, size_t num_rows, uint32_t num_chunks,
                 absl::Span<const float> partials, absl::Span<float> head_scores,
                 ScoreScratch& scratch, BlockVote vote = BlockVote::kSum);

// Checks what ScoreKvHead requires, for every head of `layer`: InvalidArgument (bad layer, query
// bytes, num_queries outside [1, retrieval_stride]) or FailedPrecondition (layer not sealed).
absl::Status CheckScoreArgs(const SequenceIndex& index, uint32_t layer,
                            absl::Span<const uint8_t> queries, uint32_t num_queries);

// Scores all blocks of one layer on the calling thread: the sum of ScoreKvHead over KV heads
// (in head order). block_scores is resized to num_blocks(layer).
absl::Status ScoreLayer(const SequenceIndex& index, uint32_t layer,
                        absl::Span<const uint8_t> queries, uint32_t num_queries,
                        std::vector<float>& block_scores);

// The Highway target the scorer dispatches to on this machine, e.g. "AVX3".
const char* DispatchedTargetName();

// Which kernel scans a representation. All paths share one chunk format (split-K partials), so
// they are interchangeable; the scalar reference (reference.h) is the truth for every one.
//  - kHighway: the Highway kernel, every target (the portable fallback), both formats;
//  - kBf16Dot: AVX512_BF16 vdpbf16ps on the bf16 representation (bf16 queries exactly, fp16/fp32
//    queries as two bf16 parts);
//  - kInt8Vnni: AVX512_VNNI vpdpbusd on the int8 representation;
//  - kAmxBf16: AMX-BF16 tile products (tdpbf16ps) on the bf16 representation, queries as in
//    kBf16Dot; needs AMX-TILE, AMX-BF16 and the OS's permission for the tile state (Linux:
//    arch_prctl ARCH_REQ_XCOMP_PERM, asked for the whole process by ScorePathSupported);
//  - kAmxInt8: AMX-INT8 tile products (tdpbsud) on the int8 representation, the same integer dots
//    as kInt8Vnni; needs AMX-TILE, AMX-INT8 and the tile state as kAmxBf16.
// kAuto picks kAmxBf16 for bf16 and kAmxInt8 for int8 where the CPU has them, else kHighway (see
// ActiveScorePath in scorer.cc for what was measured); the other paths are chosen with
// SetScorePath.
enum class ScorePath : uint32_t { kAuto, kHighway, kBf16Dot, kInt8Vnni, kAmxBf16, kAmxInt8 };

const char* ScorePathName(ScorePath path);
// Whether `path` scores `format` on this CPU (kAuto and kHighway always do).
bool ScorePathSupported(ScorePath path, RepresentationFormat format);
// Forces `path` for every later scoring call of the process (tests, benchmarks); kAuto restores
// the automatic choice. Where the forced path does not support an index's format, kHighway
// scores it. Thread-safe, but calls racing with scoring may score a layer by mixed paths.
void SetScorePath(ScorePath path);
// The path that scores an index of `format` now: never kAuto.
ScorePath ActiveScorePath(RepresentationFormat format);

// How far (relative) the block scores of `path` may lie from the scalar reference's on the same
// representation, besides an absolute 1e-6 of the scores' total (ulps of blocks near zero).
// kHighway: 1e-4 (fp32 rounding; its exp2 errs by 2.7e-6). The x86 paths (kBf16Dot, kInt8Vnni,
// kAmxBf16, kAmxInt8) evaluate exp2 with one FMA less (a degree-3 polynomial, relative error at
// most 7.6e-5); a row's share of a block is a ratio of two sums of such values, so it moves by at
// most twice that: 1e-4 + 1.6e-4. Selections equal the reference's except between blocks whose
// reference scores lie this close.
float ScoreRelativeTolerance(ScorePath path);

}  // namespace kvstar::retrieval

#endif  // KVSTAR_RETRIEVAL_SCORER_H_
