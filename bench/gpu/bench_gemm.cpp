// cuda::BlasLt bf16 GEMM throughput on the shapes of a ~0.5B Qwen3 training step (8192 tokens,
// hidden 1024, q/k/v-ish 4096, MLP 3072, vocabulary 151936: forward, dx and dw forms), each as a ratio
// to plain cublasGemmEx (CUBLAS_COMPUTE_32F, bf16) on the same shape in the same run, plus the square
// 8192^3 "peak" of cublasGemmEx. Prints one line per figure and appends JSON lines to
// $OPDLM_GPU_BENCH_OUT. Run: build-gpu/bench/opdlm_bench_gemm
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/gemm_cuda.hpp"
#include "opdlm/tensor/bf16.hpp"

#include "gpu_bench_util.hpp"

namespace {

using opdlm::gpu_bench::emit_json;
using opdlm::gpu_bench::median_ms;

using opdlm::DType;

#define CUBLAS_OK(call)                                                                  \
  do {                                                                                   \
    cublasStatus_t s_ = (call);                                                          \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      std::fprintf(stderr, "bench_gemm: %s failed: %s\n", #call, cublasGetStatusString(s_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// ---- one GEMM form --------------------------------------------------------------------------------------

struct Shape {
  std::string name;  // "qkv.fwd", "lm_head.dw", ...
  int64_t M, N, K;
  bool trans_a, trans_b;
  DType c_dt;   // bf16 activations, f32 for the accumulated dw
  float beta;   // 1 for dw (accumulated)
};

// n tokens, `in` -> `out` features: y = x @ w^T (NT), dx = dy @ w (NN), dw += dy^T @ x (TN, f32).
void add_linear(std::vector<Shape>& v, const char* base, int64_t n, int64_t in, int64_t out) {
  const std::string b = base;
  v.push_back({b + ".fwd", n, out, in, false, true, DType::bf16, 0.0f});
  v.push_back({b + ".dx", n, in, out, false, false, DType::bf16, 0.0f});
  v.push_back({b + ".dw", out, in, n, true, false, DType::f32, 1.0f});
}

// Fills `bytes` of device memory with a repeated block of random bf16 values in [-1, 1).
void fill_random_bf16(void* dev, size_t bytes) {
  const size_t block = size_t(1) << 24;  // elements
  std::vector<opdlm::bf16> h(block);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (auto& e : h) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    e = opdlm::to_bf16(float(double(x >> 11) / double(1ull << 53) * 2.0 - 1.0));
  }
  char* p = static_cast<char*>(dev);
  for (size_t off = 0; off < bytes; off += block * 2)
    CUDA_CHECK(cudaMemcpy(p + off, h.data(), std::min(block * 2, bytes - off), cudaMemcpyHostToDevice));
}

}  // namespace

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("bench_gemm: no CUDA device visible: skipped\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  const int64_t n = 8192, d = 1024, V = 151936;
  std::vector<Shape> shapes;
  add_linear(shapes, "qkv", n, d, 4096);
  add_linear(shapes, "mlp_up", n, d, 3072);
  add_linear(shapes, "mlp_down", n, 3072, d);
  add_linear(shapes, "lm_head", n, d, V);

  // One buffer per operand, sized for the largest form (A: dy of the LM head, C: its logits).
  size_t a_bytes = size_t(8192) * 8192 * 2, b_bytes = a_bytes, c_bytes = size_t(8192) * 8192 * 2;
  for (const auto& s : shapes) {
    a_bytes = std::max(a_bytes, size_t(s.M * s.K) * 2);
    b_bytes = std::max(b_bytes, size_t(s.K * s.N) * 2);
    c_bytes = std::max(c_bytes, size_t(s.M * s.N) * opdlm::dtype_size(s.c_dt));
  }
  void *A = nullptr, *B = nullptr, *C = nullptr;
  CUDA_CHECK(cudaMalloc(&A, a_bytes));
  CUDA_CHECK(cudaMalloc(&B, b_bytes));
  CUDA_CHECK(cudaMalloc(&C, c_bytes));
  fill_random_bf16(A, a_bytes);
  fill_random_bf16(B, b_bytes);
  CUDA_CHECK(cudaMemset(C, 0, c_bytes));

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreate(&stream));
  opdlm::cuda::BlasLt lt;
  cublasHandle_t cb = nullptr;
  CUBLAS_OK(cublasCreate(&cb));
  CUBLAS_OK(cublasSetStream(cb, stream));

  // cublasGemmEx on the same row-major problem: column-major C^T = op(B)^T op(A)^T.
  auto gemm_ex = [&](const Shape& s) {
    const float alpha = 1.0f, beta = s.beta;
    const int lda = int(s.trans_a ? s.M : s.K), ldb = int(s.trans_b ? s.K : s.N);
    CUBLAS_OK(cublasGemmEx(cb, s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(s.N),
                           int(s.M), int(s.K), &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C,
                           s.c_dt == DType::f32 ? CUDA_R_32F : CUDA_R_16BF, int(s.N), CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT));
  };
  auto tflops = [](const Shape& s, double ms) { return 2.0 * double(s.M) * double(s.N) * double(s.K) / (ms * 1e9); };

  std::printf("bench_gemm on %s: cuda::BlasLt bf16 vs cublasGemmEx (CUBLAS_COMPUTE_32F) on the same shape\n",
              prop.name);
  const Shape peak{"peak.8192^3", 8192, 8192, 8192, false, false, DType::bf16, 0.0f};
  const double peak_tf = tflops(peak, median_ms([&] { gemm_ex(peak); }, stream));
  std::printf("  %-14s %6s %6s %6s  cublasGemmEx %7.1f TFLOP/s\n", peak.name.c_str(), "8192", "8192", "8192",
              peak_tf);
  char json[512];
  std::snprintf(json, sizeof json,
                "{\"bench\":\"gemm\",\"figure\":\"%s\",\"device\":\"%s\",\"tflops\":%.2f,"
                "\"baseline\":\"cublasGemmEx\"}",
                peak.name.c_str(), prop.name, peak_tf);
  emit_json(json);

  std::printf("  %-14s %6s %6s %6s  %9s %9s %7s %8s\n", "shape", "M", "N", "K", "BlasLt", "GemmEx", "ratio",
              "of peak");
  for (const auto& s : shapes) {
    auto run_lt = [&] {
      lt.gemm(A, s.trans_a, B, s.trans_b, C, s.M, s.N, s.K, DType::bf16, s.c_dt, 1.0f, s.beta, stream);
    };
    const double lt_tf = tflops(s, median_ms(run_lt, stream));
    const double ex_tf = tflops(s, median_ms([&] { gemm_ex(s); }, stream));
    const double ratio = lt_tf / ex_tf;
    std::printf("  %-14s %6lld %6lld %6lld  %9.1f %9.1f %7.3f %7.1f%%   (TFLOP/s)\n", s.name.c_str(), (long long)s.M,
                (long long)s.N, (long long)s.K, lt_tf, ex_tf, ratio, 100.0 * lt_tf / peak_tf);
    std::snprintf(json, sizeof json,
                  "{\"bench\":\"gemm\",\"figure\":\"%s\",\"device\":\"%s\",\"M\":%lld,\"N\":%lld,\"K\":%lld,"
                  "\"trans_a\":%d,\"trans_b\":%d,\"c_dtype\":\"%s\",\"tflops\":%.2f,\"baseline\":\"cublasGemmEx\","
                  "\"baseline_tflops\":%.2f,\"ratio\":%.4f,\"peak_tflops\":%.2f}",
                  s.name.c_str(), prop.name, (long long)s.M, (long long)s.N, (long long)s.K, int(s.trans_a),
                  int(s.trans_b), opdlm::dtype_name(s.c_dt), lt_tf, ex_tf, ratio, peak_tf);
    emit_json(json);
  }

  CUBLAS_OK(cublasDestroy(cb));
  CUDA_CHECK(cudaStreamDestroy(stream));
  CUDA_CHECK(cudaFree(A));
  CUDA_CHECK(cudaFree(B));
  CUDA_CHECK(cudaFree(C));
  return 0;
}
