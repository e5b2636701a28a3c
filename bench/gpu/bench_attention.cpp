// GPU attention throughput: cuda::attention_forward / attention_backward in bf16 at B=8, T=1024, Hq=16,
// Hkv=8, D=128 with the causal and the training masks, as TFLOP/s (4 D flops per allowed (q, k) pair
// forward, 2.5 times that backward; pairs counted from the mask rules on the host) and as a fraction of
// a dense cuBLAS bf16 GEMM (4096^3, f32 accumulation) measured in the same run. Rows: v2 (attention_fa2.cu,
// the default), v1's tensor-core kernels ("fwd", "bwd": OPDLM_ATTN_IMPL=v1) and v1's scalar kernels.
// Run: build-gpu/bench/opdlm_bench_attention   (exit 77 without a GPU)
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/attention_cuda.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/tensor/tensor.hpp"

#include "gpu_bench_util.hpp"

namespace {

using opdlm::gpu_bench::emit_json;
using opdlm::gpu_bench::median_ms;

using opdlm::DType;
using opdlm::Tensor;
using opdlm::ops::MaskDescriptor;

void* device_random_bf16(int64_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> h(static_cast<size_t>(n));
  for (float& x : h) x = u(rng);
  Tensor t = Tensor::from_vector(h, {n}).to(DType::bf16);
  void* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, t.nbytes()));
  CUDA_CHECK(cudaMemcpy(d, t.raw_data(), t.nbytes(), cudaMemcpyHostToDevice));
  return d;
}

void* device_alloc(size_t bytes) {
  void* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, bytes));
  return d;
}

// ---- baseline: dense cuBLAS bf16 GEMM ----

double cublas_tflops() {
  const int n = 4096;
  void* A = device_random_bf16(int64_t(n) * n, 1, -1, 1);
  void* B = device_random_bf16(int64_t(n) * n, 2, -1, 1);
  void* C = device_alloc(size_t(n) * n * 2);
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cublasCreate failed\n");
    std::exit(1);
  }
  const float one = 1.0f, zero = 0.0f;
  const double ms = median_ms([&] {
    const cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, A, CUDA_R_16BF, n, B,
                                           CUDA_R_16BF, n, &zero, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasGemmEx failed: %d\n", int(st));
      std::exit(1);
    }
  });
  cublasDestroy(h);
  CUDA_CHECK(cudaFree(A));
  CUDA_CHECK(cudaFree(B));
  CUDA_CHECK(cudaFree(C));
  return 2.0 * n * double(n) * n / (ms * 1e-3) / 1e12;
}

// ---- attention ----

struct Setup {
  std::string name;
  std::vector<MaskDescriptor> masks;  // one per batch row
};

// Allowed (q, k) pairs of all rows and heads, from the CPU rules.
double allowed_pairs(const std::vector<MaskDescriptor>& masks, int64_t T, int64_t Hq) {
  double pairs = 0;
  for (const MaskDescriptor& m : masks)
    for (int64_t q = 0; q < T; ++q) {
      opdlm::ops::KeyRange r[2];
      const int n = m.ranges(q, T, r);
      for (int i = 0; i < n; ++i) pairs += double(r[i].end - r[i].begin);
    }
  return pairs * double(Hq);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_attention: no GPU, skipped\n");
    return 77;
  }
  const int64_t B = 8, T = 1024, Hq = 16, Hkv = 8, D = 128;
  const double scale = 1.0 / std::sqrt(double(D));
  const DType dt = DType::bf16;
  const double gemm = cublas_tflops();
  std::printf("cuBLAS bf16 GEMM 4096^3: %.1f TFLOP/s (baseline)\n", gemm);

  std::vector<Setup> setups;
  setups.push_back({"causal", std::vector<MaskDescriptor>(size_t(B), MaskDescriptor::causal(0))});
  Setup tr{"training", {}};
  for (int64_t b = 0; b < B; ++b) tr.masks.push_back(MaskDescriptor::training(32, 256 - 16 * b, 384, 16 * b));
  setups.push_back(tr);

  const int64_t nq = B * T * Hq * D, nk = B * T * Hkv * D;
  void* q = device_random_bf16(nq, 11, -2, 2);
  void* k = device_random_bf16(nk, 12, -2, 2);
  void* v = device_random_bf16(nk, 13, -1, 1);
  void* dout = device_random_bf16(nq, 14, -1, 1);
  void* o = device_alloc(size_t(nq) * 2);
  void* dq = device_alloc(size_t(nq) * 2);
  void* dk = device_alloc(size_t(nk) * 2);
  void* dv = device_alloc(size_t(nk) * 2);
  auto* lse = static_cast<float*>(device_alloc(sizeof(float) * size_t(B * Hq * T)));
  void* scratch = device_alloc(opdlm::cuda::attention_backward_scratch_bytes(B, T, T, Hq, Hkv, D));
  auto* masks = static_cast<opdlm::cuda::DeviceMask*>(device_alloc(sizeof(opdlm::cuda::DeviceMask) * size_t(B)));

  for (const Setup& s : setups) {
    for (const MaskDescriptor& m : s.masks) m.validate(T, T, s.name);
    opdlm::cuda::upload_masks(s.masks, masks, nullptr);
    const double pairs = allowed_pairs(s.masks, T, Hq);
    const double fwd_flops = 4.0 * double(D) * pairs, bwd_flops = 2.5 * fwd_flops;
    auto fwd = [&] {
      opdlm::cuda::attention_forward(q, k, v, o, lse, B, T, T, Hq, Hkv, D, masks, B, scale, dt, nullptr);
    };
    auto bwd = [&] {
      opdlm::cuda::attention_backward(q, k, v, o, lse, dout, dq, dk, dv, B, T, T, Hq, Hkv, D, masks, B, scale,
                                      scratch, dt, nullptr);
    };
    // v2 (the default for bf16 at D 128: attention_fa2.cu), v1's tensor-core kernels
    // (OPDLM_ATTN_IMPL=v1), then v1's scalar ones (OPDLM_ATTN_SCALAR=1).
    unsetenv("OPDLM_ATTN_IMPL");
    const double fwd_v2_ms = median_ms(fwd);
    const double bwd_v2_ms = median_ms(bwd);
    setenv("OPDLM_ATTN_IMPL", "v1", 1);
    const double fwd_ms = median_ms(fwd);
    const double bwd_ms = median_ms(bwd);
    setenv("OPDLM_ATTN_SCALAR", "1", 1);
    const double fwd_scalar_ms = median_ms(fwd);
    const double bwd_scalar_ms = median_ms(bwd);
    unsetenv("OPDLM_ATTN_SCALAR");
    unsetenv("OPDLM_ATTN_IMPL");
    struct Fig {
      const char* what;
      double ms, flops;
    } figs[] = {{"fwd_v2", fwd_v2_ms, fwd_flops},
                {"bwd_v2", bwd_v2_ms, bwd_flops},
                {"fwd", fwd_ms, fwd_flops},
                {"bwd", bwd_ms, bwd_flops},
                {"fwd_scalar", fwd_scalar_ms, fwd_flops},
                {"bwd_scalar", bwd_scalar_ms, bwd_flops}};
    for (const Fig& f : figs) {
      const double tflops = f.flops / (f.ms * 1e-3) / 1e12;
      std::printf("attention %-8s %-10s B=%lld T=%lld Hq=%lld Hkv=%lld D=%lld bf16: %8.3f ms  %6.1f TFLOP/s  "
                  "= %.3f of dense GEMM (density %.3f)\n",
                  s.name.c_str(), f.what, (long long)B, (long long)T, (long long)Hq, (long long)Hkv, (long long)D,
                  f.ms, tflops, tflops / gemm, pairs / (double(B) * Hq * T * T));
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"bench\": \"attention\", \"figure\": \"%s_%s\", \"mask\": \"%s\", \"B\": %lld, \"T\": %lld, "
                    "\"Hq\": %lld, \"Hkv\": %lld, \"D\": %lld, \"dtype\": \"bf16\", \"ms\": %.4f, \"tflops\": %.3f, "
                    "\"baseline\": \"cublas_bf16_gemm_4096\", \"baseline_tflops\": %.3f, \"ratio\": %.4f}",
                    f.what, s.name.c_str(), s.name.c_str(), (long long)B, (long long)T, (long long)Hq,
                    (long long)Hkv, (long long)D, f.ms, tflops, gemm, tflops / gemm);
      emit_json(line);
    }
  }
  for (void* p : {q, k, v, dout, o, dq, dk, dv, static_cast<void*>(lse), scratch, static_cast<void*>(masks)})
    CUDA_CHECK(cudaFree(p));
  return 0;
}
