// One bf16 mixed-precision training step of a Qwen3-0.6B-shaped model on one GPU (Qwen3CudaModel):
// forward over B*T tokens with causal masks, cross-entropy on the next tokens over every row, backward,
// AdamW. Prints tokens/s, the step time and its split into phases (CUDA events), and the MFU against
// both the nominal H100 SXM dense bf16 peak and a cuBLAS bf16 8192^3 GEMM measured in the same run.
// Usage: opdlm_bench_train_step [--layers N] [--batch B] [--seq T] [--steps S] [--recompute 0|1|2 (both, default)]
// Exit 77 without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/model/cuda/qwen3_cuda.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/cuda/gemm_cuda.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "opdlm/tensor/cuda/device_arena.hpp"

using namespace opdlm;

#include "gpu_bench_util.hpp"

namespace {

using gpu_bench::kH100DenseBf16;
using gpu_bench::median;

// ---- helpers ------------------------------------------------------------------------------------------

// xorshift64*: a fast deterministic fill (the model's own init would take longer than the bench).
struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
};

void json_line(const std::string& name, double value, const char* unit, const std::string& baseline, double base_value,
               double ratio) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "{\"bench\": \"train_step\", \"figure\": \"%s\", \"value\": %.6g, \"unit\": \"%s\", \"baseline\": \"%s\", "
                "\"baseline_value\": %.6g, \"ratio\": %.6g}",
                name.c_str(), value, unit, baseline.c_str(), base_value, ratio);
  gpu_bench::emit_json(buf);
}

// cuBLASLt bf16 GEMM [N, N] @ [N, N] -> bf16, median FLOP/s over `runs` after a warm-up.
double measure_gemm(cuda::BlasLt& blas, int64_t N, cudaStream_t s) {
  cuda::DeviceArena arena(3 * size_t(N * N) * 2 + 3 * 256, "gemm bench");
  void* A = arena.alloc(size_t(N * N) * 2);
  void* B = arena.alloc(size_t(N * N) * 2);
  void* C = arena.alloc(size_t(N * N) * 2);
  // Small values (any bits would do, but NaN/Inf inputs can change the speed).
  std::vector<uint16_t> h(size_t(N * N));
  Rng r{12345};
  for (auto& x : h) x = uint16_t(0x3c00 + (r.next() & 0xff));  // bf16 in [0.0078, 0.0156)
  CUDA_CHECK(cudaMemcpy(A, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(B, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> ms;
  for (int i = 0; i < 12; ++i) {
    CUDA_CHECK(cudaEventRecord(e0, s));
    blas.gemm(A, false, B, false, C, N, N, N, DType::bf16, DType::bf16, 1.0f, 0.0f, s);
    CUDA_CHECK(cudaEventRecord(e1, s));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  return 2.0 * double(N) * double(N) * double(N) / (median(ms) * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("bench_train_step: no CUDA device visible: skipped\n");
    return 77;
  }
  int64_t layers = 28, B = 8, T = 1024;
  int steps = 5;
  int recompute_mode = 2;  // 0: keep activations, 1: recompute, 2: both (one after the other)
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int64_t v = std::atoll(argv[i + 1]);
    if (a == "--layers") layers = v;
    else if (a == "--batch") B = v;
    else if (a == "--seq") T = v;
    else if (a == "--steps") steps = int(v);
    else if (a == "--recompute") recompute_mode = int(v);
    else {
      std::fprintf(stderr, "usage: %s [--layers N] [--batch B] [--seq T] [--steps S] [--recompute 0|1|2]\n", argv[0]);
      return 2;
    }
  }
  if (layers < 1 || B < 1 || T < 2 || steps < 1 || recompute_mode < 0 || recompute_mode > 2) {
    std::fprintf(stderr, "bench_train_step: bad sizes\n");
    return 2;
  }
  try {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

    // ---- the model: Qwen3-0.6B shapes, random weights ----
    model::Qwen3Config c;
    c.vocab_size = 151936;
    c.hidden_size = 1024;
    c.intermediate_size = 3072;
    c.num_hidden_layers = layers;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 1e6;
    c.tie_word_embeddings = true;
    const int64_t n = B * T, V = c.vocab_size;
    for (const bool recompute : {false, true}) {
      if ((recompute && recompute_mode == 0) || (!recompute && recompute_mode == 1)) continue;
      const std::string sfx = recompute ? "recompute." : "";
      std::unique_ptr<cuda::Qwen3CudaModel> model;
      {
        model::Qwen3Weights w(c, DType::f32);
        Rng r{42};
        const double a = 0.02 * 1.7320508075688772;  // uniform with std 0.02
        for (auto& nt : w.tensors()) {
          float* p = nt.value.data<float>();
          const bool norm = nt.value.ndim() == 1;
          for (int64_t i = 0; i < nt.value.numel(); ++i) p[i] = norm ? 1.0f : float((2 * r.uniform() - 1) * a);
        }
        model = std::make_unique<cuda::Qwen3CudaModel>(w, DType::bf16, true, cuda::ActivationBudget{n, n, B, recompute});
      }
      cuda::Qwen3CudaModel& m = *model;
      const cudaStream_t s = m.stream();

      // ---- the batch: random ids, next-token targets (the last token of each row ignored) ----
      const int32_t ignore = -100;
      const size_t un = static_cast<size_t>(n);
      std::vector<int32_t> ids(un), pos(un), targets(un);
      Rng r{7};
      for (auto& x : ids) x = int32_t(r.next() % uint64_t(V));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          pos[size_t(b * T + t)] = int32_t(t);
          targets[size_t(b * T + t)] = t + 1 < T ? ids[size_t(b * T + t + 1)] : ignore;
        }
      const Tensor t_ids = Tensor::from_vector(ids, {B, T}), t_pos = Tensor::from_vector(pos, {B, T});
      const std::vector<ops::MaskDescriptor> masks = {ops::MaskDescriptor::causal()};
      const double valid = double(B * (T - 1));
      std::vector<float> dloss(un, float(1.0 / valid));  // mean over the scored tokens

      cuda::DeviceArena loss_arena(size_t(n) * (4 * 4) + size_t(n * V) * 2 + 8 * 256, "loss");
      auto* d_targets = loss_arena.alloc_n<int32_t>(size_t(n), "targets");
      auto* d_loss = loss_arena.alloc_n<float>(size_t(n), "loss");
      auto* d_lse = loss_arena.alloc_n<float>(size_t(n), "lse");
      auto* d_dloss = loss_arena.alloc_n<float>(size_t(n), "dloss");
      void* d_dlogits = loss_arena.alloc(size_t(n * V) * 2, 256, "dlogits");
      CUDA_CHECK(cudaMemcpy(d_targets, targets.data(), size_t(n) * 4, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(d_dloss, dloss.data(), size_t(n) * 4, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaDeviceSynchronize());

      // ---- the step, with events between the phases ----
      ops::AdamWConfig cfg;
      cfg.lr = 1e-5;
      cfg.weight_decay = 0.01;
      cudaEvent_t ev[5];
      for (auto& e : ev) CUDA_CHECK(cudaEventCreate(&e));
      std::vector<double> t_step, t_fwd, t_loss, t_bwd, t_opt;
      const int warmup = 2;
      for (int it = 0; it < warmup + steps; ++it) {
        CUDA_CHECK(cudaEventRecord(ev[0], s));
        const void* logits = m.forward(t_ids, t_pos, masks, Tensor(), true);
        CUDA_CHECK(cudaEventRecord(ev[1], s));
        cuda::cross_entropy_forward(logits, d_targets, nullptr, d_loss, d_lse, n, V, ignore, DType::bf16, s);
        cuda::cross_entropy_backward(logits, d_targets, nullptr, d_lse, d_dloss, d_dlogits, n, V, ignore, DType::bf16, s);
        CUDA_CHECK(cudaEventRecord(ev[2], s));
        m.backward(d_dlogits);
        CUDA_CHECK(cudaEventRecord(ev[3], s));
        m.adamw_step(it + 1, cfg);
        m.zero_grads();  // for the next step
        CUDA_CHECK(cudaEventRecord(ev[4], s));
        CUDA_CHECK(cudaEventSynchronize(ev[4]));
        float ms[4];
        for (int k = 0; k < 4; ++k) CUDA_CHECK(cudaEventElapsedTime(&ms[k], ev[k], ev[k + 1]));
        if (it < warmup) continue;
        t_fwd.push_back(ms[0]), t_loss.push_back(ms[1]), t_bwd.push_back(ms[2]), t_opt.push_back(ms[3]);
        t_step.push_back(double(ms[0]) + ms[1] + ms[2] + ms[3]);
      }
      // The last step's loss (a sanity figure: ln(V) = 11.93 at a random init).
      std::vector<float> loss(un);
      CUDA_CHECK(cudaMemcpy(loss.data(), d_loss, size_t(n) * 4, cudaMemcpyDeviceToHost));
      double loss_sum = 0;
      for (float x : loss) loss_sum += x;

      const double step_ms = median(t_step);
      const double tokens_per_s = double(n) / (step_ms * 1e-3);
      const double fpt = model::forward_flops_per_token(c, double(T + 1) / 2.0);  // causal: (T+1)/2 keys on average
      const double achieved = 3.0 * fpt * double(n) / (step_ms * 1e-3);
      const double gemm = measure_gemm(m.blas(), 8192, s);

      std::printf("bench_train_step%s on %s: Qwen3-0.6B shapes (%lld layers, hidden %lld, heads %lld/%lld x %lld, FFN %lld, "
                  "vocab %lld, tied), bf16 compute, B %lld x T %lld = %lld tokens, causal, CE on every row\n",
                  recompute ? " (activation recomputation)" : "", prop.name, (long long)layers, (long long)c.hidden_size, (long long)c.num_attention_heads,
                  (long long)c.num_key_value_heads, (long long)c.head_dim, (long long)c.intermediate_size, (long long)V,
                  (long long)B, (long long)T, (long long)n);
      std::printf("  memory: %s\n", m.memory_report().c_str());
      std::printf("  loss after %d steps: %.4f (ln V = 11.93)\n", warmup + steps, loss_sum / valid);
      std::printf("  step %.2f ms (median of %d after %d warm-up): forward %.2f, loss %.2f, backward %.2f, optimizer %.2f ms\n",
                  step_ms, steps, warmup, median(t_fwd), median(t_loss), median(t_bwd), median(t_opt));
      std::printf("  %.0f tokens/s; %.3f GFLOP/token (training 3x forward), %.1f TFLOP/s achieved\n", tokens_per_s,
                  3 * fpt * 1e-9, achieved * 1e-12);
      std::printf("  cuBLAS bf16 8192^3 GEMM: %.1f TFLOP/s (%.1f%% of nominal)\n", gemm * 1e-12, 100 * gemm / kH100DenseBf16);
      std::printf("  MFU: %.1f%% of nominal H100 SXM dense bf16 (989.4 TFLOP/s), %.1f%% of the measured GEMM\n",
                  100 * achieved / kH100DenseBf16, 100 * achieved / gemm);
      json_line(sfx + "tokens_per_s", tokens_per_s, "tokens/s", "none", 0, 0);
      json_line(sfx + "step_ms", step_ms, "ms", "none", 0, 0);
      json_line(sfx + "forward_ms", median(t_fwd), "ms", "step_ms", step_ms, median(t_fwd) / step_ms);
      json_line(sfx + "loss_ms", median(t_loss), "ms", "step_ms", step_ms, median(t_loss) / step_ms);
      json_line(sfx + "backward_ms", median(t_bwd), "ms", "step_ms", step_ms, median(t_bwd) / step_ms);
      json_line(sfx + "optimizer_ms", median(t_opt), "ms", "step_ms", step_ms, median(t_opt) / step_ms);
      json_line(sfx + "mfu_nominal", achieved, "FLOP/s", "h100_sxm_dense_bf16_nominal", kH100DenseBf16, achieved / kH100DenseBf16);
      json_line(sfx + "mfu_vs_gemm", achieved, "FLOP/s", "cublas_bf16_gemm_8192", gemm, achieved / gemm);
      for (auto& e : ev) cudaEventDestroy(e);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_step: %s\n", e.what());
    return 1;
  }
  return 0;
}
