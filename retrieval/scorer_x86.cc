// The scorer's x86 kernels: AVX512_BF16 dot products on the bf16 representation and AVX512_VNNI
// dot products on the int8 one, and the runtime checks of every x86 path (the AMX kernel is in
// scorer_amx.cc). Compiled with function-level target attributes and called only after the
// runtime checks below, so the library itself runs on any x86-64 (and builds elsewhere, where
// these paths are simply never selected).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "retrieval/quantize.h"
#include "retrieval/scorer_kernels.h"

#if KVSTAR_HAVE_X86_KERNELS
#include <cpuid.h>
#include <immintrin.h>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "retrieval/scorer_x86_scan.h"
#endif

namespace kvstar::retrieval::internal {

#if KVSTAR_HAVE_X86_KERNELS
namespace {

struct CpuidRegs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs Cpuid(unsigned leaf, unsigned subleaf) {
  CpuidRegs r;
  if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) return CpuidRegs{};
  return r;
}

uint64_t ReadXcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t{edx} << 32) | eax;
}

// AVX-512 F, DQ, BW, VL, with the OS saving the zmm and opmask state.
bool HasAvx512Base() {
  const CpuidRegs leaf1 = Cpuid(1, 0);
  if ((leaf1.ecx & (1u << 27)) == 0) return false;  // OSXSAVE
  if ((ReadXcr0() & 0xE6) != 0xE6) return false;    // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  const CpuidRegs leaf7 = Cpuid(7, 0);
  const unsigned wanted = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
  return (leaf7.ebx & wanted) == wanted;
}

}  // namespace

bool CpuHasAvx512Vnni() {
  static const bool has = HasAvx512Base() && (Cpuid(7, 0).ecx & (1u << 11)) != 0;
  return has;
}

bool CpuHasAvx512Bf16() {
  static const bool has = HasAvx512Base() && Cpuid(0, 0).eax >= 7 &&
                          (Cpuid(7, 1).eax & (1u << 5)) != 0 && CpuHasAvx512Vnni();
  return has;
}

namespace {

// AMX-TILE (cpuid 7.0 edx bit 24) and the given AMX bits, the OS saving XTILECFG and XTILEDATA
// (XCR0 bits 17, 18), AVX-512 with BF16 for the exp2 pass around the tiles, and the OS's
// permission to use the tile data.
bool HasAmx(unsigned amx_bits) {
  const unsigned wanted = amx_bits | (1u << 24);
  if (!CpuHasAvx512Bf16() || (Cpuid(7, 0).edx & wanted) != wanted ||
      (ReadXcr0() & (3u << 17)) != (3u << 17)) {
    return false;
  }
#if defined(__linux__)
  // Linux (5.16+) hands out the 8 KiB tile data state only to a process that asks for it
  // (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); the grant covers all its threads.
  // Without it the first tile instruction faults, so a refusal means no AMX. Asking again is
  // harmless (the grant stays).
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr unsigned long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0) return false;
  return (permitted & (1ul << kXfeatureXtiledata)) != 0;
#else
  return false;
#endif
}

}  // namespace

bool CpuHasAmxBf16() {
  static const bool has = HasAmx(1u << 22);  // AMX-BF16
  return has;
}

bool CpuHasAmxInt8() {
  static const bool has = HasAmx(1u << 25);  // AMX-INT8
  return has;
}

KVSTAR_AVX512 void FastExp2(const float* x, float* out, size_t count) {
  size_t i = 0;
  for (; i + x86::kLanes <= count; i += x86::kLanes) {
    _mm512_storeu_ps(out + i, x86::Exp2(_mm512_loadu_ps(x + i)));
  }
  if (i < count) {
    const __mmask16 left = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(out + i, left, x86::Exp2(_mm512_maskz_loadu_ps(left, x + i)));
  }
}

namespace {

using x86::Accumulate;
using x86::Bits;
using x86::kLanes;
using x86::RowState;
using x86::ScanChunk;
using x86::ScoreRows;
using x86::Tile;

// bf16 representation: a 32-bit word holds two channels of one block, 16 blocks per load; one
// vdpbf16ps adds both channels' products for 16 blocks. Queries are unscaled bf16 pairs (exact
// for bf16 queries; with kSplit a second pass over the low parts makes fp16/fp32 queries exact
// to 16 bits), the scale is applied once per score.
struct Bf16DotKernel {
  static constexpr size_t kMaxRows = 6;  // 24 accumulators of 32 registers
  const ChunkArgs& args;
  size_t pairs;
  const float* high;  // bit patterns, see GatheredLayout
  const float* low;

  const uint32_t* Words(size_t group, size_t vector) const {
    return reinterpret_cast<const uint32_t*>(args.rep) +
           (group * args.vectors + vector) * pairs * kLanes;
  }
  size_t VectorBytes() const { return pairs * kLanes * 4; }

  size_t ScratchFloats() const { return 0; }
  void UseScratch(float*) {}
  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void ScoreTile(size_t num_rows, const RowState& state, const Tile& tile,
                                      const char* next, size_t next_bytes) const {
    ScoreRows<kVectors>(*this, num_rows, state, tile, next, next_bytes);
  }

  template <size_t kVectors, size_t kRows, bool kSplit>
  KVSTAR_AVX512_INLINE void Score(size_t row0, const RowState& state, const Tile& tile) const {
    const uint32_t* words = Words(tile.group, tile.first_vector);
    const size_t vector_words = pairs * kLanes;
    __m512 acc[kVectors][kRows];
    KVSTAR_UNROLL
    for (size_t v = 0; v < kVectors; ++v) {
      KVSTAR_UNROLL
      for (size_t r = 0; r < kRows; ++r) acc[v][r] = _mm512_setzero_ps();
    }
    for (size_t p = 0; p < pairs; ++p) {
      __m512i w[kVectors];
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) {
        w[v] = _mm512_loadu_si512(words + v * vector_words + p * kLanes);
      }
      KVSTAR_UNROLL
      for (size_t r = 0; r < kRows; ++r) {
        const __m512i q = _mm512_set1_epi32(Bits(high + (row0 + r) * pairs + p));
        KVSTAR_UNROLL
        for (size_t v = 0; v < kVectors; ++v) {
          acc[v][r] = _mm512_dpbf16_ps(acc[v][r], (__m512bh)w[v], (__m512bh)q);
        }
      }
      if (kSplit) {
        KVSTAR_UNROLL
        for (size_t r = 0; r < kRows; ++r) {
          const __m512i q = _mm512_set1_epi32(Bits(low + (row0 + r) * pairs + p));
          KVSTAR_UNROLL
          for (size_t v = 0; v < kVectors; ++v) {
            acc[v][r] = _mm512_dpbf16_ps(acc[v][r], (__m512bh)w[v], (__m512bh)q);
          }
        }
      }
    }
    const __m512 scale = _mm512_set1_ps(args.dot_scale);
    KVSTAR_UNROLL
    for (size_t r = 0; r < kRows; ++r) {
      const __m512 start = _mm512_set1_ps(-state.reference[row0 + r]);
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) acc[v][r] = _mm512_fmadd_ps(acc[v][r], scale, start);
    }
    Accumulate<kVectors, kRows>(acc, row0, state, tile);
  }

  template <size_t kVectors, size_t kRows>
  KVSTAR_AVX512_INLINE void Run(size_t row0, const RowState& state, const Tile& tile) const {
    if (args.split_queries) {
      Score<kVectors, kRows, true>(row0, state, tile);
    } else {
      Score<kVectors, kRows, false>(row0, state, tile);
    }
  }
};

// int8 representation: a 32-bit word holds four channels' codes (offset to unsigned) of one
// block; one vpdpbusd adds the four products with the row's signed codes for 16 blocks. Both query
// codes go into one int32 accumulator: it starts at the offset's share of both codes, takes the
// high codes' dots, is shifted left by 8 bits (x kLowCodeSteps), then takes the low codes' dots,
// so it ends as 256 * high_dot + low_dot exactly (|value| < 2^31 for kept <= 512). One convert and
// one FMA with the vector's scale times the row's then give the score.
struct Int8VnniKernel {
  // One accumulator per score: 4 x 6 of 32 registers, as the bf16 dot kernel.
  static constexpr size_t kMaxRows = 6;
  const ChunkArgs& args;
  size_t quads;
  const float* query_quads;  // bit patterns, see GatheredLayout
  const float* low_query_quads;
  const float* factor;
  const float* offset;  // bit patterns of int32
  const float* low_offset;

  const uint32_t* Words(size_t group, size_t vector) const {
    return reinterpret_cast<const uint32_t*>(args.codes) +
           (group * args.vectors + vector) * quads * kLanes;
  }
  size_t VectorBytes() const { return quads * kLanes * 4; }

  size_t ScratchFloats() const { return 0; }
  void UseScratch(float*) {}
  template <size_t kVectors>
  KVSTAR_AVX512_INLINE void ScoreTile(size_t num_rows, const RowState& state, const Tile& tile,
                                      const char* next, size_t next_bytes) const {
    ScoreRows<kVectors>(*this, num_rows, state, tile, next, next_bytes);
  }

  // acc[v][r] += the dots of `codes` (one code set, [rows][quads] words) with the tile's vectors.
  template <size_t kVectors, size_t kRows>
  KVSTAR_AVX512_INLINE void Dots(const uint32_t* words, const float* codes, size_t row0,
                                 __m512i (&acc)[kVectors][kRows]) const {
    const size_t vector_words = quads * kLanes;
    for (size_t p = 0; p < quads; ++p) {
      __m512i w[kVectors];
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) {
        w[v] = _mm512_loadu_si512(words + v * vector_words + p * kLanes);
      }
      KVSTAR_UNROLL
      for (size_t r = 0; r < kRows; ++r) {
        const __m512i q = _mm512_set1_epi32(Bits(codes + (row0 + r) * quads + p));
        KVSTAR_UNROLL
        for (size_t v = 0; v < kVectors; ++v) acc[v][r] = _mm512_dpbusd_epi32(acc[v][r], w[v], q);
      }
    }
  }

  template <size_t kVectors, size_t kRows>
  KVSTAR_AVX512_INLINE void Run(size_t row0, const RowState& state, const Tile& tile) const {
    const uint32_t* words = Words(tile.group, tile.first_vector);
    __m512i dot[kVectors][kRows];
    KVSTAR_UNROLL
    for (size_t r = 0; r < kRows; ++r) {
      // low_offset is -128 times an even sum (QuantizeQueryInt8): a multiple of 256.
      const __m512i start =
          _mm512_set1_epi32(Bits(offset + row0 + r) + Bits(low_offset + row0 + r) / 256);
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) dot[v][r] = start;
    }
    Dots<kVectors, kRows>(words, query_quads, row0, dot);
    KVSTAR_UNROLL
    for (size_t v = 0; v < kVectors; ++v) {
      KVSTAR_UNROLL
      for (size_t r = 0; r < kRows; ++r) dot[v][r] = _mm512_slli_epi32(dot[v][r], 8);
    }
    Dots<kVectors, kRows>(words, low_query_quads, row0, dot);
    const float* scales =
        args.code_scales + (tile.group * args.vectors + tile.first_vector) * kLanes;
    __m512 acc[kVectors][kRows];
    KVSTAR_UNROLL
    for (size_t r = 0; r < kRows; ++r) {
      const __m512 row_factor = _mm512_set1_ps(factor[row0 + r] * (1.0f / kLowCodeSteps));
      const __m512 start = _mm512_set1_ps(-state.reference[row0 + r]);
      KVSTAR_UNROLL
      for (size_t v = 0; v < kVectors; ++v) {
        const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(scales + v * kLanes), row_factor);
        acc[v][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[v][r]), scale, start);
      }
    }
    Accumulate<kVectors, kRows>(acc, row0, state, tile);
  }
};

}  // namespace

KVSTAR_AVX512 void ScoreChunkBf16Dot(const ChunkArgs& args) {
  const GatheredLayout gathered(args.num_rows, args.kept);
  Bf16DotKernel kernel{args, gathered.pairs, args.gathered + gathered.high,
                       args.gathered + gathered.low};
  ScanChunk(args, kernel);
}

KVSTAR_AVX512 void ScoreChunkInt8Vnni(const ChunkArgs& args) {
  const GatheredLayout gathered(args.num_rows, args.kept);
  Int8VnniKernel kernel{args,
                        gathered.quads,
                        args.gathered + gathered.quad_codes,
                        args.gathered + gathered.low_quad_codes,
                        args.gathered + gathered.factor,
                        args.gathered + gathered.offset,
                        args.gathered + gathered.low_offset};
  ScanChunk(args, kernel);
}

#else  // no x86 kernels on this architecture or compiler

bool CpuHasAvx512Bf16() { return false; }
bool CpuHasAvx512Vnni() { return false; }
bool CpuHasAmxBf16() { return false; }
bool CpuHasAmxInt8() { return false; }
void FastExp2(const float*, float*, size_t) {}
void ScoreChunkBf16Dot(const ChunkArgs&) {}
void ScoreChunkInt8Vnni(const ChunkArgs&) {}

#endif

}  // namespace kvstar::retrieval::internal
