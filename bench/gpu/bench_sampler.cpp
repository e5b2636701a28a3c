// cuda::sample_tokens throughput on a decode step over the Qwen3 vocabulary (V = 151936): rows/s (one token
// drawn per row) for 64 and 512 rows, f32 and bf16 logits, with (temperature 1) and (top_k 50, top_p 0.9),
// each against two baselines measured in the same run: a device-to-device cudaMemcpy of the same logits
// bytes (ratio = memcpy time / sampler time: 1 would be one read+write of the logits at copy speed), and
// the single-threaded CPU ops::sample_token on the same rows (speed-up). Prints one line per figure and
// appends JSON lines to $OPDLM_GPU_BENCH_OUT. Run: build-gpu/bench/opdlm_bench_sampler
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/base/rng.hpp"
#include "opdlm/ops/cuda/sampling_cuda.hpp"
#include "opdlm/ops/sampling.hpp"
#include "opdlm/tensor/bf16.hpp"

#include "gpu_bench_util.hpp"

namespace {

using opdlm::gpu_bench::emit_json;
using opdlm::gpu_bench::median_ms;

using opdlm::DType;

struct Variant {
  const char* name;
  opdlm::ops::SamplingParams p;
};

}  // namespace

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("bench_sampler: no CUDA device visible: skipped\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));

  const int64_t V = 151936, max_rows = 512;
  const size_t n = size_t(max_rows) * size_t(V);
  // Logits: uniform in [-10, 10) from a xorshift (fast to make; the sampler's cost does not depend on
  // the values except through how many survive the filters). bf16 copies are the rounded f32 values
  // (many ties: top-k 50 keeps every copy of the 50th value).
  std::vector<float> h32(n);
  std::vector<opdlm::bf16> h16(n);
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    h32[i] = float(double(s >> 11) / double(1ull << 53) * 20.0 - 10.0);
    h16[i] = opdlm::to_bf16(h32[i]);
  }
  std::vector<opdlm::cuda::DeviceRngKey> hkeys(max_rows);
  std::vector<opdlm::RngKey> keys(max_rows);
  for (int64_t r = 0; r < max_rows; ++r) {
    keys[size_t(r)] = opdlm::RngKey{42, opdlm::RngPurpose::rollout_token, 3, uint32_t(r / 32), uint32_t(r % 32)};
    hkeys[size_t(r)] = opdlm::cuda::to_device_key(keys[size_t(r)]);
  }

  void *d32 = nullptr, *d16 = nullptr, *dcopy = nullptr, *dkeys = nullptr, *dtok = nullptr, *dconf = nullptr;
  CUDA_CHECK(cudaMalloc(&d32, n * 4));
  CUDA_CHECK(cudaMalloc(&d16, n * 2));
  CUDA_CHECK(cudaMalloc(&dcopy, n * 4));
  CUDA_CHECK(cudaMalloc(&dkeys, hkeys.size() * sizeof(hkeys[0])));
  CUDA_CHECK(cudaMalloc(&dtok, max_rows * sizeof(int32_t)));
  CUDA_CHECK(cudaMalloc(&dconf, max_rows * sizeof(float)));
  CUDA_CHECK(cudaMemcpy(d32, h32.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d16, h16.data(), n * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(dkeys, hkeys.data(), hkeys.size() * sizeof(hkeys[0]), cudaMemcpyHostToDevice));
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreate(&stream));

  opdlm::ops::SamplingParams t1;
  opdlm::ops::SamplingParams nucleus;
  nucleus.top_k = 50;
  nucleus.top_p = 0.9;
  const Variant variants[] = {{"t1", t1}, {"topk50_topp0.9", nucleus}};

  std::printf("bench_sampler on %s: cuda::sample_tokens, V %lld, vs D2D memcpy of the logits and CPU sample_token\n",
              prop.name, static_cast<long long>(V));
  for (const Variant& var : variants) {
    // CPU baseline: single-threaded sample_token on the first rows (f32), ms per row; its tokens (and
    // those of the bf16-rounded rows) spot-check the GPU.
    const int cpu_rows = 4;
    std::vector<float> scratch(static_cast<size_t>(V)), rounded(static_cast<size_t>(V));
    std::vector<int32_t> cpu_tok32(cpu_rows), cpu_tok16(cpu_rows);
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < cpu_rows; ++r)
      cpu_tok32[size_t(r)] = opdlm::ops::sample_token(h32.data() + size_t(r) * size_t(V), V, var.p,
                                                      opdlm::CounterRng(keys[size_t(r)]), scratch.data())
                                 .token;
    const double cpu_ms_row =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / cpu_rows;
    for (int r = 0; r < cpu_rows; ++r) {
      for (int64_t v = 0; v < V; ++v) rounded[size_t(v)] = opdlm::to_f32(h16[size_t(r) * size_t(V) + size_t(v)]);
      cpu_tok16[size_t(r)] =
          opdlm::ops::sample_token(rounded.data(), V, var.p, opdlm::CounterRng(keys[size_t(r)]), scratch.data()).token;
    }

    for (DType dt : {DType::f32, DType::bf16}) {
      const void* logits = dt == DType::f32 ? d32 : d16;
      const std::vector<int32_t>& cpu_tok = dt == DType::f32 ? cpu_tok32 : cpu_tok16;
      // Spot check against the CPU on the same values.
      opdlm::cuda::sample_tokens(logits, cpu_rows, V, var.p, static_cast<opdlm::cuda::DeviceRngKey*>(dkeys),
                                 static_cast<int32_t*>(dtok), static_cast<float*>(dconf), nullptr, dt, stream);
      std::vector<int32_t> gpu_tok(cpu_rows);
      CUDA_CHECK(cudaStreamSynchronize(stream));
      CUDA_CHECK(cudaMemcpy(gpu_tok.data(), dtok, cpu_rows * sizeof(int32_t), cudaMemcpyDeviceToHost));
      const bool same = gpu_tok == cpu_tok;

      for (int64_t rows : {int64_t(64), int64_t(512)}) {
        const size_t bytes = size_t(rows) * size_t(V) * opdlm::dtype_size(dt);
        const double copy_ms = median_ms(
            [&] { CUDA_CHECK(cudaMemcpyAsync(dcopy, logits, bytes, cudaMemcpyDeviceToDevice, stream)); }, stream);
        const double ms = median_ms(
            [&] {
              opdlm::cuda::sample_tokens(logits, rows, V, var.p, static_cast<opdlm::cuda::DeviceRngKey*>(dkeys),
                                         static_cast<int32_t*>(dtok), static_cast<float*>(dconf), nullptr, dt,
                                         stream);
            },
            stream);
        const double rows_s = double(rows) / (ms * 1e-3);
        const double logits_s = rows_s * double(V);
        const double ratio = copy_ms / ms;
        const double speedup = cpu_ms_row * double(rows) / ms;
        std::printf("  %-15s %-4s rows %3lld: %8.3f ms  %10.0f rows/s (tokens/s)  %6.1f G logits/s  "
                    "memcpy %6.3f ms (ratio %.3f)  CPU %7.2f ms/row (speed-up %6.0fx)%s\n",
                    var.name, opdlm::dtype_name(dt), static_cast<long long>(rows), ms, rows_s, logits_s * 1e-9,
                    copy_ms, ratio, cpu_ms_row, speedup, same ? "" : "  [TOKENS DIFFER FROM CPU]");
        char line[768];
        std::snprintf(line, sizeof line,
                      "{\"bench\": \"sampler\", \"name\": \"sample_tokens.%s.%s.rows%lld\", \"device\": \"%s\", "
                      "\"rows\": %lld, \"V\": %lld, \"dtype\": \"%s\", \"ms\": %.5f, \"rows_per_s\": %.1f, "
                      "\"logits_per_s\": %.4e, \"memcpy_ms\": %.5f, \"ratio_to_memcpy\": %.4f, "
                      "\"cpu_ms_per_row\": %.4f, \"speedup_vs_cpu\": %.2f, \"tokens_match_cpu\": %s}",
                      var.name, opdlm::dtype_name(dt), static_cast<long long>(rows), prop.name,
                      static_cast<long long>(rows), static_cast<long long>(V), opdlm::dtype_name(dt), ms, rows_s,
                      logits_s, copy_ms, ratio, cpu_ms_row, speedup, same ? "true" : "false");
        emit_json(line);
      }
    }
  }

  CUDA_CHECK(cudaStreamDestroy(stream));
  for (void* p : {d32, d16, dcopy, dkeys, dtok, dconf}) CUDA_CHECK(cudaFree(p));
  return 0;
}
