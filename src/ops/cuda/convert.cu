// CUDA twin of the CPU dtype conversion (tensor/bf16.hpp): f32 <-> bf16 with round-to-nearest-even,
// bit-identical to the CPU path (tests/gpu/test_gpu_smoke.cpp compares them on a GPU). The
// synchronous cuda_convert_* serve Tensor::to; cuda::convert is the stream form the model uses.
#include <cuda_runtime.h>

#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "cuda_common.cuh"

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

// 16-byte forms for aligned pointers: 8 elements per thread and step (two float4 <-> one uint4), the
// same per-element conversion, the elements past the last whole 8 one per thread.
__global__ void k_f32_to_bf16_vec(const float* in, uint16_t* out, int64_t n) {
  const int64_t nv = n / 8;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < nv; k += int64_t(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(in)[2 * k], b = reinterpret_cast<const float4*>(in)[2 * k + 1];
    uint4 o;
    o.x = uint32_t(f32_to_bf16_rne(a.x)) | (uint32_t(f32_to_bf16_rne(a.y)) << 16);
    o.y = uint32_t(f32_to_bf16_rne(a.z)) | (uint32_t(f32_to_bf16_rne(a.w)) << 16);
    o.z = uint32_t(f32_to_bf16_rne(b.x)) | (uint32_t(f32_to_bf16_rne(b.y)) << 16);
    o.w = uint32_t(f32_to_bf16_rne(b.z)) | (uint32_t(f32_to_bf16_rne(b.w)) << 16);
    reinterpret_cast<uint4*>(out)[k] = o;
  }
  for (int64_t i = nv * 8 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = f32_to_bf16_rne(in[i]);
}

__global__ void k_bf16_to_f32_vec(const uint16_t* in, float* out, int64_t n) {
  const int64_t nv = n / 8;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < nv; k += int64_t(gridDim.x) * blockDim.x) {
    const uint4 u = reinterpret_cast<const uint4*>(in)[k];
    reinterpret_cast<float4*>(out)[2 * k] =
        make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                    __uint_as_float(u.y & 0xffff0000u));
    reinterpret_cast<float4*>(out)[2 * k + 1] =
        make_float4(__uint_as_float(u.z << 16), __uint_as_float(u.z & 0xffff0000u), __uint_as_float(u.w << 16),
                    __uint_as_float(u.w & 0xffff0000u));
  }
  for (int64_t i = nv * 8 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __uint_as_float(static_cast<uint32_t>(in[i]) << 16);
}

using cuda::common::aligned16;

// Blocks for the vector kernels: enough for n / 8 vectors, at most 8 full blocks per SM (one wave).
static int grid_vec(int64_t n) {
  const int sms = cuda::common::sm_count();
  const int64_t want = (n / 8 + 255) / 256;
  return static_cast<int>(want < 1 ? 1 : (want < int64_t(sms) * 8 ? want : int64_t(sms) * 8));
}

static int grid_for(int64_t n) {
  int64_t g = (n + 255) / 256;
  return static_cast<int>(g < 65535 ? (g > 0 ? g : 1) : 65535);
}

// Launches on `stream`: the vector kernel when both pointers are 16-byte aligned, else the scalar one.
static void launch_f32_to_bf16(const void* in, void* out, int64_t n, cudaStream_t stream) {
  const auto* src = static_cast<const float*>(in);
  auto* dst = static_cast<uint16_t*>(out);
  if (aligned16(in) && aligned16(out)) k_f32_to_bf16_vec<<<grid_vec(n), 256, 0, stream>>>(src, dst, n);
  else k_f32_to_bf16<<<grid_for(n), 256, 0, stream>>>(src, dst, n);
}

static void launch_bf16_to_f32(const void* in, void* out, int64_t n, cudaStream_t stream) {
  const auto* src = static_cast<const uint16_t*>(in);
  auto* dst = static_cast<float*>(out);
  if (aligned16(in) && aligned16(out)) k_bf16_to_f32_vec<<<grid_vec(n), 256, 0, stream>>>(src, dst, n);
  else k_bf16_to_f32<<<grid_for(n), 256, 0, stream>>>(src, dst, n);
}

void cuda_convert_f32_to_bf16(const void* in, void* out, int64_t n) {
  launch_f32_to_bf16(in, out, n, nullptr);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
}

void cuda_convert_bf16_to_f32(const void* in, void* out, int64_t n) {
  launch_bf16_to_f32(in, out, n, nullptr);
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
  if (in_dt == DType::f32) detail::launch_f32_to_bf16(in, out, n, stream);
  else detail::launch_bf16_to_f32(in, out, n, stream);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
