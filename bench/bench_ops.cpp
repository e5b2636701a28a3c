// GFLOP/s of opdlm's CPU matmul/Linear (forward, backward) and attention (forward, backward) next to
// raw cblas_sgemm measured in the same process; prints a table of opdlm/sgemm ratios at the end.
// Run: build/bench/opdlm_bench_ops [--benchmark_repetitions=3] [--benchmark_filter=linear]
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "opdlm/ops/attention.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/ops/matmul.hpp"

using namespace opdlm;
using namespace opdlm::ops;

namespace {

// Deterministic fill without the test library: uniform in [-1, 1) from a 64-bit LCG.
Tensor rand_f32(const Shape& s, uint64_t seed) {
  Tensor t = Tensor::empty(s, DType::f32);
  float* p = t.data<float>();
  uint64_t x = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = static_cast<float>((x >> 40) * (1.0 / (1 << 24))) * 2.f - 1.f;
  }
  return t;
}

void set_gflops(benchmark::State& st, double flops_per_iter) {
  // kIsIterationInvariantRate = value * iterations / seconds.
  st.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void raw_sgemm(bool ta, bool tb, int m, int n, int k, const float* a, const float* b, float* c, float beta) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1.f, a,
              ta ? m : k, b, tb ? k : n, beta, c, n);
}

// Runs `op` and the raw-BLAS reference `ref` alternately in every iteration and times each, so both
// see the same load on a shared machine. Counters: GFLOP/s of op (rate over the manual time),
// sgemm_GFLOP/s of ref and ratio = op / sgemm.
using Clock = std::chrono::steady_clock;
template <class Op, class Ref>
void paired(benchmark::State& st, double op_flops, double ref_flops, Op&& op, Ref&& ref) {
  double t_op = 0, t_ref = 0;
  for (auto _ : st) {
    const auto t0 = Clock::now();
    op();
    const auto t1 = Clock::now();
    ref();
    const auto t2 = Clock::now();
    const double a = std::chrono::duration<double>(t1 - t0).count();
    st.SetIterationTime(a);
    t_op += a;
    t_ref += std::chrono::duration<double>(t2 - t1).count();
  }
  const double it = double(st.iterations());
  st.counters["GFLOP/s"] = benchmark::Counter(op_flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  const double sg = ref_flops * 1e-9 * it / t_ref;
  st.counters["sgemm_GFLOP/s"] = sg;
  st.counters["ratio"] = (op_flops * 1e-9 * it / t_op) / sg;
}

// ---- Linear: x [n, in], w [out, in]; forward 2*n*in*out flops, backward (dx and dw) twice that ----
struct LinearShape {
  int64_t n, in, out;
  std::string name() const {
    return std::to_string(n) + "x" + std::to_string(in) + "*" + std::to_string(in) + "x" + std::to_string(out);
  }
};

void bm_linear_fwd(benchmark::State& st, LinearShape s) {
  Tensor x = rand_f32({s.n, s.in}, 1), w = rand_f32({s.out, s.in}, 2);
  Tensor y_ref = Tensor::empty({s.n, s.out});
  const double flops = 2.0 * s.n * s.in * s.out;
  paired(st, flops, flops, [&] { benchmark::DoNotOptimize(linear_forward(x, w).raw_data()); },
         [&] {
           raw_sgemm(false, true, int(s.n), int(s.out), int(s.in), x.data<float>(), w.data<float>(),
                     y_ref.data<float>(), 0.f);
           benchmark::ClobberMemory();
         });
}

void bm_linear_bwd(benchmark::State& st, LinearShape s) {
  Tensor x = rand_f32({s.n, s.in}, 1), w = rand_f32({s.out, s.in}, 2), dy = rand_f32({s.n, s.out}, 3);
  Tensor dx, dw = Tensor::zeros({s.out, s.in});
  Tensor dx_ref = Tensor::empty({s.n, s.in}), dw_ref = Tensor::zeros({s.out, s.in});
  const double flops = 4.0 * s.n * s.in * s.out;
  paired(st, flops, flops,
         [&] {
           linear_backward(x, w, dy, &dx, &dw);
           benchmark::ClobberMemory();
         },
         [&] {
           raw_sgemm(false, false, int(s.n), int(s.in), int(s.out), dy.data<float>(), w.data<float>(),
                     dx_ref.data<float>(), 0.f);
           raw_sgemm(true, false, int(s.out), int(s.in), int(s.n), dy.data<float>(), x.data<float>(),
                     dw_ref.data<float>(), 1.f);
           benchmark::ClobberMemory();
         });
}

// ---- plain matmul a [M, K] @ b [K, N], and batched a [B, M, K] @ b [B, K, N] --------------------------
void bm_matmul(benchmark::State& st, int64_t batch, int64_t m, int64_t k, int64_t n) {
  Tensor a = rand_f32({batch, m, k}, 4), b = rand_f32({batch, k, n}, 5), c = Tensor::empty({batch, m, n});
  Tensor a2 = a.view({batch * m, k}), b2 = b.slice(0, 1).view({k, n}), c2 = c.view({batch * m, n});
  Tensor c_ref = Tensor::empty({batch, m, n});
  const double flops = 2.0 * batch * m * n * k;
  paired(st, flops, flops,
         [&] {
           if (batch == 1) matmul(a2, false, b2, false, c2);
           else matmul(a, false, b, false, c);
           benchmark::ClobberMemory();
         },
         [&] {
           for (int64_t i = 0; i < batch; ++i)
             raw_sgemm(false, false, int(m), int(n), int(k), a.data<float>() + i * m * k,
                       b.data<float>() + i * k * n, c_ref.data<float>() + i * m * n, 0.f);
           benchmark::ClobberMemory();
         });
}

// ---- attention ---------------------------------------------------------------------------------------
// FLOP convention: only allowed (q, k) pairs count (masked work is skipped, not computed). Per pair
// and query head: forward 4*D (q.k and p*v, 2*D each); backward 8*D (dv += p*do, dp = do.v,
// dq += ds*k, dk += ds*q); the backward's recomputation of q.k is not counted (as FlashAttention).
// Reference: sgemm of dense attention's score GEMM for one KV head, [G*T, D] @ [D, T], G = Hq/Hkv.
struct AttnShape {
  const char* mask_name;
  int64_t B, T, Hq, Hkv, D;
  MaskDescriptor mask;
  std::string name() const {
    return std::string(mask_name) + "/B" + std::to_string(B) + "_T" + std::to_string(T) + "_Hq" +
           std::to_string(Hq) + "_Hkv" + std::to_string(Hkv) + "_D" + std::to_string(D);
  }
};

double allowed_pairs(const AttnShape& s) {
  s.mask.validate(s.T, s.T, "mask");
  double pairs = 0;
  KeyRange r[2];
  for (int64_t q = 0; q < s.T; ++q) {
    const int nr = s.mask.ranges(q, s.T, r);
    for (int i = 0; i < nr; ++i) pairs += double(r[i].end - r[i].begin);
  }
  return pairs * double(s.B);
}

struct ScoreGemm {
  int m, n, k;
  Tensor a, b, c;
  explicit ScoreGemm(const AttnShape& s)
      : m(int(s.Hq / s.Hkv * s.T)), n(int(s.T)), k(int(s.D)), a(rand_f32({m, k}, 10)), b(rand_f32({k, n}, 11)),
        c(Tensor::empty({m, n})) {}
  double flops() const { return 2.0 * m * n * k; }
  void run() {
    raw_sgemm(false, false, m, n, k, a.data<float>(), b.data<float>(), c.data<float>(), 0.f);
    benchmark::ClobberMemory();
  }
};

void bm_attn_fwd(benchmark::State& st, AttnShape s) {
  Tensor q = rand_f32({s.B, s.T, s.Hq, s.D}, 6), k = rand_f32({s.B, s.T, s.Hkv, s.D}, 7),
         v = rand_f32({s.B, s.T, s.Hkv, s.D}, 8);
  const double scale = 1.0 / std::sqrt(double(s.D));
  Tensor lse;
  ScoreGemm ref(s);
  paired(st, 4.0 * s.D * s.Hq * allowed_pairs(s), ref.flops(),
         [&] { benchmark::DoNotOptimize(attention_forward(q, k, v, {&s.mask, 1}, scale, &lse).raw_data()); },
         [&] { ref.run(); });
}

void bm_attn_bwd(benchmark::State& st, AttnShape s) {
  Tensor q = rand_f32({s.B, s.T, s.Hq, s.D}, 6), k = rand_f32({s.B, s.T, s.Hkv, s.D}, 7),
         v = rand_f32({s.B, s.T, s.Hkv, s.D}, 8), dout = rand_f32({s.B, s.T, s.Hq, s.D}, 9);
  const double scale = 1.0 / std::sqrt(double(s.D));
  Tensor lse;
  Tensor o = attention_forward(q, k, v, {&s.mask, 1}, scale, &lse);
  Tensor dq, dk, dv;
  ScoreGemm ref(s);
  paired(st, 8.0 * s.D * s.Hq * allowed_pairs(s), ref.flops(),
         [&] {
           attention_backward(q, k, v, o, lse, dout, {&s.mask, 1}, scale, dq, dk, dv);
           benchmark::ClobberMemory();
         },
         [&] { ref.run(); });
}

// OpenBLAS and OpenMP run several threads: time with the (manual) wall clock, never CPU time.
void reg(benchmark::internal::Benchmark* b) { b->UseManualTime()->Unit(benchmark::kMillisecond); }

// Collects (GFLOP/s, sgemm GFLOP/s, ratio) of every repetition for the summary table (median).
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  struct Row {
    std::vector<double> op, ref, ratio;
  };
  std::map<std::string, Row> rows;
  std::vector<std::string> order;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type != Run::RT_Iteration || r.error_occurred) continue;
      auto g = r.counters.find("GFLOP/s"), s = r.counters.find("sgemm_GFLOP/s"), q = r.counters.find("ratio");
      if (g == r.counters.end() || s == r.counters.end() || q == r.counters.end()) continue;
      const std::string name = r.run_name.function_name;
      if (!rows.count(name)) order.push_back(name);
      Row& row = rows[name];
      row.op.push_back(g->second.value);
      row.ref.push_back(s->second.value);
      row.ratio.push_back(q->second.value);
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  // Model-like shapes: MLP up/gate (d=512 -> 2048 / 1536), and a vocab-ish LM head (512 -> 8192).
  for (const LinearShape& s : {LinearShape{2048, 512, 2048}, {2048, 512, 1536}, {512, 512, 8192}}) {
    reg(benchmark::RegisterBenchmark(("linear_fwd/" + s.name()).c_str(), bm_linear_fwd, s));
    reg(benchmark::RegisterBenchmark(("linear_bwd/" + s.name()).c_str(), bm_linear_bwd, s));
  }
  reg(benchmark::RegisterBenchmark("matmul/2048x512*512x2048", bm_matmul, 1, 2048, 512, 2048));
  // Batched: per-head sized products (8 x [512, 64] @ [64, 512]).
  reg(benchmark::RegisterBenchmark("matmul_batched/8x512x64*64x512", bm_matmul, 8, 512, 64, 512));
  // Attention: Qwen3-like GQA heads, causal and the doubled training row (P + 2*L1 = 512, b = 16), and
  // torch_qwen3_ref's 'tiny' model shape (B 8, T 256, 4 query / 2 kv heads, head dim 32), causal (its AR
  // training step) and as a doubled training row (P + 2*L1 = 256, b = 16).
  for (const AttnShape& s : {AttnShape{"causal", 1, 512, 8, 2, 64, MaskDescriptor::causal()},
                             AttnShape{"training", 1, 512, 8, 2, 64, MaskDescriptor::training(16, 128, 192)},
                             AttnShape{"causal", 8, 256, 4, 2, 32, MaskDescriptor::causal()},
                             AttnShape{"training", 8, 256, 4, 2, 32, MaskDescriptor::training(16, 64, 96)}}) {
    reg(benchmark::RegisterBenchmark(("attention_fwd/" + s.name()).c_str(), bm_attn_fwd, s));
    reg(benchmark::RegisterBenchmark(("attention_bwd/" + s.name()).c_str(), bm_attn_bwd, s));
  }

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RatioReporter rep;
  benchmark::RunSpecifiedBenchmarks(&rep);
  benchmark::Shutdown();

  std::printf("\n%-52s %10s %10s %8s\n", "opdlm vs cblas_sgemm, interleaved (GFLOP/s)", "opdlm", "sgemm", "ratio");
  for (const std::string& name : rep.order) {
    const auto& r = rep.rows.at(name);
    std::printf("%-52s %10.2f %10.2f %8.3f\n", name.c_str(), median(r.op), median(r.ref), median(r.ratio));
  }
  std::printf("(wall time, median over repetitions; matmul/linear rows compare with sgemm of the same shape and\n"
              " transposes; attention rows count allowed (q,k) pairs only and compare with sgemm of the\n"
              " one-KV-head score GEMM [G*T, D] @ [D, T])\n");
  // libgomp workers spin after each OpenMP region and steal the cores from OpenBLAS's pthreads that
  // run right after (the attention rows' sgemm halves); passive waiting avoids that.
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  std::printf("OMP_WAIT_POLICY=%s%s\n", wait ? wait : "(unset)",
              wait ? "" : "  (try OMP_WAIT_POLICY=passive: spinning OpenMP threads slow the sgemm that follows)");
  return 0;
}
