// Shared by the GPU benchmarks: median CUDA-event timing of a callable, and the JSON lines appended to
// the file named by OPDLM_GPU_BENCH_OUT (tools/gpu-check.sh collects them into bench.jsonl).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"

namespace opdlm::gpu_bench {

// H100 SXM dense bf16 tensor-core peak (FLOP/s), the nominal denominator of MFU.
inline constexpr double kH100DenseBf16 = 989.4e12;

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median milliseconds of `runs` calls of f after `warm` untimed ones, timed with events on `stream`.
inline double median_ms(const std::function<void()>& f, cudaStream_t stream = nullptr, int warm = 3, int runs = 11) {
  for (int i = 0; i < warm; ++i) f();
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    CUDA_CHECK(cudaEventRecord(a, stream));
    f();
    CUDA_CHECK(cudaEventRecord(b, stream));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  return median(std::move(t));
}

// Appends one JSON object (one line) to $OPDLM_GPU_BENCH_OUT when it is set.
inline void emit_json(const std::string& line) {
  if (const char* path = std::getenv("OPDLM_GPU_BENCH_OUT"); path && *path) {
    std::ofstream f(path, std::ios::app);
    f << line << "\n";
  }
}

}  // namespace opdlm::gpu_bench
