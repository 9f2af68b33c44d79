// Internal to the scorer: what every chunk kernel (Highway, AVX512_BF16, AVX512_VNNI, AMX-BF16)
// reads and writes, so the paths are interchangeable chunk by chunk. Not part of the public API.
#ifndef KVSTAR_RETRIEVAL_SCORER_KERNELS_H_
#define KVSTAR_RETRIEVAL_SCORER_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "hwy/base.h"
#include "retrieval/representation.h"
#include "retrieval/scorer.h"

// The x86 kernels (scorer_x86.cc, scorer_amx.cc) need GCC or Clang's x86 intrinsics and
// function-level target attributes; elsewhere their paths are never supported.
#if defined(__x86_64__) && defined(__GNUC__)
#define KVSTAR_HAVE_X86_KERNELS 1
#else
#define KVSTAR_HAVE_X86_KERNELS 0
#endif

namespace kvstar::retrieval::internal {

// Offsets (floats) in one head's partials buffer: the rows' numerators per group
// [groups][rows][kBlocksPerGroup], whatever a kernel's vector width (a narrower target writes its
// lanes' part of the 16); per chunk the rows' reference and denominator [chunks][rows].
struct PartialsLayout {
  PartialsLayout(size_t num_blocks, size_t num_rows, size_t num_chunks)
      : num_groups((num_blocks + SequenceIndex::kBlocksPerGroup - 1) /
                   SequenceIndex::kBlocksPerGroup),
        num_rows(num_rows),
        num_chunks(num_chunks),
        reference(num_groups * num_rows * SequenceIndex::kBlocksPerGroup),
        denominator(reference + num_chunks * num_rows),
        floats(hwy::RoundUpTo(denominator + num_chunks * num_rows, 16)) {}
  // First group of chunk `chunk`; FirstGroup(num_chunks) == num_groups.
  size_t FirstGroup(size_t chunk) const { return chunk * num_groups / num_chunks; }
  // Numerators of `row` for blocks group * 16 + first_lane onwards.
  size_t Sums(size_t group, size_t row, size_t first_lane) const {
    return (group * num_rows + row) * SequenceIndex::kBlocksPerGroup + first_lane;
  }

  size_t num_groups;
  size_t num_rows;
  size_t num_chunks;
  size_t reference;
  size_t denominator;
  size_t floats;
};

// One head's gathered queries (GatherHeadQueries), R = rows, P = kept_pairs, Q = kept_quads:
//   rows      [R][kept] fp32, scaled by log2(e) / sqrt(head_dim) (int8: the dequantized codes)
//   norms     [R]       their L2 norms
//   high      [R][P]    bf16 pairs of the unscaled row, rounded to nearest (even channel low)
//   low       [R][P]    bf16 pairs of what `high` misses (zero for bf16 queries)
//   quads     [R][Q]    QuantizeQueryInt8 high codes of the unscaled row, 4 channels per word
//   low_quads [R][Q]    its low codes
//   factor    [R]       the codes' scale times log2(e) / sqrt(head_dim)
//   offset    [R]       -kInt8CodeOffset * (sum of the row's high codes), as int32
//   low_offset [R]      the same for the low codes
struct GatheredLayout {
  GatheredLayout(size_t rows, size_t kept)
      : rows(rows),
        kept(kept),
        pairs((kept + 1) / 2),
        quads((kept + 3) / 4),
        norms(rows * kept),
        high(norms + rows),
        low(high + rows * pairs),
        quad_codes(low + rows * pairs),
        low_quad_codes(quad_codes + rows * quads),
        factor(low_quad_codes + rows * quads),
        offset(factor + rows),
        low_offset(offset + rows),
        floats(low_offset + rows) {}
  size_t rows, kept, pairs, quads;
  size_t norms, high, low, quad_codes, low_quad_codes, factor, offset, low_offset, floats;
};

// Everything one chunk kernel needs; pointers into the index, the gathered queries and the
// head's partials.
struct ChunkArgs {
  const uint16_t* rep = nullptr;       // kBf16: SequenceIndex::representation
  const uint8_t* codes = nullptr;      // kInt8: SequenceIndex::codes
  const float* code_scales = nullptr;  // kInt8: SequenceIndex::code_scales
  const float* group_norms = nullptr;
  size_t num_blocks = 0;
  size_t vectors = 0;
  size_t kept = 0;
  const float* gathered = nullptr;  // GatheredLayout
  size_t num_rows = 0;
  float dot_scale = 0.0f;      // log2(e) / sqrt(head_dim), for the bf16 dot path's unscaled rows
  bool split_queries = false;  // bf16 dot path: also dot the `low` words (non-bf16 queries)
  size_t chunk = 0;
  size_t num_chunks = 0;
  float* partials = nullptr;
  ScoreScratch* scratch = nullptr;
};

// A row's scores may exceed its reference max by this much (log2 units) before the reference
// moves: exp2 stays below 2^20, far from overflow, and the max rarely needs rescaling.
inline constexpr float kHeadroom = 20.0f;

// The x86 kernels' exp2 (a degree-3 polynomial, scorer_x86_scan.h) stays within this relative
// error of 2^x for x in [-126, kHeadroom]; the Highway kernel's degree 4 within 2.7e-6.
inline constexpr float kFastExp2RelativeError = 7.6e-5f;

// Runtime CPU checks (cpuid, and the OS's saving of the register state; for AMX also the OS's
// permission to use the tile data, requested for the whole process by the first call).
bool CpuHasAvx512Bf16();
bool CpuHasAvx512Vnni();
bool CpuHasAmxBf16();
bool CpuHasAmxInt8();

// The x86 kernels; REQUIRE the matching CpuHas* (they are compiled with function-level target
// attributes, the rest of the library stays portable). Same contract as the Highway kernel.
void ScoreChunkBf16Dot(const ChunkArgs& args);
void ScoreChunkInt8Vnni(const ChunkArgs& args);
// AMX-BF16 tile products on the bf16 representation (scorer_amx.cc); REQUIRES CpuHasAmxBf16().
// Loads its own tile configuration on the calling thread and releases the tiles before returning.
void ScoreChunkAmxBf16(const ChunkArgs& args);
// AMX-INT8 tile products (tdpbsud) on the int8 representation, with the same integer dots as
// ScoreChunkInt8Vnni; REQUIRES CpuHasAmxInt8(). Tile state as ScoreChunkAmxBf16.
void ScoreChunkAmxInt8(const ChunkArgs& args);

// The x86 kernels' exp2 on `count` values (tests); REQUIRES CpuHasAvx512Bf16().
void FastExp2(const float* x, float* out, size_t count);

}  // namespace kvstar::retrieval::internal

#endif  // KVSTAR_RETRIEVAL_SCORER_KERNELS_H_
