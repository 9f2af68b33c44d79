// The scorer's AMX-BF16 kernel: a tile's dot products (up to 4 representation vectors of one
// group, i.e. 16 blocks each, against every query row) as tile matrix products — tdpbf16ps adds a
// 16 x 32 bf16 by 32 x 16 bf16 product to a 16 x 16 fp32 tile — then the AVX-512 exp2 pass and
// block sums that every x86 kernel shares (scorer_x86_scan.h). The bf16 representation's stored
// order, [group][M][kept pairs][16 blocks][2 channels], is already the B tile's layout (a row per
// channel pair, the blocks' two channels side by side), so the representation is loaded as it
// lies; the gathered queries' bf16 pairs (GatheredLayout::high, low) are the A tile's rows.
// Compiled with function-level target attributes and called only after CpuHasAmxBf16()
// (scorer_x86.cc), so the library itself still runs on any x86-64.
#include <algorithm>
#include <cstring>

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
using x86::kMaxVectors;
using x86::RowState;
using x86::ScanChunk;
using x86::Tile;

// The tile loads, products and stores are asm statements (GCC's _tile_* macros) and need no
// target attribute; the kernel's methods carry the AVX-512 one of the shared scan they are inlined
// into, and only ScoreChunkAmxBf16 (LDTILECFG, TILERELEASE) the AMX one.
#define KVSTAR_AMX \
  __attribute__((  \
      target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx512vnni,amx-tile,amx-bf16")))

// Tile registers (the tile intrinsics take their numbers as literal tokens):
//   tmm0..3  C: fp32 dot products of 16 query rows with the 16 blocks of one vector each
//   tmm4, 5  A (16 rows x kTilePairs channel pairs) and B (kTilePairs pairs x 16 blocks) of every
//            K step but the last
//   tmm6, 7  A and B of the last K step (the kept pairs left over: 1 to kTilePairs)
constexpr size_t kTileRows = 16;   // query rows of an A and a C tile
constexpr size_t kTilePairs = 16;  // channel pairs of a K step: an A row of 64 bytes, 16 B rows
constexpr size_t kTileFloats = kTileRows * kLanes;

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

// One K step of kVectors vectors into tmm0..: A (register A_TILE) from `a_words` (rows a_stride
// bytes apart), each vector's B (register B_TILE) from `b_words` on, vector_words apart.
#define KVSTAR_TILE_STEP(A_TILE, B_TILE, a_words, b_words)      \
  do {                                                          \
    const float* a_step = (a_words);                            \
    const uint32_t* b_step = (b_words);                         \
    _tile_loadd(A_TILE, a_step, a_stride);                      \
    _tile_loadd(B_TILE, b_step, b_stride);                      \
    _tile_dpbf16ps(0, A_TILE, B_TILE);                          \
    if constexpr (kVectors > 1) {                               \
      _tile_loadd(B_TILE, b_step + vector_words, kLanes * 4);   \
      _tile_dpbf16ps(1, A_TILE, B_TILE);                        \
    }                                                           \
    if constexpr (kVectors > 2) {                               \
      _tile_loadd(B_TILE, b_step + 2 * vector_words, b_stride); \
      _tile_dpbf16ps(2, A_TILE, B_TILE);                        \
    }                                                           \
    if constexpr (kVectors > 3) {                               \
      _tile_loadd(B_TILE, b_step + 3 * vector_words, b_stride); \
      _tile_dpbf16ps(3, A_TILE, B_TILE);                        \
    }                                                           \
  } while (0)

// Query rows in row blocks of kTileRows (the last one zero-padded); per tile of vectors and row
// block, the products go to C tiles, are stored to a small buffer and read back by the exp2 pass.
// Two buffers: the next row block's products are issued before this one's exp2 pass, so the tile
// unit works while the vector units do. Queries as in the bf16-dot path: unscaled bf16 pairs
// (exact for bf16 queries; fp16/fp32 queries add a second product with their low parts).
struct AmxBf16Kernel {
  const ChunkArgs& args;
  size_t pairs;       // kept channel pairs, the K of a score in 32-bit words
  size_t k_steps;     // ceil(pairs / kTilePairs)
  size_t last_pairs;  // pairs of the last K step
  size_t row_blocks;  // ceil(num_rows / kTileRows)
  const float* high;  // bit patterns, see GatheredLayout
  const float* low;
  // UseScratch: [2][kMaxVectors] C tiles, then the A rows [row_blocks * kTileRows][pairs] of the
  // high parts (and of the low parts with split queries), zero beyond num_rows.
  float* c_tiles = nullptr;
  float* a_high = nullptr;
  float* a_low = nullptr;

  const uint32_t* Words(size_t group, size_t vector) const {
    return reinterpret_cast<const uint32_t*>(args.rep) +
           (group * args.vectors + vector) * pairs * kLanes;
  }
  size_t VectorBytes() const { return pairs * kLanes * 4; }
  size_t PaddedRowFloats() const { return row_blocks * kTileRows * pairs; }
  size_t ScratchFloats() const {
    return 2 * kMaxVectors * kTileFloats + (args.split_queries ? 2 : 1) * PaddedRowFloats();
  }
  void UseScratch(float* memory) {
    c_tiles = memory;
    a_high = c_tiles + 2 * kMaxVectors * kTileFloats;
    a_low = a_high + PaddedRowFloats();
    const size_t row_floats = args.num_rows * pairs;
    std::memcpy(a_high, high, row_floats * sizeof(float));
    std::fill(a_high + row_floats, a_high + PaddedRowFloats(), 0.0f);
    if (args.split_queries) {
      std::memcpy(a_low, low, row_floats * sizeof(float));
      std::fill(a_low + row_floats, a_low + PaddedRowFloats(), 0.0f);
    }
    CompilerBarrier();
  }

  // Row block `block` against kVectors vectors from `words`: the C tiles, stored to `c`
  // ([kVectors][kTileRows][kLanes]).
  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void Multiply(const uint32_t* words, size_t block, float* c) const {
    const size_t vector_words = pairs * kLanes;
    const size_t a_stride = pairs * sizeof(uint32_t);
    const size_t b_stride = kLanes * sizeof(uint32_t);
    _tile_zero(0);
    if constexpr (kVectors > 1) _tile_zero(1);
    if constexpr (kVectors > 2) _tile_zero(2);
    if constexpr (kVectors > 3) _tile_zero(3);
    for (int part = 0; part < (args.split_queries ? 2 : 1); ++part) {
      const float* a = (part == 0 ? a_high : a_low) + block * kTileRows * pairs;
      size_t k = 0;
      for (; k + 1 < k_steps; ++k) {
        KVSTAR_TILE_STEP(4, 5, a + k * kTilePairs, words + k * kTilePairs * kLanes);
      }
      KVSTAR_TILE_STEP(6, 7, a + k * kTilePairs, words + k * kTilePairs * kLanes);
    }
    const size_t c_stride = kLanes * sizeof(float);
    _tile_stored(0, c, c_stride);
    if constexpr (kVectors > 1) _tile_stored(1, c + kTileFloats, c_stride);
    if constexpr (kVectors > 2) _tile_stored(2, c + 2 * kTileFloats, c_stride);
    if constexpr (kVectors > 3) _tile_stored(3, c + 3 * kTileFloats, c_stride);
  }

  // Rows row0 .. row0 + kRows (rows r .. r + kRows of the buffer `c`): scaled, relative to the
  // references, then exp2 and the block sums.
  template <size_t kVectors, size_t kRows>
  KVSTAR_AVX512_INLINE void AccumulateRows(const float* c, size_t r, size_t row0,
                                           const RowState& state, const Tile& tile) const {
    const __m512 scale = _mm512_set1_ps(args.dot_scale);
    __m512 acc[kVectors][kRows];
    KVSTAR_UNROLL
    for (size_t i = 0; i < kRows; ++i) {
      const __m512 start = _mm512_set1_ps(-state.reference[row0 + i]);
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) {
        acc[v][i] =
            _mm512_fmadd_ps(_mm512_load_ps(c + v * kTileFloats + (r + i) * kLanes), scale, start);
      }
    }
    Accumulate<kVectors, kRows>(acc, row0, state, tile);
  }

  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void ScoreTile(size_t num_rows, const RowState& state, const Tile& tile,
                                      const char* next, size_t next_bytes) const {
    const uint32_t* words = Words(tile.group, tile.first_vector);
    constexpr size_t kBufferFloats = kMaxVectors * kTileFloats;
    const size_t share = (next_bytes / row_blocks + 63) / 64 * 64 + 64;
    Multiply<kVectors>(words, 0, c_tiles);
    for (size_t block = 0; block < row_blocks; ++block) {
      for (size_t offset = block * share; offset < std::min(next_bytes, (block + 1) * share);
           offset += 64) {
        _mm_prefetch(next + offset, _MM_HINT_T0);
      }
      if (block + 1 < row_blocks) {
        Multiply<kVectors>(words, block + 1, c_tiles + ((block + 1) % 2) * kBufferFloats);
      }
      const float* c = c_tiles + (block % 2) * kBufferFloats;
      const size_t row0 = block * kTileRows;
      const size_t rows = std::min(kTileRows, num_rows - row0);
      size_t r = 0;
      for (; r + 4 <= rows; r += 4) AccumulateRows<kVectors, 4>(c, r, row0 + r, state, tile);
      switch (rows - r) {
        case 3:
          AccumulateRows<kVectors, 3>(c, r, row0 + r, state, tile);
          break;
        case 2:
          AccumulateRows<kVectors, 2>(c, r, row0 + r, state, tile);
          break;
        case 1:
          AccumulateRows<kVectors, 1>(c, r, row0 + r, state, tile);
          break;
        default:
          break;
      }
    }
  }
};

#undef KVSTAR_TILE_STEP

}  // namespace

// The tile configuration is per thread and LDTILECFG zeroes the tiles, so every chunk loads its
// own (a few dozen cycles against a chunk's ~1 M) and releases the tiles at its end: the scorer's
// pool threads need no setup, and a thread between chunks holds no tile state for the OS to save.
KVSTAR_AMX void ScoreChunkAmxBf16(const ChunkArgs& args) {
  const GatheredLayout gathered(args.num_rows, args.kept);
  const size_t pairs = gathered.pairs;
  const size_t k_steps = (pairs + kTilePairs - 1) / kTilePairs;
  AmxBf16Kernel kernel{args,
                       pairs,
                       k_steps,
                       pairs - (k_steps - 1) * kTilePairs,
                       (args.num_rows + kTileRows - 1) / kTileRows,
                       args.gathered + gathered.high,
                       args.gathered + gathered.low};
  TileConfig config;
  for (int c = 0; c < 4; ++c) {
    config.rows[c] = kTileRows;
    config.colsb[c] = kLanes * sizeof(float);
  }
  config.rows[4] = kTileRows;
  config.colsb[4] = kTilePairs * sizeof(uint32_t);
  config.rows[5] = kTilePairs;
  config.colsb[5] = kLanes * sizeof(uint32_t);
  config.rows[6] = kTileRows;
  config.colsb[6] = static_cast<uint16_t>(kernel.last_pairs * sizeof(uint32_t));
  config.rows[7] = static_cast<uint8_t>(kernel.last_pairs);
  config.colsb[7] = kLanes * sizeof(uint32_t);
  CompilerBarrier();
  _tile_loadconfig(&config);
  ScanChunk(args, kernel);
  _tile_release();
}

#else  // no x86 kernels on this architecture or compiler

void ScoreChunkAmxBf16(const ChunkArgs&) {}

#endif

}  // namespace kvstar::retrieval::internal
