// One retrieval of every layer of one sequence at a real model's shapes: the fused scan against
// its floor (memory bandwidth and fp32 FMA peak, both measured here) and against the original
// implementation's method (a GEMV per query row), all measured in the same run.
//
//   bazel run -c opt //bench:retrieval_bench -- --model=qwen2.5-14b --context=32768
//       [--threads=N] [--iters=N] [--rpc_calls=N]
//
// --rpc_calls=N (default 20; 0 skips) also serves the same sequence from a real kvstar server on
// loopback (memory backend, so no disk is measured) and times N Retrieve RPCs of all layers.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/retrieve_rpc.h"
#include "retrieval/convert.h"
#include "retrieval/retriever.h"
#include "retrieval/scorer.h"
#include "retrieval/thread_pool.h"
#include "retrieval/topk.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "bench/retrieval_bench.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// After foreach_target.h (a block of its own, so formatting keeps the order).
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace kvstar::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Streaming read of a buffer; returns its sum so the loads cannot be dropped.
float SumBufferImpl(const float* data, size_t count) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  size_t i = 0;
  for (; i + 4 * lanes <= count; i += 4 * lanes) {
    a0 = hn::Add(a0, hn::Load(df, data + i));
    a1 = hn::Add(a1, hn::Load(df, data + i + lanes));
    a2 = hn::Add(a2, hn::Load(df, data + i + 2 * lanes));
    a3 = hn::Add(a3, hn::Load(df, data + i + 3 * lanes));
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
  for (; i < count; ++i) sum += data[i];
  return sum;
}

// Register-resident FMAs: 16 independent chains cover FMA latency x ports. Returns FLOPs done.
double FmaLoopImpl(size_t iterations, float* sink) {
  const DF df;
  const auto m = hn::Set(df, 0.9999f), c = hn::Set(df, 1e-4f);
  hn::Vec<DF> a[16];
  HWY_UNROLL(16)
  for (int k = 0; k < 16; ++k) a[k] = hn::Set(df, static_cast<float>(k));
  for (size_t it = 0; it < iterations; ++it) {
    HWY_UNROLL(16)
    for (int k = 0; k < 16; ++k) a[k] = hn::MulAdd(a[k], m, c);
  }
  auto total = a[0];
  HWY_UNROLL(16)
  for (int k = 1; k < 16; ++k) total = hn::Add(total, a[k]);
  *sink = hn::GetLane(total);
  return 2.0 * 16 * hn::Lanes(df) * static_cast<double>(iterations);
}

// The original method's inner loop: one GEMV of a query row over all representation rows.
void GemvImpl(const uint16_t* rep, size_t rows, size_t kept, const float* query, float* scores) {
  const DF df;
  const hn::Rebind<hwy::bfloat16_t, DF> dbf;
  const size_t lanes = hn::Lanes(df);
  const auto* rep_bf = reinterpret_cast<const hwy::bfloat16_t*>(rep);
  for (size_t r = 0; r < rows; ++r) {
    auto acc = hn::Zero(df);
    size_t c = 0;
    for (; c + lanes <= kept; c += lanes) {
      acc = hn::MulAdd(hn::PromoteTo(df, hn::LoadU(dbf, rep_bf + r * kept + c)),
                       hn::LoadU(df, query + c), acc);
    }
    float dot = hn::GetLane(hn::SumOfLanes(df, acc));
    for (; c < kept; ++c) dot += retrieval::Bf16ToF32(rep[r * kept + c]) * query[c];
    scores[r] = dot;
  }
}

// In-place softmax numerators exp(s - max); returns their sum.
float SoftmaxImpl(float* scores, size_t count) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  float max = -INFINITY;
  for (size_t i = 0; i < count; ++i) max = std::max(max, scores[i]);
  const auto vmax = hn::Set(df, max);
  auto sum = hn::Zero(df);
  size_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    const auto e = hn::CallExp(df, hn::Sub(hn::LoadU(df, scores + i), vmax));
    hn::StoreU(e, df, scores + i);
    sum = hn::Add(sum, e);
  }
  float total = hn::GetLane(hn::SumOfLanes(df, sum));
  for (; i < count; ++i) total += (scores[i] = std::exp(scores[i] - max));
  return total;
}

}  // namespace HWY_NAMESPACE
}  // namespace kvstar::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvstar::bench {
namespace {

using retrieval::DType;
using retrieval::Knobs;
using retrieval::ModelShape;
using retrieval::SequenceIndex;
using Clock = std::chrono::steady_clock;

HWY_EXPORT(SumBufferImpl);
HWY_EXPORT(FmaLoopImpl);
HWY_EXPORT(GemvImpl);
HWY_EXPORT(SoftmaxImpl);

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// GB/s of a streaming read over a buffer far larger than the LLC, all threads.
double MeasureReadBandwidth(retrieval::ThreadPool& pool) {
  const size_t count = size_t{1} << 29;  // 2 GiB of floats
  auto buffer = hwy::AllocateAligned<float>(count);
  pool.ParallelFor(pool.num_threads(), [&](size_t t, size_t) {
    const size_t per = count / pool.num_threads();
    std::fill(buffer.get() + t * per, buffer.get() + (t + 1) * per, 1.0f);  // first touch
  });
  double best = 0.0;
  std::vector<float> sums(pool.num_threads());
  for (int rep = 0; rep < 3; ++rep) {
    const auto start = Clock::now();
    pool.ParallelFor(pool.num_threads(), [&](size_t t, size_t) {
      const size_t per = hwy::RoundUpTo(count / pool.num_threads(), 64);
      const size_t begin = std::min(count, t * per), end = std::min(count, begin + per);
      sums[t] = HWY_DYNAMIC_DISPATCH(SumBufferImpl)(buffer.get() + begin, end - begin);
    });
    best = std::max(best, count * sizeof(float) / SecondsSince(start) / 1e9);
  }
  return best;
}

// Peak fp32 FMA GFLOP/s, all threads.
double MeasureFmaPeak(retrieval::ThreadPool& pool) {
  double best = 0.0;
  std::vector<float> sinks(pool.num_threads());
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<double> flops(pool.num_threads());
    const auto start = Clock::now();
    pool.ParallelFor(pool.num_threads(), [&](size_t t, size_t) {
      flops[t] = HWY_DYNAMIC_DISPATCH(FmaLoopImpl)(size_t{40} << 20, &sinks[t]);
    });
    const double seconds = SecondsSince(start);
    double total = 0.0;
    for (double f : flops) total += f;
    best = std::max(best, total / seconds / 1e9);
  }
  return best;
}

// The original implementation's method for one layer: per (KV head, query token, q head) a
// GEMV over the whole representation, a softmax over that row, votes summed per block.
// `row_major[h]` is head h's representation in its layout, [blocks][M][kept] (made before timing).
std::vector<uint32_t> GemvBaselineLayer(const SequenceIndex& index, uint32_t layer,
                                        const std::vector<std::vector<uint16_t>>& row_major,
                                        const std::vector<uint8_t>& queries, uint32_t num_queries) {
  const ModelShape& shape = index.shape();
  const uint32_t kept = index.kept(), vectors = index.vectors_per_block();
  const uint32_t num_blocks = index.num_blocks(layer);
  const size_t rows = size_t{num_blocks} * vectors;
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  std::vector<float> votes(num_blocks, 0.0f), scores(rows), query(kept);
  for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
    const auto channels = index.kept_channels(layer, h);
    for (uint32_t s = 0; s < num_queries; ++s) {
      for (uint32_t g = 0; g < shape.group_size(); ++g) {
        const size_t base =
            (size_t{s} * shape.num_q_heads + h * shape.group_size() + g) * shape.head_dim;
        for (uint32_t j = 0; j < kept; ++j) {
          query[j] = scale * retrieval::LoadAsF32(shape.dtype, queries.data(), base + channels[j]);
        }
        HWY_DYNAMIC_DISPATCH(GemvImpl)
        (row_major[h].data(), rows, kept, query.data(), scores.data());
        const float inverse = 1.0f / HWY_DYNAMIC_DISPATCH(SoftmaxImpl)(scores.data(), rows);
        for (size_t r = 0; r < rows; ++r) votes[r / vectors] += scores[r] * inverse;
      }
    }
  }
  return retrieval::SelectBlocks(votes, index.knobs());
}

struct Model {
  const char* name;
  uint32_t layers, q_heads, kv_heads, head_dim;
};

constexpr Model kModels[] = {
    {"qwen2.5-14b", 48, 40, 8, 128},
    {"llama3-8b", 32, 32, 8, 128},
    {"smollm2-135m", 30, 9, 3, 64},
};

int Main(int argc, char** argv) {
  std::string model_name = "qwen2.5-14b";
  uint32_t context = 32768, iters = 10, rpc_calls = 20;
  size_t threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const size_t len = std::strlen(flag);
      return arg.compare(0, len, flag) == 0 ? argv[i] + len : nullptr;
    };
    if (const char* v = value("--model=")) {
      model_name = v;
    } else if (const char* v = value("--context=")) {
      context = static_cast<uint32_t>(std::strtoul(v, nullptr, 10));
    } else if (const char* v = value("--threads=")) {
      threads = std::strtoul(v, nullptr, 10);
    } else if (const char* v = value("--rpc_calls=")) {
      rpc_calls = static_cast<uint32_t>(std::strtoul(v, nullptr, 10));
    } else if (const char* v = value("--iters=")) {
      iters = std::max(1ul, std::strtoul(v, nullptr, 10));
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  const Model* model = nullptr;
  for (const Model& m : kModels) {
    if (model_name == m.name) model = &m;
  }
  if (model == nullptr) {
    std::fprintf(stderr, "unknown --model=%s (qwen2.5-14b, llama3-8b, smollm2-135m)\n",
                 model_name.c_str());
    return 2;
  }
  const ModelShape shape{model->layers, model->q_heads, model->kv_heads, model->head_dim,
                         128,           DType::kBf16};
  const Knobs knobs;  // prune 0.25, merge 2, stride 8
  const uint32_t num_blocks = std::max(1u, context / shape.block_size);
  const uint32_t num_queries = knobs.retrieval_stride;

  // Random bf16 keys: a pool of distinct blocks reused across the context (only the
  // representations' size matters to the scan).
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const size_t block_elems = shape.key_block_bytes() / 2;
  std::vector<std::vector<uint16_t>> pool_blocks(16, std::vector<uint16_t>(block_elems));
  for (auto& block : pool_blocks) {
    for (uint16_t& v : block) v = retrieval::F32ToBf16(normal(rng));
  }
  std::vector<absl::Span<const uint8_t>> spans;
  for (uint32_t b = 0; b < num_blocks; ++b) {
    const auto& block = pool_blocks[(b * 7 + b / 16) % pool_blocks.size()];
    spans.emplace_back(reinterpret_cast<const uint8_t*>(block.data()), block.size() * 2);
  }
  auto index = SequenceIndex::Create(shape, knobs).value();
  retrieval::Retriever retriever(threads);
  std::vector<uint32_t> all_layers(shape.num_layers);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) all_layers[layer] = layer;
  const std::vector<std::vector<absl::Span<const uint8_t>>> layer_spans(shape.num_layers, spans);
  const auto seal_start = Clock::now();
  if (!retriever.SealLayers(*index, all_layers, layer_spans).ok()) return 1;
  const double seal_s = SecondsSince(seal_start);
  std::vector<std::vector<uint8_t>> queries(shape.num_layers);
  retrieval::RetrievalRequest request;
  request.index = index.get();
  request.num_queries = num_queries;
  for (auto& q : queries) {
    q.resize(shape.query_bytes(num_queries));
    for (size_t i = 0; i < q.size() / 2; ++i) {
      const uint16_t v = retrieval::F32ToBf16(normal(rng));
      std::memcpy(&q[2 * i], &v, 2);
    }
    request.layer_queries.emplace_back(q);
  }

  retrieval::ThreadPool pool(retriever.num_threads());
  const double membw_gbps = MeasureReadBandwidth(pool);
  // The FMA peak is measured before and after the scan and the higher kept: a shared host's
  // clock and neighbours move it, and an underestimate would flatter the scan.
  double fma_gflops = MeasureFmaPeak(pool);

  std::vector<std::vector<uint32_t>> fused_selection(shape.num_layers);
  auto on_layer = [&](size_t, uint32_t layer, absl::Span<const uint32_t> selected) {
    fused_selection[layer].assign(selected.begin(), selected.end());
  };
  if (!retriever.Retrieve({request}, on_layer).ok()) return 1;  // warm-up
  std::vector<double> scan_times;
  for (uint32_t it = 0; it < iters; ++it) {
    const auto start = Clock::now();
    if (!retriever.Retrieve({request}, on_layer).ok()) return 1;
    scan_times.push_back(SecondsSince(start) * 1e3);
  }
  const double scan_ms = Median(scan_times);
  fma_gflops = std::max(fma_gflops, MeasureFmaPeak(pool));

  // Baseline: one task per layer, tasks spread over the same threads, reading the representation
  // in the layout it was written for.
  std::vector<std::vector<std::vector<uint16_t>>> row_major(shape.num_layers);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      row_major[layer].push_back(index->RowMajorRepresentation(layer, h));
    }
  }
  std::vector<std::vector<uint32_t>> gemv_selection(shape.num_layers);
  std::vector<double> gemv_times;
  for (uint32_t it = 0; it < std::min(iters, 3u); ++it) {
    const auto start = Clock::now();
    pool.ParallelFor(shape.num_layers, [&](size_t layer, size_t) {
      gemv_selection[layer] = GemvBaselineLayer(*index, static_cast<uint32_t>(layer),
                                                row_major[layer], queries[layer], num_queries);
    });
    gemv_times.push_back(SecondsSince(start) * 1e3);
  }
  const double gemv_ms = Median(gemv_times);
  uint32_t same_layers = 0;
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    same_layers += fused_selection[layer] == gemv_selection[layer];
  }

  RetrieveRpcResult rpc;
  if (rpc_calls > 0) {
    absl::StatusOr<RetrieveRpcResult> measured =
        MeasureRetrieveRpc(shape, knobs, spans, queries, num_queries, rpc_calls, threads);
    if (!measured.ok()) {
      std::fprintf(stderr, "Retrieve RPC: %s\n", measured.status().ToString().c_str());
      return 1;
    }
    rpc = *measured;
  }

  const double rep_bytes = static_cast<double>(index->representation_bytes());
  const double rows = static_cast<double>(num_queries) * shape.num_q_heads;  // over all KV heads
  const double flops =
      2.0 * rows * num_blocks * index->vectors_per_block() * index->kept() * shape.num_layers;
  const double exps = rows * num_blocks * index->vectors_per_block() * shape.num_layers;
  const double memory_ms = rep_bytes / (membw_gbps * 1e9) * 1e3;
  const double compute_ms = flops / (fma_gflops * 1e9) * 1e3;
  const double floor_ms = std::max(memory_ms, compute_ms);
  const char* target = retrieval::DispatchedTargetName();

  std::printf(
      "model %s, context %u: %u layers x %u blocks, %u q / %u KV heads, dim %u -> kept %u, "
      "M %u, %u queries\n",
      model->name, context, shape.num_layers, num_blocks, shape.num_q_heads, shape.num_kv_heads,
      shape.head_dim, index->kept(), index->vectors_per_block(), num_queries);
  std::printf("threads %zu, SIMD target %s, seal (build representations) %.0f ms\n",
              retriever.num_threads(), target, seal_s * 1e3);
  std::printf("representation %.1f MB (bf16), %.2f GFLOP, %.0f M exponentials per retrieval\n",
              rep_bytes / 1e6, flops / 1e9, exps / 1e6);
  std::printf("measured: read bandwidth %.1f GB/s, fp32 FMA peak %.1f GFLOP/s\n", membw_gbps,
              fma_gflops);
  std::printf("floor: max(memory %.2f ms, FMA %.2f ms) = %.2f ms\n", memory_ms, compute_ms,
              floor_ms);
  std::printf("fused scan (median of %u): %.2f ms = %.2f of floor; %.1f GFLOP/s, %.1f GB/s\n",
              iters, scan_ms, floor_ms / scan_ms, flops / scan_ms / 1e6, rep_bytes / scan_ms / 1e6);
  std::printf(
      "GEMV baseline (original method, median of %zu): %.2f ms -> speedup %.2fx; "
      "identical selections in %u/%u layers\n",
      gemv_times.size(), gemv_ms, gemv_ms / scan_ms, same_layers, shape.num_layers);
  if (rpc_calls > 0) {
    std::printf(
        "Retrieve RPC over loopback, all %u layers, ids only (%u calls): p50 %.2f ms, "
        "p99 %.2f ms; setup: PutBlocks %.1f s, Seal %.1f s\n",
        shape.num_layers, rpc.calls, rpc.p50_ms, rpc.p99_ms, rpc.put_s, rpc.seal_s);
  }
  std::printf(
      "{\"model\": \"%s\", \"context\": %u, \"scan_ms\": %.3f, \"floor_ms\": %.3f, "
      "\"roofline_fraction\": %.3f, \"membw_gbps\": %.2f, \"fma_gflops\": %.1f, "
      "\"gemv_ms\": %.3f, \"speedup_vs_gemv\": %.2f, \"simd_target\": \"%s\", "
      "\"threads\": %zu, \"retrieve_p50_ms\": %.3f, \"retrieve_p99_ms\": %.3f, "
      "\"seal_s\": %.2f}\n",
      model->name, context, scan_ms, floor_ms, floor_ms / scan_ms, membw_gbps, fma_gflops, gemv_ms,
      gemv_ms / scan_ms, target, retriever.num_threads(), rpc.p50_ms, rpc.p99_ms, rpc.seal_s);
  return 0;
}

}  // namespace
}  // namespace kvstar::bench

int main(int argc, char** argv) { return kvstar::bench::Main(argc, argv); }
#endif  // HWY_ONCE
