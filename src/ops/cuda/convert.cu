// CUDA twin of the CPU dtype conversion (tensor/bf16.hpp): f32 <-> bf16 with round-to-nearest-even,
// bit-identical to the CPU path (tests/gpu/test_gpu_smoke.cpp compares them on a GPU). The
// synchronous cuda_convert_* serve Tensor::to; cuda::convert is the stream form the model uses.
#include <cuda_runtime.h>

#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"

namespace opdlm::detail {

__device__ inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__global__ void k_f32_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = f32_to_bf16_rne(in[i]);
}

__global__ void k_bf16_to_f32(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(static_cast<uint32_t>(in[i]) << 16);
}

static int grid_for(int64_t n) {
  int64_t g = (n + 255) / 256;
  return static_cast<int>(g < 65535 ? (g > 0 ? g : 1) : 65535);
}

void cuda_convert_f32_to_bf16(const void* in, void* out, int64_t n) {
  k_f32_to_bf16<<<grid_for(n), 256>>>(static_cast<const float*>(in), static_cast<uint16_t*>(out), n);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
}

void cuda_convert_bf16_to_f32(const void* in, void* out, int64_t n) {
  k_bf16_to_f32<<<grid_for(n), 256>>>(static_cast<const uint16_t*>(in), static_cast<float*>(out), n);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace opdlm::detail

namespace opdlm::cuda {

// ---- convert on a stream -----------------------------------------------------------------------------

void convert(const void* in, DType in_dt, void* out, DType out_dt, int64_t n, cudaStream_t stream) {
  const bool ok_in = in_dt == DType::f32 || in_dt == DType::bf16;
  const bool ok_out = out_dt == DType::f32 || out_dt == DType::bf16;
  if (!ok_in || !ok_out)
    OPDLM_FAIL("cuda::convert: ", dtype_name(in_dt), " -> ", dtype_name(out_dt),
               " unsupported; expected f32 or bf16 on both sides");
  if (n < 0) OPDLM_FAIL("cuda::convert: n is ", n);
  if (n == 0) return;
  if (in_dt == out_dt) {  // same dtype: a plain device copy, still ordered on `stream`
    CUDA_CHECK(cudaMemcpyAsync(out, in, size_t(n) * dtype_size(in_dt), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  if (in_dt == DType::f32)
    detail::k_f32_to_bf16<<<detail::grid_for(n), 256, 0, stream>>>(static_cast<const float*>(in),
                                                                     static_cast<uint16_t*>(out), n);
  else
    detail::k_bf16_to_f32<<<detail::grid_for(n), 256, 0, stream>>>(static_cast<const uint16_t*>(in),
                                                                     static_cast<float*>(out), n);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
