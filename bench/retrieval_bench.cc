// Retrievals of every layer at a real model's shapes, for one sequence and for batches of
// sequences, on every scoring path (Highway, AVX512_BF16 dot products, AMX-BF16 tile products,
// int8 with VNNI, int8 with AMX-INT8 tile products, int8 on Highway): the scan against its floors
// (the representation bytes read at the memory bandwidth, and the fp32 FMA peak, both measured
// here) and against the original implementation's method (a GEMV per query row), all measured in
// the same run.
//
//   bazel run -c opt //bench:retrieval_bench -- --model=qwen2.5-14b --context=32768
//       [--threads=N] [--iters=N] [--rpc_calls=N] [--batches=1,16,64]
//       [--paths=highway,bf16-dot,amx-bf16,int8-vnni,amx-int8,int8-highway] [--batch_memory_gb=1]
//
// --rpc_calls=N (default 20; 0 skips) also serves the same sequence from a real kvstar server on
// loopback (memory backend, so no disk is measured) and times N Retrieve RPCs of all layers.
// A batch's requests cycle through as many distinct indexes as --batch_memory_gb holds (per
// format); beyond that, requests repeat an index, whose layers may then be read from the LLC.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// A scoring path as the table names it: the representation format and the forced ScorePath.
struct PathCase {
  const char* name;
  retrieval::RepresentationFormat format;
  retrieval::ScorePath path;
};

constexpr PathCase kPaths[] = {
    {"highway", retrieval::RepresentationFormat::kBf16, retrieval::ScorePath::kHighway},
    {"bf16-dot", retrieval::RepresentationFormat::kBf16, retrieval::ScorePath::kBf16Dot},
    {"amx-bf16", retrieval::RepresentationFormat::kBf16, retrieval::ScorePath::kAmxBf16},
    {"int8-vnni", retrieval::RepresentationFormat::kInt8, retrieval::ScorePath::kInt8Vnni},
    {"amx-int8", retrieval::RepresentationFormat::kInt8, retrieval::ScorePath::kAmxInt8},
    {"int8-highway", retrieval::RepresentationFormat::kInt8, retrieval::ScorePath::kHighway},
};

std::vector<uint32_t> ParseList(const char* text) {
  std::vector<uint32_t> values;
  for (const char* p = text; *p != '\0';) {
    char* end;
    values.push_back(static_cast<uint32_t>(std::strtoul(p, &end, 10)));
    p = *end == ',' ? end + 1 : end;
    if (end == p && *p != '\0') break;
  }
  return values;
}

struct Row {
  std::string path;
  uint32_t batch = 0;
  double call_ms = 0;         // median of one Retrieve call of the whole batch
  double per_seq_ms = 0;      // call_ms / batch
  double bytes_floor_ms = 0;  // per retrieval: representation bytes / measured bandwidth
  double rep_mb = 0;
  uint32_t same_layers = 0;  // batch 1: layers whose selection equals the GEMV baseline's
  double gemv_near_ms = 0;   // the GEMV baseline timed next to this row (see time_gemv_sample)
};

int Main(int argc, char** argv) {
  std::string model_name = "qwen2.5-14b";
  std::string paths_arg = "highway,bf16-dot,amx-bf16,int8-vnni,amx-int8,int8-highway";
  uint32_t context = 32768, iters = 10, rpc_calls = 20;
  std::vector<uint32_t> batches = {1, 16, 64};
  double batch_memory_gb = 1.0;
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
    } else if (const char* v = value("--paths=")) {
      paths_arg = v;
    } else if (const char* v = value("--batches=")) {
      batches = ParseList(v);
    } else if (const char* v = value("--batch_memory_gb=")) {
      batch_memory_gb = std::strtod(v, nullptr);
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
  std::vector<const PathCase*> paths;
  for (const PathCase& p : kPaths) {
    if (("," + paths_arg + ",").find(std::string(",") + p.name + ",") != std::string::npos) {
      paths.push_back(&p);
    }
  }
  const ModelShape shape{model->layers, model->q_heads, model->kv_heads, model->head_dim,
                         128,           DType::kBf16};
  const uint32_t num_blocks = std::max(1u, context / shape.block_size);
  const uint32_t num_queries = Knobs().retrieval_stride;

  // Random bf16 keys: a pool of distinct blocks reused across the context (only the
  // representations' size matters to the scan); each index of a batch takes them in its own order.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const size_t block_elems = shape.key_block_bytes() / 2;
  std::vector<std::vector<uint16_t>> pool_blocks(16, std::vector<uint16_t>(block_elems));
  for (auto& block : pool_blocks) {
    for (uint16_t& v : block) v = retrieval::F32ToBf16(normal(rng));
  }
  auto spans_for = [&](uint32_t variant) {
    std::vector<absl::Span<const uint8_t>> spans;
    for (uint32_t b = 0; b < num_blocks; ++b) {
      const auto& block = pool_blocks[(b * 7 + b / 16 + variant * 5) % pool_blocks.size()];
      spans.emplace_back(reinterpret_cast<const uint8_t*>(block.data()), block.size() * 2);
    }
    return spans;
  };
  const std::vector<absl::Span<const uint8_t>> spans = spans_for(0);
  retrieval::Retriever retriever(threads);
  std::vector<uint32_t> all_layers(shape.num_layers);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) all_layers[layer] = layer;

  std::vector<std::vector<uint8_t>> queries(shape.num_layers);
  for (auto& q : queries) {
    q.resize(shape.query_bytes(num_queries));
    for (size_t i = 0; i < q.size() / 2; ++i) {
      const uint16_t v = retrieval::F32ToBf16(normal(rng));
      std::memcpy(&q[2 * i], &v, 2);
    }
  }

  // Indexes per format: as many distinct ones as the batch memory budget holds (at least one);
  // a batch's requests cycle through them.
  const uint32_t max_batch = *std::max_element(batches.begin(), batches.end());
  struct FormatIndexes {
    std::vector<std::unique_ptr<SequenceIndex>> indexes;
    double seal_s = 0;
  };
  std::vector<FormatIndexes> by_format(2);
  for (const PathCase* p : paths) {
    FormatIndexes& f = by_format[static_cast<size_t>(p->format)];
    if (!f.indexes.empty()) continue;
    Knobs knobs;
    knobs.representation_format = p->format;
    uint32_t wanted = 1;
    do {
      auto index = SequenceIndex::Create(shape, knobs).value();
      const std::vector<std::vector<absl::Span<const uint8_t>>> layer_spans(
          shape.num_layers, spans_for(static_cast<uint32_t>(f.indexes.size())));
      const auto seal_start = Clock::now();
      if (!retriever.SealLayers(*index, all_layers, layer_spans).ok()) return 1;
      if (f.indexes.empty()) f.seal_s = SecondsSince(seal_start);
      if (f.indexes.empty()) {
        wanted = static_cast<uint32_t>(std::clamp<double>(
            batch_memory_gb * 1e9 / static_cast<double>(index->representation_bytes()), 1.0,
            max_batch));
      }
      f.indexes.push_back(std::move(index));
      std::fprintf(stderr, "sealed %s index %zu of %u\n",
                   retrieval::RepresentationFormatName(p->format), f.indexes.size(), wanted);
    } while (f.indexes.size() < wanted);
  }

  retrieval::ThreadPool pool(retriever.num_threads());
  const double membw_gbps = MeasureReadBandwidth(pool);
  // The FMA peak is measured before and after the scans and the higher kept: a shared host's
  // clock and neighbours move it, and an underestimate would flatter the scan.
  double fma_gflops = MeasureFmaPeak(pool);

  // Baseline: the original method over the bf16 representation, one task per layer spread over
  // the same threads, reading the representation in the layout it was written for.
  auto baseline_index = SequenceIndex::Create(shape, Knobs()).value();
  {
    const std::vector<std::vector<absl::Span<const uint8_t>>> layer_spans(shape.num_layers, spans);
    if (!retriever.SealLayers(*baseline_index, all_layers, layer_spans).ok()) return 1;
  }
  std::vector<std::vector<std::vector<uint16_t>>> row_major(shape.num_layers);
  for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
    for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
      row_major[layer].push_back(baseline_index->RowMajorRepresentation(layer, h));
    }
  }
  std::vector<std::vector<uint32_t>> gemv_selection(shape.num_layers);
  // Timed before and after the paths' scans, and the faster median kept: on a shared host the
  // load moves during the run, and a baseline slowed by neighbours would flatter every ratio.
  auto time_gemv = [&](uint32_t runs) {
    std::vector<double> times;
    for (uint32_t it = 0; it < runs; ++it) {
      const auto start = Clock::now();
      pool.ParallelFor(shape.num_layers, [&](size_t layer, size_t) {
        gemv_selection[layer] = GemvBaselineLayer(*baseline_index, static_cast<uint32_t>(layer),
                                                  row_major[layer], queries[layer], num_queries);
      });
      times.push_back(SecondsSince(start) * 1e3);
    }
    return Median(times);
  };
  const uint32_t gemv_runs = std::min(iters, 3u);
  double gemv_ms = time_gemv(gemv_runs);
  // The load of a shared host moves within a run: each row's ratio is against the baseline timed
  // right before and after it, on a sample of layers (every layer is the same work) scaled to all.
  const uint32_t sample_layers =
      std::min<uint32_t>(shape.num_layers, std::max<uint32_t>(4, pool.num_threads()));
  auto time_gemv_sample = [&]() {
    const auto start = Clock::now();
    pool.ParallelFor(sample_layers, [&](size_t layer, size_t) {
      GemvBaselineLayer(*baseline_index, static_cast<uint32_t>(layer), row_major[layer],
                        queries[layer], num_queries);
    });
    return SecondsSince(start) * 1e3 * shape.num_layers / sample_layers;
  };

  std::vector<Row> rows;
  std::vector<std::string> skipped;
  for (const PathCase* p : paths) {
    if (!retrieval::ScorePathSupported(p->path, p->format)) {
      skipped.push_back(p->name);
      continue;
    }
    retrieval::SetScorePath(p->path);
    const FormatIndexes& f = by_format[static_cast<size_t>(p->format)];
    for (uint32_t batch : batches) {
      if (batch == 0) continue;
      std::vector<retrieval::RetrievalRequest> requests(batch);
      for (uint32_t r = 0; r < batch; ++r) {
        requests[r].index = f.indexes[r % f.indexes.size()].get();
        requests[r].num_queries = num_queries;
        for (const auto& q : queries) requests[r].layer_queries.emplace_back(q);
      }
      std::vector<std::vector<uint32_t>> selection(shape.num_layers);
      auto on_layer = [&](size_t request, uint32_t layer, absl::Span<const uint32_t> selected) {
        if (request == 0) selection[layer].assign(selected.begin(), selected.end());
      };
      if (!retriever.Retrieve(requests, on_layer).ok()) return 1;  // warm-up
      const double gemv_before_ms = time_gemv_sample();
      // --iters calls of one sequence; batches, whose calls are long, at least 2.
      const uint32_t calls = batch == 1 ? iters : std::max(2u, iters / batch);
      std::vector<double> times;
      for (uint32_t it = 0; it < calls; ++it) {
        const auto start = Clock::now();
        if (!retriever.Retrieve(requests, on_layer).ok()) return 1;
        times.push_back(SecondsSince(start) * 1e3);
      }
      Row row;
      row.gemv_near_ms = std::min(gemv_before_ms, time_gemv_sample());
      row.path = p->name;
      row.batch = batch;
      row.call_ms = Median(times);
      row.per_seq_ms = row.call_ms / batch;
      const double rep_bytes = static_cast<double>(f.indexes[0]->representation_bytes());
      row.rep_mb = rep_bytes / 1e6;
      row.bytes_floor_ms = rep_bytes / (membw_gbps * 1e9) * 1e3;
      for (uint32_t layer = 0; layer < shape.num_layers; ++layer) {
        row.same_layers += selection[layer] == gemv_selection[layer];
      }
      rows.push_back(row);
      std::fprintf(stderr, "%s batch %u: %.2f ms per call\n", p->name, batch, row.call_ms);
    }
  }
  retrieval::SetScorePath(retrieval::ScorePath::kAuto);
  fma_gflops = std::max(fma_gflops, MeasureFmaPeak(pool));
  const double gemv_first_ms = gemv_ms;
  const double gemv_second_ms = time_gemv(gemv_runs);
  gemv_ms = std::min(gemv_first_ms, gemv_second_ms);
  row_major.clear();

  RetrieveRpcResult rpc;
  if (rpc_calls > 0) {
    absl::StatusOr<RetrieveRpcResult> measured =
        MeasureRetrieveRpc(shape, Knobs(), spans, queries, num_queries, rpc_calls, threads);
    if (!measured.ok()) {
      std::fprintf(stderr, "Retrieve RPC: %s\n", measured.status().ToString().c_str());
      return 1;
    }
    rpc = *measured;
  }

  const double q_rows = static_cast<double>(num_queries) * shape.num_q_heads;  // all KV heads
  const double flops = 2.0 * q_rows * num_blocks * baseline_index->vectors_per_block() *
                       baseline_index->kept() * shape.num_layers;
  const double exps = q_rows * num_blocks * baseline_index->vectors_per_block() * shape.num_layers;
  const double fma_floor_ms = flops / (fma_gflops * 1e9) * 1e3;

  std::printf(
      "model %s, context %u: %u layers x %u blocks, %u q / %u KV heads, dim %u -> kept %u, "
      "M %u, %u queries\n",
      model->name, context, shape.num_layers, num_blocks, shape.num_q_heads, shape.num_kv_heads,
      shape.head_dim, baseline_index->kept(), baseline_index->vectors_per_block(), num_queries);
  std::printf(
      "threads %zu, Highway target %s; CPU: AVX512_BF16 %s, AVX512_VNNI %s, AMX-BF16 %s, "
      "AMX-INT8 %s\n",
      retriever.num_threads(), retrieval::DispatchedTargetName(),
      retrieval::ScorePathSupported(retrieval::ScorePath::kBf16Dot,
                                    retrieval::RepresentationFormat::kBf16)
          ? "yes"
          : "no",
      retrieval::ScorePathSupported(retrieval::ScorePath::kInt8Vnni,
                                    retrieval::RepresentationFormat::kInt8)
          ? "yes"
          : "no",
      retrieval::ScorePathSupported(retrieval::ScorePath::kAmxBf16,
                                    retrieval::RepresentationFormat::kBf16)
          ? "yes"
          : "no (or the OS refused the tile state)",
      retrieval::ScorePathSupported(retrieval::ScorePath::kAmxInt8,
                                    retrieval::RepresentationFormat::kInt8)
          ? "yes"
          : "no");
  for (size_t f = 0; f < by_format.size(); ++f) {
    if (by_format[f].indexes.empty()) continue;
    std::printf(
        "%s representation: %.1f MB per sequence, seal %.0f ms, %zu distinct index(es) "
        "cycled through by a batch\n",
        retrieval::RepresentationFormatName(static_cast<retrieval::RepresentationFormat>(f)),
        by_format[f].indexes[0]->representation_bytes() / 1e6, by_format[f].seal_s * 1e3,
        by_format[f].indexes.size());
  }
  std::printf("per retrieval: %.2f GFLOP, %.0f M exponentials\n", flops / 1e9, exps / 1e6);
  std::printf(
      "measured: read bandwidth %.1f GB/s, fp32 FMA peak %.1f GFLOP/s -> fp32-FMA floor %.2f ms "
      "per retrieval\n",
      membw_gbps, fma_gflops, fma_floor_ms);
  std::printf(
      "GEMV baseline (original method, bf16, one sequence, median of %u before and after the "
      "scans: %.2f, %.2f ms): %.2f ms\n",
      gemv_runs, gemv_first_ms, gemv_second_ms, gemv_ms);
  if (!skipped.empty()) {
    std::string names;
    for (const std::string& n : skipped) names += (names.empty() ? "" : ", ") + n;
    std::printf("paths not supported on this CPU (skipped): %s\n", names.c_str());
  }
  if (rpc_calls > 0) {
    std::printf(
        "Retrieve RPC over loopback (auto path, bf16), all %u layers, ids only (%u calls): p50 "
        "%.2f ms, p99 %.2f ms; setup: PutBlocks %.1f s, Seal %.1f s\n",
        shape.num_layers, rpc.calls, rpc.p50_ms, rpc.p99_ms, rpc.put_s, rpc.seal_s);
  }
  std::printf("\n%-13s %5s %10s %9s %10s %9s %10s %8s %8s %7s\n", "path", "batch", "call ms",
              "ms/seq", "retr/s", "rep MB", "bytes-flr", "of-flr", "vs-GEMV", "same");
  for (const Row& row : rows) {
    std::printf("%-13s %5u %10.2f %9.3f %10.1f %9.1f %10.3f %8.3f %7.1fx %7.1fx %7s\n",
                row.path.c_str(), row.batch, row.call_ms, row.per_seq_ms, 1e3 / row.per_seq_ms,
                row.rep_mb, row.bytes_floor_ms, row.bytes_floor_ms / row.per_seq_ms,
                row.gemv_near_ms / row.per_seq_ms, gemv_ms / row.per_seq_ms,
                (std::to_string(row.same_layers) + "/" + std::to_string(shape.num_layers)).c_str());
  }
  std::printf(
      "(ms/seq = call ms / batch; bytes-flr = representation bytes read per retrieval at the "
      "measured bandwidth; of-flr = bytes-flr / ms/seq; vs-GEMV = the GEMV baseline timed next to "
      "the row (a sample of layers, scaled) / ms/seq, (global) = the whole-run GEMV above / "
      "ms/seq; "
      "same = layers of the first sequence whose selection equals the GEMV baseline's)\n");
  for (const Row& row : rows) {
    std::printf(
        "{\"model\": \"%s\", \"context\": %u, \"path\": \"%s\", \"batch\": %u, "
        "\"call_ms\": %.3f, \"ms_per_retrieval\": %.4f, \"retrievals_per_s\": %.1f, "
        "\"bytes_floor_ms\": %.4f, \"fma_floor_ms\": %.4f, \"membw_gbps\": %.2f, "
        "\"gemv_ms\": %.3f, \"speedup_vs_gemv\": %.2f, \"speedup_vs_global_gemv\": %.2f, "
        "\"threads\": %zu}\n",
        model->name, context, row.path.c_str(), row.batch, row.call_ms, row.per_seq_ms,
        1e3 / row.per_seq_ms, row.bytes_floor_ms, fma_floor_ms, membw_gbps, row.gemv_near_ms,
        row.gemv_near_ms / row.per_seq_ms, gemv_ms / row.per_seq_ms, retriever.num_threads());
  }
  return 0;
}

}  // namespace
}  // namespace kvstar::bench

int main(int argc, char** argv) { return kvstar::bench::Main(argc, argv); }
#endif  // HWY_ONCE
