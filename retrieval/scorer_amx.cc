// The scorer's AMX kernels. AMX-BF16: a tile's dot products (up to 4 representation vectors of one
// group, i.e. 16 blocks each, against every query row) as tile matrix products — tdpbf16ps adds a
// 16 x 32 bf16 by 32 x 16 bf16 product to a 16 x 16 fp32 tile — then the AVX-512 exp2 pass and
// block sums that every x86 kernel shares (scorer_x86_scan.h). The bf16 representation's stored
// order, [group][M][kept pairs][16 blocks][2 channels], is already the B tile's layout (a row per
// channel pair, the blocks' two channels side by side), so the representation is loaded as it
// lies; the gathered queries' bf16 pairs (GatheredLayout::high, low) are the A tile's rows.
// AMX-INT8 (AmxInt8Kernel below): the same with tdpbsud on the int8 representation.
// Compiled with function-level target attributes and called only after CpuHasAmxBf16()
// (scorer_x86.cc), so the library itself still runs on any x86-64.
#include <algorithm>
#include <cstring>

#include "retrieval/quantize.h"
#include "retrieval/scorer_kernels.h"

#if KVSTAR_HAVE_X86_KERNELS
#include <immintrin.h>

#include "retrieval/scorer_x86_scan.h"
#endif

namespace kvstar::retrieval::internal {

#if KVSTAR_HAVE_X86_KERNELS
namespace {

using x86::Accumulate;
using x86::kLanes;
using x86::RowState;
using x86::ScanChunk;
using x86::Tile;

// The tile loads, products and stores are asm statements (GCC's _tile_* macros) and need no
// target attribute; the kernel's methods carry the AVX-512 one of the shared scan they are inlined
// into, and only ScoreChunkAmxBf16 (LDTILECFG, TILERELEASE) the AMX one.
#define KVSTAR_AMX \
  __attribute__((  \
      target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx512vnni,amx-tile,amx-bf16")))

// Query rows go in row blocks of kTileRows (the last one zero-padded), up to kPanelBlocks blocks
// (a panel) at a time; K (the kept channel pairs) in steps of equal width, at most kTilePairs.
// Tile registers (the tile intrinsics take their numbers as literal tokens):
//   tmm0..2  C: fp32 dot products of one vector (16 blocks) with the panel's row blocks
//   tmm3..5  A: the panel's row blocks, one K step
//   tmm6, 7  B: one vector, one K step; the two take turns, so a load never waits for the product
//            that reads the other
constexpr size_t kTileRows = 16;    // query rows of an A and a C tile
constexpr size_t kTilePairs = 16;   // channel pairs of a K step at most: an A row of 64 bytes
constexpr size_t kPanelBlocks = 3;  // row blocks of a panel: 48 rows (Qwen2.5-14B has 40)
constexpr size_t kPanelFloats = kPanelBlocks * kTileRows * kLanes;

// LDTILECFG's operand, palette 1 (Intel SDM vol. 2, LDTILECFG): bytes per row and rows per tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// The tile intrinsics are asm statements that do not tell the compiler which memory they read:
// this makes earlier stores (the padded queries, the tile configuration) happen before them.
inline void CompilerBarrier() { __asm__ volatile("" ::: "memory"); }

// B (register B_TILE) from `b_words`, its product with the panel's nb row blocks added to C.
#define KVSTAR_PANEL_PRODUCTS(B_TILE, b_words, nb)        \
  do {                                                    \
    _tile_loadd(B_TILE, b_words, kLanes * sizeof(float)); \
    _tile_dpbf16ps(0, 3, B_TILE);                         \
    if (nb > 1) _tile_dpbf16ps(1, 4, B_TILE);             \
    if (nb > 2) _tile_dpbf16ps(2, 5, B_TILE);             \
  } while (0)

// Per vector of a tile and panel, the products go to C tiles, are stored to one of two small
// buffers and read back by the exp2 pass; the next vector's products are issued before this
// one's exp2 pass, so the tile unit works while the vector units do. Where the queries fit one
// panel and one K step (bf16 queries, up to 48 rows of up to 32 kept channels: the models here),
// A stays in its registers for the whole chunk and the next tile's first products are issued
// during the last vector of this one. Queries as in the bf16-dot path: unscaled bf16 pairs (exact
// for bf16 queries; fp16/fp32 queries add K steps over their low parts).
struct AmxBf16Kernel {
  AmxBf16Kernel(const ChunkArgs& args, const GatheredLayout& gathered)
      : args(args),
        pairs(gathered.pairs),
        pair_steps((pairs + kTilePairs - 1) / kTilePairs),
        step_pairs((pairs + pair_steps - 1) / pair_steps),
        steps(pair_steps * (args.split_queries ? 2 : 1)),
        row_blocks((args.num_rows + kTileRows - 1) / kTileRows),
        panels((row_blocks + kPanelBlocks - 1) / kPanelBlocks),
        resident_a(panels == 1 && steps == 1),
        end_group(PartialsLayout(args.num_blocks, args.num_rows, args.num_chunks)
                      .FirstGroup(args.chunk + 1)),
        high(args.gathered + gathered.high),
        low(args.gathered + gathered.low) {}

  const ChunkArgs& args;
  const size_t pairs;       // kept channel pairs, the K of a score in 32-bit words
  const size_t pair_steps;  // K steps over the pairs
  const size_t step_pairs;  // pairs of every K step (the last one starts early, see UseScratch)
  const size_t steps;       // K steps per product: pair_steps, twice for split queries
  const size_t row_blocks;
  const size_t panels;
  const bool resident_a;  // one panel, one step: A loaded once per chunk
  const size_t end_group;
  const float* high;  // bit patterns, see GatheredLayout
  const float* low;
  // UseScratch: [2] C buffers of a panel, then the A rows [steps][row_blocks * kTileRows]
  // [step_pairs], zero beyond num_rows and where a step overlaps the one before it.
  float* c_buffers = nullptr;
  float* a_rows = nullptr;
  size_t buffer = 0;     // the C buffer that the next exp2 pass reads
  bool pending = false;  // it already holds the next tile's first products (resident_a only)
  bool odd_b = false;    // B register of the next load: tmm7, else tmm6

  const uint32_t* Words(size_t group, size_t vector) const {
    return reinterpret_cast<const uint32_t*>(args.rep) +
           (group * args.vectors + vector) * pairs * kLanes;
  }
  size_t VectorBytes() const { return pairs * kLanes * 4; }
  size_t StepFloats() const { return row_blocks * kTileRows * step_pairs; }
  // First pair of K step `step`: steps are step_pairs wide; the last one ends at `pairs` and
  // overlaps its predecessor, whose pairs its A rows leave zero.
  size_t FirstPair(size_t step) const {
    return std::min(step % pair_steps * step_pairs, pairs - step_pairs);
  }
  size_t ScratchFloats() const { return 2 * kPanelFloats + steps * StepFloats(); }

  KVSTAR_AVX512_INLINE void UseScratch(float* memory) {
    c_buffers = memory;
    a_rows = c_buffers + 2 * kPanelFloats;
    std::fill(a_rows, a_rows + steps * StepFloats(), 0.0f);
    for (size_t step = 0; step < steps; ++step) {
      const float* source = step < pair_steps ? high : low;
      const size_t first = FirstPair(step);
      const size_t fresh = step % pair_steps * step_pairs;  // pairs below: an earlier step's
      float* a = a_rows + step * StepFloats();
      for (size_t row = 0; row < args.num_rows; ++row) {
        for (size_t j = std::max(first, fresh) - first; j < step_pairs; ++j) {
          a[row * step_pairs + j] = source[row * pairs + first + j];
        }
      }
    }
    CompilerBarrier();
    if (resident_a) LoadA(0, row_blocks, 0);
  }

  // A tiles of panel `panel` (nb row blocks), K step `step`.
  KVSTAR_AVX512_INLINE void LoadA(size_t panel, size_t nb, size_t step) const {
    const float* a = a_rows + step * StepFloats() + panel * kPanelBlocks * kTileRows * step_pairs;
    const size_t stride = step_pairs * sizeof(float);
    _tile_loadd(3, a, stride);
    if (nb > 1) _tile_loadd(4, a + kTileRows * step_pairs, stride);
    if (nb > 2) _tile_loadd(5, a + 2 * kTileRows * step_pairs, stride);
  }

  // The products of one vector (at `words`) with panel `panel`'s nb row blocks, stored to C
  // buffer `to` ([nb * kTileRows rows][kLanes]).
  KVSTAR_AVX512_INLINE void Multiply(const uint32_t* words, size_t panel, size_t nb, size_t to) {
    _tile_zero(0);
    if (nb > 1) _tile_zero(1);
    if (nb > 2) _tile_zero(2);
    for (size_t step = 0; step < steps; ++step) {
      if (!resident_a) LoadA(panel, nb, step);
      const uint32_t* b = words + FirstPair(step) * kLanes;
      if (odd_b) {
        KVSTAR_PANEL_PRODUCTS(7, b, nb);
      } else {
        KVSTAR_PANEL_PRODUCTS(6, b, nb);
      }
      odd_b = !odd_b;
    }
    float* c = c_buffers + to * kPanelFloats;
    const size_t stride = kLanes * sizeof(float);
    _tile_stored(0, c, stride);
    if (nb > 1) _tile_stored(1, c + kTileRows * kLanes, stride);
    if (nb > 2) _tile_stored(2, c + 2 * kTileRows * kLanes, stride);
  }

  // Rows row0 .. row0 + kRows from `c` (a row of kLanes floats each): scaled, relative to the
  // references, then exp2 and the block sums.
  template <size_t kRows>
  KVSTAR_AVX512_INLINE void AccumulateRows(const float* c, size_t row0, const RowState& state,
                                           const Tile& tile) const {
    const __m512 scale = _mm512_set1_ps(args.dot_scale);
    __m512 acc[1][kRows];
    KVSTAR_UNROLL
    for (size_t i = 0; i < kRows; ++i) {
      acc[0][i] = _mm512_fmadd_ps(_mm512_load_ps(c + i * kLanes), scale,
                                  _mm512_set1_ps(-state.reference[row0 + i]));
    }
    Accumulate<1, kRows>(acc, row0, state, tile);
  }

  // The exp2 pass of one vector over `rows` rows from row0, read from `c`.
  KVSTAR_AVX512_INLINE void Exponentiate(const float* c, size_t row0, size_t rows,
                                         const RowState& state, const Tile& tile) const {
    size_t r = 0;
    for (; r + 8 <= rows; r += 8) AccumulateRows<8>(c + r * kLanes, row0 + r, state, tile);
    switch (rows - r) {
#define KVSTAR_ROWS_LEFT(N)                                   \
  case N:                                                     \
    AccumulateRows<N>(c + r * kLanes, row0 + r, state, tile); \
    break;
      KVSTAR_ROWS_LEFT(1)
      KVSTAR_ROWS_LEFT(2)
      KVSTAR_ROWS_LEFT(3)
      KVSTAR_ROWS_LEFT(4)
      KVSTAR_ROWS_LEFT(5)
      KVSTAR_ROWS_LEFT(6)
      KVSTAR_ROWS_LEFT(7)
#undef KVSTAR_ROWS_LEFT
      default:
        break;
    }
  }

  // The first vector of the tile ScanChunk scores after this one, if any.
  const uint32_t* NextTileWords(const Tile& tile, size_t vectors) const {
    if (tile.first_vector + vectors < args.vectors) {
      return Words(tile.group, tile.first_vector + vectors);
    }
    return tile.group + 1 < end_group ? Words(tile.group + 1, 0) : nullptr;
  }

  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void ScoreTile(size_t num_rows, const RowState& state, const Tile& tile,
                                      const char* next, size_t next_bytes) {
    const uint32_t* words = Words(tile.group, tile.first_vector);
    const size_t vector_words = pairs * kLanes;
    const size_t share = (next_bytes / (kVectors * panels) + 63) / 64 * 64 + 64;
    size_t share_index = 0;
    for (size_t panel = 0; panel < panels; ++panel) {
      const size_t nb = std::min(kPanelBlocks, row_blocks - panel * kPanelBlocks);
      const size_t row0 = panel * kPanelBlocks * kTileRows;
      const size_t rows = std::min(kPanelBlocks * kTileRows, num_rows - row0);
      if (!pending) Multiply(words, panel, nb, buffer);
      pending = false;
      for (size_t v = 0; v < kVectors; ++v, ++share_index) {
        for (size_t offset = share_index * share;
             offset < std::min(next_bytes, (share_index + 1) * share); offset += 64) {
          _mm_prefetch(next + offset, _MM_HINT_T0);
        }
        if (v + 1 < kVectors) {
          Multiply(words + (v + 1) * vector_words, panel, nb, buffer ^ 1);
        } else if (resident_a) {
          if (const uint32_t* next_words = NextTileWords(tile, kVectors)) {
            Multiply(next_words, 0, nb, buffer ^ 1);
            pending = true;
          }
        }
        Exponentiate(c_buffers + buffer * kPanelFloats, row0, rows, state, tile);
        buffer ^= 1;
      }
    }
  }
};

#undef KVSTAR_PANEL_PRODUCTS

// AMX-INT8 on the int8 representation. tdpbsud adds a 16 x 64 signed-byte by 64 x 16 unsigned-byte
// product to a 16 x 16 int32 tile; the int8 stored order, [group][M][kept quads][16 blocks][4
// codes], is the B tile's layout (a row per channel quad) and the codes are stored offset to
// unsigned, so B is loaded as it lies, as in the VNNI kernel. A query row has two code sets (high
// and low, QuantizeQueryInt8): they are separate A rows, packed without padding between them (the
// high codes of row r in A row r, the low ones in A row num_rows + r), so one vector's products
// are ceil(2 * num_rows / 16) C tiles (5 for Qwen2.5-14B's 40 rows, not 2 * 3), in panels of up
// to kPanelTiles. Each C tile starts at its rows' offsets
// (-kInt8CodeOffset times the sum of the row's codes), so it ends as the exact integer dot of the
// VNNI kernel; the exp2 pass then combines the two dots and scales them exactly as that kernel
// does. Products run one vector ahead of the exp2 pass (double-buffered C), across tiles too.
constexpr size_t kTileQuads = 16;  // channel quads of a K step at most: an A row of 64 bytes
constexpr size_t kPanelTiles = 3;  // C tiles of a panel (tmm0..2), with their A (tmm3..5)

// B (register B_TILE) from `b_words`, its product with the panel's nb A tiles added to C.
#define KVSTAR_PANEL_INT8_PRODUCTS(B_TILE, b_words, nb)   \
  do {                                                    \
    _tile_loadd(B_TILE, b_words, kLanes * sizeof(float)); \
    _tile_dpbsud(0, 3, B_TILE);                           \
    if (nb > 1) _tile_dpbsud(1, 4, B_TILE);               \
    if (nb > 2) _tile_dpbsud(2, 5, B_TILE);               \
  } while (0)

struct AmxInt8Kernel {
  AmxInt8Kernel(const ChunkArgs& args, const GatheredLayout& gathered)
      : args(args),
        quads(gathered.quads),
        quad_steps((quads + kTileQuads - 1) / kTileQuads),
        step_quads((quads + quad_steps - 1) / quad_steps),
        code_blocks((2 * args.num_rows + kTileRows - 1) / kTileRows),
        panels((code_blocks + kPanelTiles - 1) / kPanelTiles),
        end_group(PartialsLayout(args.num_blocks, args.num_rows, args.num_chunks)
                      .FirstGroup(args.chunk + 1)),
        high(args.gathered + gathered.quad_codes),
        low(args.gathered + gathered.low_quad_codes),
        factor(args.gathered + gathered.factor),
        offset(args.gathered + gathered.offset),
        low_offset(args.gathered + gathered.low_offset) {}

  const ChunkArgs& args;
  const size_t quads;        // kept channel quads, the K of a score in 32-bit words
  const size_t quad_steps;   // K steps over the quads
  const size_t step_quads;   // quads of every K step (the last one starts early, see UseScratch)
  const size_t code_blocks;  // of A rows: high codes, then low codes right after them
  const size_t panels;
  const size_t end_group;
  const float* high;  // bit patterns, see GatheredLayout
  const float* low;
  const float* factor;
  const float* offset;
  const float* low_offset;
  // UseScratch: [2] C buffers, the C tiles' start values (same shape), then the A rows
  // [quad_steps][code_blocks * kTileRows][step_quads]; zero beyond num_rows and where a step
  // overlaps the one before it.
  float* c_buffers = nullptr;
  float* c_start = nullptr;
  float* a_rows = nullptr;
  size_t buffer = 0;     // the C buffer that the next exp2 pass reads
  bool pending = false;  // it already holds the next tile's first products
  bool odd_b = false;    // B register of the next load: tmm7, else tmm6

  const uint32_t* Words(size_t group, size_t vector) const {
    return reinterpret_cast<const uint32_t*>(args.codes) +
           (group * args.vectors + vector) * quads * kLanes;
  }
  size_t VectorBytes() const { return quads * kLanes * 4; }
  size_t CFloats() const { return code_blocks * kTileRows * kLanes; }
  size_t StepFloats() const { return code_blocks * kTileRows * step_quads; }
  size_t FirstQuad(size_t step) const { return std::min(step * step_quads, quads - step_quads); }
  size_t ScratchFloats() const { return 3 * CFloats() + quad_steps * StepFloats(); }

  KVSTAR_AVX512_INLINE void UseScratch(float* memory) {
    c_buffers = memory;
    c_start = c_buffers + 2 * CFloats();
    a_rows = c_start + CFloats();
    std::fill(c_start, c_start + CFloats() + quad_steps * StepFloats(), 0.0f);
    const size_t low_row0 = args.num_rows;
    for (size_t row = 0; row < args.num_rows; ++row) {
      for (size_t lane = 0; lane < kLanes; ++lane) {  // int32 bit patterns, copied as bytes
        std::memcpy(c_start + row * kLanes + lane, offset + row, sizeof(float));
        std::memcpy(c_start + (low_row0 + row) * kLanes + lane, low_offset + row, sizeof(float));
      }
    }
    for (size_t step = 0; step < quad_steps; ++step) {
      const size_t first = FirstQuad(step);
      const size_t fresh = step * step_quads;  // quads below: an earlier step's
      float* a = a_rows + step * StepFloats();
      for (size_t row = 0; row < args.num_rows; ++row) {
        for (size_t j = std::max(first, fresh) - first; j < step_quads; ++j) {
          a[row * step_quads + j] = high[row * quads + first + j];
          a[(low_row0 + row) * step_quads + j] = low[row * quads + first + j];
        }
      }
    }
    CompilerBarrier();
  }

  // The products of one vector (at `words`) with every code block, stored to C buffer `to`
  // ([code_blocks * kTileRows rows][kLanes] int32).
  KVSTAR_AVX512_INLINE void Multiply(const uint32_t* words, size_t to) {
    float* c = c_buffers + to * CFloats();
    const size_t c_stride = kLanes * sizeof(float);
    const size_t a_stride = step_quads * sizeof(float);
    for (size_t panel = 0; panel < panels; ++panel) {
      const size_t nb = std::min(kPanelTiles, code_blocks - panel * kPanelTiles);
      const size_t first_row = panel * kPanelTiles * kTileRows;
      const float* start = c_start + first_row * kLanes;
      _tile_loadd(0, start, c_stride);
      if (nb > 1) _tile_loadd(1, start + kTileRows * kLanes, c_stride);
      if (nb > 2) _tile_loadd(2, start + 2 * kTileRows * kLanes, c_stride);
      for (size_t step = 0; step < quad_steps; ++step) {
        const float* a = a_rows + step * StepFloats() + first_row * step_quads;
        _tile_loadd(3, a, a_stride);
        if (nb > 1) _tile_loadd(4, a + kTileRows * step_quads, a_stride);
        if (nb > 2) _tile_loadd(5, a + 2 * kTileRows * step_quads, a_stride);
        const uint32_t* b = words + FirstQuad(step) * kLanes;
        if (odd_b) {
          KVSTAR_PANEL_INT8_PRODUCTS(7, b, nb);
        } else {
          KVSTAR_PANEL_INT8_PRODUCTS(6, b, nb);
        }
        odd_b = !odd_b;
      }
      float* out = c + first_row * kLanes;
      _tile_stored(0, out, c_stride);
      if (nb > 1) _tile_stored(1, out + kTileRows * kLanes, c_stride);
      if (nb > 2) _tile_stored(2, out + 2 * kTileRows * kLanes, c_stride);
    }
    CompilerBarrier();  // the exp2 pass reads what the tile stores wrote
  }

  // Rows row0 .. row0 + kRows of one vector from `c`: the VNNI kernel's scores, then exp2 and the
  // block sums. `scales`: the vector's 16 code scales.
  template <size_t kRows>
  KVSTAR_AVX512_INLINE void AccumulateRows(const float* c, size_t row0, __m512 scales,
                                           const RowState& state, const Tile& tile) const {
    const __m512 low_step = _mm512_set1_ps(1.0f / kLowCodeSteps);
    const float* low_c = c + args.num_rows * kLanes;
    __m512 acc[1][kRows];
    KVSTAR_UNROLL
    for (size_t i = 0; i < kRows; ++i) {
      const size_t row = row0 + i;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c + row * kLanes));
      const __m512 low_dot = _mm512_cvtepi32_ps(_mm512_load_si512(low_c + row * kLanes));
      const __m512 codes = _mm512_fmadd_ps(low_dot, low_step, dot);
      const __m512 scale = _mm512_mul_ps(scales, _mm512_set1_ps(factor[row]));
      acc[0][i] = _mm512_fmadd_ps(codes, scale, _mm512_set1_ps(-state.reference[row]));
    }
    Accumulate<1, kRows>(acc, row0, state, tile);
  }

  KVSTAR_AVX512_INLINE void Exponentiate(const float* c, size_t vector, const RowState& state,
                                         const Tile& tile) const {
    const __m512 scales =
        _mm512_loadu_ps(args.code_scales + (tile.group * args.vectors + vector) * kLanes);
    const size_t rows = args.num_rows;
    size_t r = 0;
    for (; r + 8 <= rows; r += 8) AccumulateRows<8>(c, r, scales, state, tile);
    switch (rows - r) {
#define KVSTAR_ROWS_LEFT(N)                       \
  case N:                                         \
    AccumulateRows<N>(c, r, scales, state, tile); \
    break;
      KVSTAR_ROWS_LEFT(1)
      KVSTAR_ROWS_LEFT(2)
      KVSTAR_ROWS_LEFT(3)
      KVSTAR_ROWS_LEFT(4)
      KVSTAR_ROWS_LEFT(5)
      KVSTAR_ROWS_LEFT(6)
      KVSTAR_ROWS_LEFT(7)
#undef KVSTAR_ROWS_LEFT
      default:
        break;
    }
  }

  // The first vector of the tile ScanChunk scores after this one, if any.
  const uint32_t* NextTileWords(const Tile& tile, size_t vectors) const {
    if (tile.first_vector + vectors < args.vectors) {
      return Words(tile.group, tile.first_vector + vectors);
    }
    return tile.group + 1 < end_group ? Words(tile.group + 1, 0) : nullptr;
  }

  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void ScoreTile(size_t num_rows, const RowState& state, const Tile& tile,
                                      const char* next, size_t next_bytes) {
    const uint32_t* words = Words(tile.group, tile.first_vector);
    const size_t vector_words = quads * kLanes;
    const size_t share = (next_bytes / kVectors + 63) / 64 * 64 + 64;
    if (!pending) Multiply(words, buffer);
    pending = false;
    for (size_t v = 0; v < kVectors; ++v) {
      for (size_t offset = v * share; offset < std::min(next_bytes, (v + 1) * share);
           offset += 64) {
        _mm_prefetch(next + offset, _MM_HINT_T0);
      }
      if (v + 1 < kVectors) {
        Multiply(words + (v + 1) * vector_words, buffer ^ 1);
      } else if (const uint32_t* next_words = NextTileWords(tile, kVectors)) {
        Multiply(next_words, buffer ^ 1);
        pending = true;
      }
      Exponentiate(c_buffers + buffer * CFloats(), tile.first_vector + v, state, tile);
      buffer ^= 1;
    }
  }
};

#undef KVSTAR_PANEL_INT8_PRODUCTS

}  // namespace

// The tile configuration is per thread and LDTILECFG zeroes the tiles, so every chunk loads its
// own (a few dozen cycles against a chunk's ~1 M) and releases the tiles at its end: the scorer's
// pool threads need no setup, and a thread between chunks holds no tile state for the OS to save.
KVSTAR_AMX void ScoreChunkAmxBf16(const ChunkArgs& args) {
  const GatheredLayout gathered(args.num_rows, args.kept);
  AmxBf16Kernel kernel(args, gathered);
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = kLanes * sizeof(float);
  }
  for (int t = 3; t < 6; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = static_cast<uint16_t>(kernel.step_pairs * sizeof(uint32_t));
  }
  for (int t = 6; t < 8; ++t) {
    config.rows[t] = static_cast<uint8_t>(kernel.step_pairs);
    config.colsb[t] = kLanes * sizeof(uint32_t);
  }
  CompilerBarrier();
  _tile_loadconfig(&config);
  ScanChunk(args, kernel);
  _tile_release();
}

// As ScoreChunkAmxBf16, with the int8 kernel's tile shapes: C and A tiles of 16 rows, A rows of
// step_quads words, B tiles of step_quads rows of 16 words.
#define KVSTAR_AMX_INT8 \
  __attribute__((       \
      target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx512vnni,amx-tile,amx-int8")))

KVSTAR_AMX_INT8 void ScoreChunkAmxInt8(const ChunkArgs& args) {
  const GatheredLayout gathered(args.num_rows, args.kept);
  AmxInt8Kernel kernel(args, gathered);
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = kLanes * sizeof(int32_t);
  }
  for (int t = 3; t < 6; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = static_cast<uint16_t>(kernel.step_quads * sizeof(uint32_t));
  }
  for (int t = 6; t < 8; ++t) {
    config.rows[t] = static_cast<uint8_t>(kernel.step_quads);
    config.colsb[t] = kLanes * sizeof(uint32_t);
  }
  CompilerBarrier();
  _tile_loadconfig(&config);
  ScanChunk(args, kernel);
  _tile_release();
}

#else  // no x86 kernels on this architecture or compiler

void ScoreChunkAmxBf16(const ChunkArgs&) {}
void ScoreChunkAmxInt8(const ChunkArgs&) {}

#endif

}  // namespace kvstar::retrieval::internal
