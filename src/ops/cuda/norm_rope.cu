// CUDA twins of RMSNorm (ops/rmsnorm.hpp) and RoPE (ops/rope.hpp): same formulas and evaluation order
// as the CPU's f32 path, row reductions in double, one rounding per store; the dw reduction over rows is
// a fixed-order tree (no atomics), so it is deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "cuda_common.cuh"

namespace opdlm::cuda {
namespace {

using namespace common;

// ---- helpers ---------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // row kernels: one 256-thread block per row




// ---- RMSNorm -------------------------------------------------------------------------------------------

// Blocks stride over rows. y may alias x: each element is read and written by the same thread, after
// the row's reduction.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_fwd(const T* x, const T* w, T* y, float* rstd, int64_t rows, int64_t D, double eps) {
  __shared__ double red[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    double ss = 0;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) {
      const double v = to_f32(xr[j]);
      ss += v * v;
    }
    ss = block_sum<kThreads>(ss, red);
    const float rs = static_cast<float>(1.0 / sqrt(ss / double(D) + eps));  // as the CPU: double, then cast
    if (rstd && threadIdx.x == 0) rstd[r] = rs;
    T* yr = y + r * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads) yr[j] = from_f32<T>(to_f32(xr[j]) * rs * to_f32(w[j]));
    __syncthreads();  // red[0] is read by all before the next row overwrites red
  }
}

// dx_j = r w_j dy_j - x_j c,  c = r^3 / D * sum_k dy_k w_k x_k. dx may alias x or dy (as in the forward).
template <class T>
__global__ void __launch_bounds__(kThreads) k_rmsnorm_dx(const T* x, const T* w, const float* rstd, const T* dy,
                                                         T* dx, int64_t rows, int64_t D) {
  __shared__ double red[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    double dot = 0;
    for (int64_t j = threadIdx.x; j < D; j += kThreads)
      dot += double(to_f32(gr[j])) * double(to_f32(w[j])) * double(to_f32(xr[j]));
    dot = block_sum<kThreads>(dot, red);
    const float rs = rstd[r];
    const double rsd = rs;
    const float c = static_cast<float>(dot * rsd * rsd * rsd / double(D));
    T* o = dx + r * D;
    for (int64_t j = threadIdx.x; j < D; j += kThreads)
      o[j] = from_f32<T>(rs * to_f32(w[j]) * to_f32(gr[j]) - to_f32(xr[j]) * c);
    __syncthreads();
  }
}

// Warp-per-row twins of the two kernels above for rows of at most kWarpRowMax elements (the per-head
// q/k norms have D = head_dim = 128: a 256-thread block and 8 barriers per row left most threads idle).
// The xor butterfly leaves the same bits in every lane, so the sum is deterministic.
constexpr int64_t kWarpRowMax = 1024;
constexpr int kWarpsPerBlock = kThreads / 32;

__device__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_fwd_warp(const T* x, const T* w, T* y, float* rstd, int64_t rows, int64_t D, double eps) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* xr = x + r * D;
    double ss = 0;
    for (int64_t j = lane; j < D; j += 32) {
      const double v = to_f32(xr[j]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    const float rs = static_cast<float>(1.0 / sqrt(ss / double(D) + eps));
    if (rstd && lane == 0) rstd[r] = rs;
    T* yr = y + r * D;
    for (int64_t j = lane; j < D; j += 32) yr[j] = from_f32<T>(to_f32(xr[j]) * rs * to_f32(w[j]));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) k_rmsnorm_dx_warp(const T* x, const T* w, const float* rstd, const T* dy,
                                                              T* dx, int64_t rows, int64_t D) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; r < rows;
       r += int64_t(gridDim.x) * kWarpsPerBlock) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    double dot = 0;
    for (int64_t j = lane; j < D; j += 32) dot += double(to_f32(gr[j])) * double(to_f32(w[j])) * double(to_f32(xr[j]));
    dot = warp_sum(dot);
    const float rs = rstd[r];
    const double rsd = rs;
    const float c = static_cast<float>(dot * rsd * rsd * rsd / double(D));
    T* o = dx + r * D;
    // Every lane has read its elements of the row before writing them (dx may alias x or dy).
    for (int64_t j = lane; j < D; j += 32) o[j] = from_f32<T>(rs * to_f32(w[j]) * to_f32(gr[j]) - to_f32(xr[j]) * c);
  }
}

// dw_c += sum over rows of dy_c x_c r, summed in double. Block = kCols columns x kLanes row lanes: lane y
// adds rows y, y + kLanes, ... in order, then the lanes are added in a fixed tree. kCols * sizeof(T) =
// 32 bytes, one memory sector per row per warp-quarter. Blocks stride over column chunks.
constexpr int kDwThreads = 512;

template <class T, int kCols>
__global__ void __launch_bounds__(kDwThreads)
    k_rmsnorm_dw(const T* x, const float* rstd, const T* dy, float* dw, int64_t rows, int64_t D) {
  constexpr int kLanes = kDwThreads / kCols;
  __shared__ double red[kLanes][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t c0 = int64_t(blockIdx.x) * kCols; c0 < D; c0 += int64_t(gridDim.x) * kCols) {
    const int64_t c = c0 + tx;
    double acc = 0;
    if (c < D)
      for (int64_t r = ty; r < rows; r += kLanes)
        acc += double(to_f32(dy[r * D + c])) * double(to_f32(x[r * D + c])) * double(rstd[r]);
    red[ty][tx] = acc;
    __syncthreads();
    for (int s = kLanes / 2; s > 0; s >>= 1) {
      if (ty < s) red[ty][tx] += red[ty + s][tx];
      __syncthreads();
    }
    if (ty == 0 && c < D) dw[c] += static_cast<float>(red[0][tx]);
    __syncthreads();  // red is rewritten for the next chunk
  }
}

// Row-parallel dw for many rows (the per-head q/k norms: rows = tokens * heads, D = head_dim, where one
// block per few columns leaves the GPU idle). Stage 1: block b sums rows [b * chunk, (b + 1) * chunk)
// in order for every column (coalesced: threads walk the columns of a row) into partial[b, c] (f64).
// Stage 2: one block per column sums the partials in a fixed tree. Deterministic for (rows, D).
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_dw_partial(const T* x, const float* rstd, const T* dy, double* partial, int64_t rows, int64_t D,
                         int64_t chunk) {
  const int64_t r0 = int64_t(blockIdx.x) * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) {
    double acc = 0;
    for (int64_t r = r0; r < r1; ++r)
      acc += double(to_f32(dy[r * D + c])) * double(to_f32(x[r * D + c])) * double(rstd[r]);
    partial[int64_t(blockIdx.x) * D + c] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    k_rmsnorm_dw_finish(const double* partial, int64_t chunks, int64_t D, float* dw) {
  __shared__ double red[kThreads];
  for (int64_t c = blockIdx.x; c < D; c += gridDim.x) {
    double acc = 0;
    for (int64_t b = threadIdx.x; b < chunks; b += kThreads) acc += partial[b * D + c];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int st = kThreads / 2; st > 0; st >>= 1) {
      if (int(threadIdx.x) < st) red[threadIdx.x] += red[threadIdx.x + st];
      __syncthreads();
    }
    if (threadIdx.x == 0) dw[c] += static_cast<float>(red[0]);
    __syncthreads();
  }
}

// Rows per stage-1 block: enough blocks to fill the GPU (~1024), at least 16 rows each.
int64_t dw_chunk_rows(int64_t rows) { return std::max<int64_t>(16, (rows + 1023) / 1024); }

// ---- RoPE ------------------------------------------------------------------------------------------

// cos/sin[t, i] = cos/sin(pos[t] * inv_i), inv_i = 1 / theta^(2i / head_dim), all in double as the CPU.
__global__ void k_rope_table(const int32_t* pos, int64_t tokens, int64_t half, double theta, float* c, float* s) {
  const int64_t n = tokens * half;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = k / half, i = k % half;
    const double inv = 1.0 / pow(theta, double(2 * i) / double(2 * half));
    const double a = double(pos[t]) * inv;
    c[k] = static_cast<float>(cos(a));
    s[k] = static_cast<float>(sin(a));
  }
}

// x [tokens, heads, 2 half]: thread x walks the pairs (j, j + half) of a head, thread y picks the head
// (row = t * heads + h); blocks stride over rows. The inverse rotates by -angle (the backward).
// The rotation of one pair (a, b) = (x[j], x[j + half]); shared by the scalar and vector kernels.
// Explicitly rounded products and sums (no fused multiply-add): nvcc contracts a * c - b * s
// differently in different kernels, and the CPU (no -march=native) never fuses; so every form gives
// the CPU's bits.
__device__ __forceinline__ void rope_pair(float& a, float& b, float c, float s, bool inverse) {
  const float a0 = a, b0 = b;
  if (!inverse) {
    a = __fsub_rn(__fmul_rn(a0, c), __fmul_rn(b0, s));
    b = __fadd_rn(__fmul_rn(b0, c), __fmul_rn(a0, s));
  } else {
    a = __fadd_rn(__fmul_rn(a0, c), __fmul_rn(b0, s));
    b = __fsub_rn(__fmul_rn(b0, c), __fmul_rn(a0, s));
  }
}

template <class T>
__global__ void k_rope(T* x, const float* cos_t, const float* sin_t, int64_t tokens, int64_t heads, int64_t half,
                       bool inverse) {
  const int64_t rows = tokens * heads;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t t = row / heads;
    const float* ct = cos_t + t * half;
    const float* st = sin_t + t * half;
    T* v = x + row * 2 * half;
    for (int64_t j = threadIdx.x; j < half; j += blockDim.x) {
      float a = to_f32(v[j]), b = to_f32(v[j + half]);
      rope_pair(a, b, ct[j], st[j], inverse);
      v[j] = from_f32<T>(a);
      v[j + half] = from_f32<T>(b);
    }
  }
}

// 16-byte form (half a multiple of 8, x, cos and sin 16-byte aligned): item k is 8 consecutive pairs
// (j .. j+7) of one head row; grid stride over rows * half / 8 items.
template <class T>
__global__ void k_rope_vec(T* x, const float* cos_t, const float* sin_t, int64_t tokens, int64_t heads, int64_t half,
                           bool inverse) {
  const int64_t per_row = half / 8, items = tokens * heads * per_row;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < items; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / per_row, j = (k % per_row) * 8;
    const int64_t t = row / heads;
    T* v = x + row * 2 * half;
    float a[8], b[8], c[8], s[8];
    ld8(v + j, a);
    ld8(v + j + half, b);
    ld8(cos_t + t * half + j, c);
    ld8(sin_t + t * half + j, s);
#pragma unroll
    for (int q = 0; q < 8; ++q) rope_pair(a[q], b[q], c[q], s[q], inverse);
    st8(v + j, a);
    st8(v + j + half, b);
  }
}

}  // namespace

// ---- host wrappers -------------------------------------------------------------------------------------

void rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t D, double eps,
                     DType dt, cudaStream_t stream) {
  if (rows < 0 || D <= 0) OPDLM_FAIL("cuda::rmsnorm_forward: rows = ", rows, ", D = ", D, "; need rows >= 0, D > 0");
  if (!(eps >= 0)) OPDLM_FAIL("cuda::rmsnorm_forward: eps = ", eps, " must be >= 0");
  if (rows == 0) return;
  dispatch(dt, "rmsnorm_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (D <= kWarpRowMax)
      k_rmsnorm_fwd_warp<T><<<grid_cap((rows + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, rows, D, eps);
    else
      k_rmsnorm_fwd<T><<<grid_cap(rows), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                                static_cast<T*>(y), rstd, rows, D, eps);
  });
  CUDA_CHECK(cudaGetLastError());
}

size_t rmsnorm_backward_scratch_bytes(int64_t rows, int64_t D) {
  if (rows <= 0 || D <= 0) return 0;
  const int64_t chunk = dw_chunk_rows(rows);
  return size_t((rows + chunk - 1) / chunk) * size_t(D) * sizeof(double);
}

void rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                      int64_t rows, int64_t D, DType dt, cudaStream_t stream, void* scratch) {
  if (rows < 0 || D <= 0) OPDLM_FAIL("cuda::rmsnorm_backward: rows = ", rows, ", D = ", D, "; need rows >= 0, D > 0");
  if (rows == 0 || (!dx && !dw)) return;
  if (!rstd) OPDLM_FAIL("cuda::rmsnorm_backward: rstd is null; pass the forward's rstd [rows]");
  dispatch(dt, "rmsnorm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // dw first: it reads x and dy, which dx may overwrite when it aliases them.
    if (dw && scratch) {
      const int64_t chunk = dw_chunk_rows(rows), chunks = (rows + chunk - 1) / chunk;
      k_rmsnorm_dw_partial<T><<<grid_cap(chunks), kThreads, 0, stream>>>(
          static_cast<const T*>(x), rstd, static_cast<const T*>(dy), static_cast<double*>(scratch), rows, D, chunk);
      CUDA_CHECK(cudaGetLastError());
      k_rmsnorm_dw_finish<<<grid_cap(D), kThreads, 0, stream>>>(static_cast<const double*>(scratch), chunks, D, dw);
      CUDA_CHECK(cudaGetLastError());
    } else if (dw) {
      constexpr int kCols = 32 / int(sizeof(T));
      const dim3 block(kCols, kDwThreads / kCols);
      k_rmsnorm_dw<T, kCols><<<grid_cap((D + kCols - 1) / kCols), block, 0, stream>>>(
          static_cast<const T*>(x), rstd, static_cast<const T*>(dy), dw, rows, D);
      CUDA_CHECK(cudaGetLastError());
    }
    if (dx) {
      if (D <= kWarpRowMax)
        k_rmsnorm_dx_warp<T><<<grid_cap((rows + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(w), rstd, static_cast<const T*>(dy), static_cast<T*>(dx),
            rows, D);
      else
        k_rmsnorm_dx<T><<<grid_cap(rows), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                                 rstd, static_cast<const T*>(dy), static_cast<T*>(dx),
                                                                 rows, D);
      CUDA_CHECK(cudaGetLastError());
    }
  });
}

void rope_table(const int32_t* positions, int64_t tokens, int64_t head_dim, double theta, float* cos, float* sin,
                cudaStream_t stream) {
  if (tokens < 0) OPDLM_FAIL("cuda::rope_table: tokens is ", tokens);
  if (!(head_dim > 0 && head_dim % 2 == 0))
    OPDLM_FAIL("cuda::rope_table: head_dim is ", head_dim, ", must be even and > 0 (rotate-half pairs)");
  if (!(theta > 0)) OPDLM_FAIL("cuda::rope_table: theta = ", theta, " must be > 0");
  if (tokens == 0) return;
  const int64_t half = head_dim / 2;
  k_rope_table<<<grid_cap((tokens * half + kThreads - 1) / kThreads), kThreads, 0, stream>>>(positions, tokens, half,
                                                                                           theta, cos, sin);
  CUDA_CHECK(cudaGetLastError());
}

void rope_inplace(void* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t head_dim,
                  bool inverse, DType dt, cudaStream_t stream) {
  if (tokens < 0 || heads < 0) OPDLM_FAIL("cuda::rope_inplace: tokens = ", tokens, ", heads = ", heads);
  if (!(head_dim > 0 && head_dim % 2 == 0))
    OPDLM_FAIL("cuda::rope_inplace: head_dim is ", head_dim, ", must be even and > 0 (rotate-half pairs)");
  if (tokens == 0 || heads == 0) return;
  const int64_t half = head_dim / 2;
  // Threads in x cover a head's pairs (a multiple of 32, at most 128), y fills the block up to 256.
  const int bx = static_cast<int>(std::min<int64_t>((half + 31) / 32 * 32, 128));
  const int by = kThreads / bx;
  const int64_t rows = tokens * heads;
  const bool vec = half % 8 == 0 && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(cos) |
                                       reinterpret_cast<uintptr_t>(sin)) & 15u) == 0;
  dispatch(dt, "rope_inplace", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec) {
      const int64_t items = rows * (half / 8);
      k_rope_vec<T><<<grid_cap((items + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          static_cast<T*>(x), cos, sin, tokens, heads, half, inverse);
      return;
    }
    k_rope<T><<<grid_cap((rows + by - 1) / by), dim3(bx, by), 0, stream>>>(static_cast<T*>(x), cos, sin, tokens,
                                                                            heads, half, inverse);
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
