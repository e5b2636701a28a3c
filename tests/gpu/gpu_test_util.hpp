// Helpers for the GPU parity suite: RAII device buffers, host <-> device copies of opdlm Tensors, and
// the parity table (every CUDA op against its CPU twin; one line per comparison, also appended to the
// file named by OPDLM_GPU_REPORT so tools/gpu-check.sh can collect them).
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::gpu_test {

// Owning device memory (cudaMalloc in tests only; the library itself uses DeviceArena).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes) CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_), std::swap(bytes_, o.bytes_);
    return *this;
  }
  void* get() const { return ptr_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }
  void zero() {
    if (ptr_) CUDA_CHECK(cudaMemset(ptr_, 0, bytes_));
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A CPU tensor's bytes on the device, converted to `dt` first (f32/f64 -> f32 or bf16; i32 as is).
DeviceBuffer upload(const Tensor& t, DType dt);
inline DeviceBuffer upload(const Tensor& t) { return upload(t, t.dtype() == DType::f64 ? DType::f32 : t.dtype()); }
// `n` elements of dtype `dt` at `dev` as a CPU tensor of `shape` widened to f64 (i32 stays i32).
Tensor download(const void* dev, DType dt, const Shape& shape);
// A CPU tensor rounded to bf16 and back (f32): the CPU reference then sees the GPU's inputs exactly.
Tensor round_bf16(const Tensor& t);

// Max abs and max relative error of `got` against `want` (same numel; relative to max(|want|, floor)).
struct ErrorStats {
  double max_abs = 0, max_rel = 0, ref_max = 0;
  int64_t worst = -1, nonfinite = 0;
};
ErrorStats compare(const Tensor& got, const Tensor& want, double rel_floor = 1e-3);

// Records one parity row ("op dtype shape max_abs max_rel tol verdict"), prints it and appends it
// to $OPDLM_GPU_REPORT; returns stats.max_abs <= atol + rtol * ref_max, with no non-finite values.
bool parity(const std::string& op, DType dt, const std::string& shape, const ErrorStats& stats, double atol,
            double rtol);
// EXPECT-style wrapper: EXPECT_TRUE(parity(...)) with the stats in the message.
#define EXPECT_PARITY(op, dt, shape, got, want, atol, rtol)                                             \
  do {                                                                                                  \
    auto opdlm_st_ = ::opdlm::gpu_test::compare((got), (want));                                         \
    EXPECT_TRUE(::opdlm::gpu_test::parity((op), (dt), (shape), opdlm_st_, (atol), (rtol)))              \
        << (op) << ": max_abs " << opdlm_st_.max_abs << " at " << opdlm_st_.worst << ", ref_max "     \
        << opdlm_st_.ref_max << ", nonfinite " << opdlm_st_.nonfinite;                                  \
  } while (0)

// Per-op tolerances: f32 kernels vs the CPU in f64, and bf16 (inputs pre-rounded, outputs rounded).
struct Tol {
  double atol, rtol;
};
inline Tol tol_for(DType dt, Tol f32, Tol bf16) { return dt == DType::bf16 ? bf16 : f32; }

}  // namespace opdlm::gpu_test
