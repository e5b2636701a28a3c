// Internal to src/ops/cuda: what every op kernel file shares: f32 <-> storage conversions, the dtype
// dispatch of the host wrappers, the launch-size cap, and 16-byte loads and stores of 8 elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::cuda::common {

// ---- storage <-> f32 ------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as the CPU's bf16 conversion.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- host side ---------------------------------------------------------------------------------------------

template <class T> struct Tag { using type = T; };

// Calls f(Tag<float>) or f(Tag<__nv_bfloat16>) for dt; any other dtype is an Error naming `fn`.
template <class F>
void dispatch(DType dt, const char* fn, F&& f) {
  if (dt == DType::f32) f(Tag<float>{});
  else if (dt == DType::bf16) f(Tag<__nv_bfloat16>{});
  else OPDLM_FAIL("cuda::", fn, ": dtype ", dtype_name(dt), " unsupported; expected f32 or bf16");
}

// Blocks for a launch, within the grid's x limit (the kernels loop over what a grid does not cover).
inline int grid_cap(int64_t blocks) { return static_cast<int>(std::clamp<int64_t>(blocks, 1, 65535)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Streaming multiprocessors of the current device, cached per device (the lookup is not free).
inline int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  int sms = cache[dev].load(std::memory_order_relaxed);
  if (sms <= 0) {
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (sms <= 0) sms = 1;
    cache[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// ---- block reduction ---------------------------------------------------------------------------------------

// Sum of v over a block of kThreads threads (blockDim.x == kThreads, a power of two) in a fixed tree,
// returned to every thread. Ends with a barrier after the last write; callers put another barrier
// before `red` (kThreads doubles of shared memory) is written again.
template <int kThreads>
__device__ __forceinline__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// ---- 16-byte vector access: 8 elements (one uint4 of bf16, two float4 of f32) ------------------------------

constexpr int kW = 8;

__device__ __forceinline__ void ld8(const float* p, float (&f)[kW]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
// bf16 -> f32 is exact: the 16 bits become the high half of the f32 (element 0 is the low half-word).
__device__ __forceinline__ void ld8(const __nv_bfloat16* p, float (&f)[kW]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
__device__ __forceinline__ void st8(float* p, const float (&f)[kW]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
// One rounding per element (from_f32, as a scalar store), then packed two per word.
__device__ __forceinline__ void st8(__nv_bfloat16* p, const float (&f)[kW]) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * j]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(f[2 * j + 1]));
    w[j] = lo | (hi << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace opdlm::cuda::common
