// CUDA twins of the elementwise CPU ops: residual add and gradient accumulation (ops/residual.hpp),
// scaling, SwiGLU (ops/swiglu.hpp), the embedding gather and its deterministic scatter-add
// (ops/embedding.hpp), and the deterministic sum of squares behind the gradient norm
// (ops/grad_norm.hpp). Storage f32 or bf16, arithmetic f32 (sums of squares in double).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "cuda_common.cuh"

namespace opdlm::cuda {
namespace {

using namespace common;

// ---- helpers ---------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks (the trees below rely on it)


// Blocks for a grid-stride loop over n items (n > 0); the cap only bounds the launch, the loops cover n.
int grid_1d(int64_t n, int64_t per_block = kThreads) {
  return static_cast<int>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, 65535));
}


void check_n(int64_t n, const char* fn) {
  if (n < 0) OPDLM_FAIL("cuda::", fn, ": n is ", n, ", must be >= 0");
}

#define OPDLM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// ---- 16-byte vector access -----------------------------------------------------------------------------

// The vector kernels move kW = 8 elements per access (one 16-byte load for bf16, two for f32) when every
// pointer is 16-byte aligned; elements past the last whole vector go through the scalar formula. Each
// element still gets the scalar kernel's formula (shared __device__ functions), so results are identical.

// Blocks for a vector kernel over n elements: enough for the vectors, at most one full-occupancy wave
// (8 blocks of 256 threads per SM); the grid-stride loops cover the rest.
int grid_vec(int64_t n) {
  const int64_t want = (n / kW + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<int64_t>(want, 1, int64_t(sm_count()) * 8));
}

// ---- residual and elementwise ------------------------------------------------------------------------

// Per-element formulas, shared by the scalar and the vector kernels (so both give the same bits).
__device__ __forceinline__ float add_op(float x, float d) { return x + d; }
__device__ __forceinline__ float acc_op(float acc, float x, float scale) { return acc + x * scale; }
__device__ __forceinline__ float scale_op(float x, float scale) { return x * scale; }

template <class T>
__global__ void k_add_inplace(T* x, const T* d, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) x[i] = from_f32<T>(add_op(to_f32(x[i]), to_f32(d[i])));
}

// Vector kernels: whole vectors [0, n / kW) by grid stride, then the tail elements one per thread.
template <class T>
__global__ void k_add_inplace_vec(T* x, const T* d, int64_t n) {
  const int64_t nv = n / kW;
  OPDLM_GRID_STRIDE(k, nv) {
    float a[kW], b[kW];
    ld8(x + k * kW, a);
    ld8(d + k * kW, b);
#pragma unroll
    for (int j = 0; j < kW; ++j) a[j] = add_op(a[j], b[j]);
    st8(x + k * kW, a);
  }
  OPDLM_GRID_STRIDE(t, n - nv * kW) {
    const int64_t i = nv * kW + t;
    x[i] = from_f32<T>(add_op(to_f32(x[i]), to_f32(d[i])));
  }
}

template <class T>
__global__ void k_accumulate(float* acc, const T* x, float scale, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) acc[i] = acc_op(acc[i], to_f32(x[i]), scale);
}

template <class T>
__global__ void k_accumulate_vec(float* acc, const T* x, float scale, int64_t n) {
  const int64_t nv = n / kW;
  OPDLM_GRID_STRIDE(k, nv) {
    float a[kW], b[kW];
    ld8(acc + k * kW, a);
    ld8(x + k * kW, b);
#pragma unroll
    for (int j = 0; j < kW; ++j) a[j] = acc_op(a[j], b[j], scale);
    st8(acc + k * kW, a);
  }
  OPDLM_GRID_STRIDE(t, n - nv * kW) {
    const int64_t i = nv * kW + t;
    acc[i] = acc_op(acc[i], to_f32(x[i]), scale);
  }
}

template <class T>
__global__ void k_scale(T* x, float scale, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) x[i] = from_f32<T>(scale_op(to_f32(x[i]), scale));
}

template <class T>
__global__ void k_scale_vec(T* x, float scale, int64_t n) {
  const int64_t nv = n / kW;
  OPDLM_GRID_STRIDE(k, nv) {
    float a[kW];
    ld8(x + k * kW, a);
#pragma unroll
    for (int j = 0; j < kW; ++j) a[j] = scale_op(a[j], scale);
    st8(x + k * kW, a);
  }
  OPDLM_GRID_STRIDE(t, n - nv * kW) {
    const int64_t i = nv * kW + t;
    x[i] = from_f32<T>(scale_op(to_f32(x[i]), scale));
  }
}

// ---- SwiGLU --------------------------------------------------------------------------------------------

// As the CPU: sigmoid written so that exp never overflows for large |g|.
__device__ __forceinline__ float sigmoid(float g) {
  if (g >= 0.f) return 1.f / (1.f + expf(-g));
  const float e = expf(g);
  return e / (1.f + e);
}

__device__ __forceinline__ float swiglu_op(float g, float u) { return g * sigmoid(g) * u; }

// silu'(g) = s + g s (1 - s), s = sigmoid(g).
__device__ __forceinline__ void swiglu_bwd_op(float g, float u, float d, float& dg, float& du) {
  const float s = sigmoid(g);
  dg = d * u * (s + g * s * (1.f - s));
  du = d * g * s;
}

template <class T>
__global__ void k_swiglu_fwd(const T* gate, const T* up, T* h, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) h[i] = from_f32<T>(swiglu_op(to_f32(gate[i]), to_f32(up[i])));
}

template <class T>
__global__ void k_swiglu_fwd_vec(const T* gate, const T* up, T* h, int64_t n) {
  const int64_t nv = n / kW;
  OPDLM_GRID_STRIDE(k, nv) {
    float g[kW], u[kW];
    ld8(gate + k * kW, g);
    ld8(up + k * kW, u);
#pragma unroll
    for (int j = 0; j < kW; ++j) g[j] = swiglu_op(g[j], u[j]);
    st8(h + k * kW, g);
  }
  OPDLM_GRID_STRIDE(t, n - nv * kW) {
    const int64_t i = nv * kW + t;
    h[i] = from_f32<T>(swiglu_op(to_f32(gate[i]), to_f32(up[i])));
  }
}

// Inputs are read before the stores (dg/du may alias them).
template <class T>
__global__ void k_swiglu_bwd(const T* gate, const T* up, const T* dh, T* dg, T* du, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) {
    float a, b;
    swiglu_bwd_op(to_f32(gate[i]), to_f32(up[i]), to_f32(dh[i]), a, b);
    if (dg) dg[i] = from_f32<T>(a);
    if (du) du[i] = from_f32<T>(b);
  }
}

// Each thread loads its whole vector of every input before storing, so aliasing stays safe.
template <class T>
__global__ void k_swiglu_bwd_vec(const T* gate, const T* up, const T* dh, T* dg, T* du, int64_t n) {
  const int64_t nv = n / kW;
  OPDLM_GRID_STRIDE(k, nv) {
    float g[kW], u[kW], d[kW];
    ld8(gate + k * kW, g);
    ld8(up + k * kW, u);
    ld8(dh + k * kW, d);
#pragma unroll
    for (int j = 0; j < kW; ++j) {
      float a, b;
      swiglu_bwd_op(g[j], u[j], d[j], a, b);
      g[j] = a;
      u[j] = b;
    }
    if (dg) st8(dg + k * kW, g);
    if (du) st8(du + k * kW, u);
  }
  OPDLM_GRID_STRIDE(t, n - nv * kW) {
    const int64_t i = nv * kW + t;
    float a, b;
    swiglu_bwd_op(to_f32(gate[i]), to_f32(up[i]), to_f32(dh[i]), a, b);
    if (dg) dg[i] = from_f32<T>(a);
    if (du) du[i] = from_f32<T>(b);
  }
}

// ---- embedding -----------------------------------------------------------------------------------------

// Gather: blocks stride over tokens, threads over the row.
template <class T>
__global__ void k_embedding_fwd(const T* table, const int32_t* ids, T* out, int64_t n, int64_t D) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* src = table + int64_t(ids[i]) * D;
    T* dst = out + i * D;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) dst[c] = src[c];
  }
}

// Scatter-add, deterministic without scratch or atomics: the block of token i does nothing unless i is
// the FIRST token with its id; that leader then owns the row dtable[id, :] and adds dy[j, :] for every
// token j >= i with the same id, in token order (so f32 gives the CPU's bits). Ids are scanned a tile of
// kThreads at a time (one per thread); the leader compacts a tile's matches, in order, into shared memory
// with a ballot and per-warp prefix, then its threads sweep the row's columns over that list.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_embedding_bwd(const int32_t* ids, const T* dy, float* dtable, int64_t n, int64_t V, int64_t D) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int64_t s_match[kThreads];  // token indices of this tile's matches, in order
  __shared__ int s_warp[kWarps];         // matches per warp in this tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int32_t id = ids[i];  // the same for the whole block
    if (id < 0 || int64_t(id) >= V) continue;  // out of range: skipped, as before (the caller checks ids)
    // Is there an earlier token with this id? Block-uniform answer through __syncthreads_or.
    bool earlier = false;
    for (int64_t j0 = 0; j0 < i && !earlier; j0 += 4 * kThreads) {  // 4 ids per thread per barrier
      bool hit = false;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t j = j0 + q * kThreads + threadIdx.x;
        hit = hit || (j < i && ids[j] == id);
      }
      earlier = __syncthreads_or(hit) != 0;
    }
    if (earlier) continue;
    float* row = dtable + int64_t(id) * D;
    for (int64_t j0 = i; j0 < n; j0 += kThreads) {
      const int64_t j = j0 + threadIdx.x;
      const bool match = j < n && ids[j] == id;
      const unsigned ballot = __ballot_sync(0xffffffffu, match);
      if (lane == 0) s_warp[warp] = __popc(ballot);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += s_warp[w];
        total += s_warp[w];
      }
      if (match) s_match[before + __popc(ballot & ((1u << lane) - 1u))] = j;
      __syncthreads();
      if (total > 0) {  // block-uniform
        for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
          float a = row[c];
#pragma unroll 8
          for (int k = 0; k < total; ++k) a += to_f32(dy[s_match[k] * D + c]);  // token order
          row[c] = a;
        }
      }
      __syncthreads();  // s_match and s_warp are rewritten by the next tile
    }
  }
}

// ---- sum of squares ---------------------------------------------------------------------------------

// Pass 1: block b sums x^2 (double) over its grid-stride share into partial[b]; pass 2: one block
// adds the partials. The block count depends on n only, so the order (and the bits) are fixed per n.
constexpr int64_t kSumMaxBlocks = 1024;
constexpr int64_t kSumPerBlock = kThreads * 16;  // elements per block before the cap applies

int64_t sum_blocks(int64_t n) { return std::clamp<int64_t>((n + kSumPerBlock - 1) / kSumPerBlock, 1, kSumMaxBlocks); }

__global__ void __launch_bounds__(kThreads) k_sumsq_partial(const float* x, int64_t n, double* partial) {
  __shared__ double red[kThreads];
  double acc = 0;
  OPDLM_GRID_STRIDE(i, n) {
    const double v = x[i];
    acc += v * v;
  }
  const double s = block_sum<kThreads>(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads) k_sumsq_final(const double* partial, int64_t nparts, double* out) {
  __shared__ double red[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[i];
  const double s = block_sum<kThreads>(acc, red);
  if (threadIdx.x == 0) out[0] = s;
}

#undef OPDLM_GRID_STRIDE

}  // namespace

// ---- host wrappers -------------------------------------------------------------------------------------

void add_inplace(void* x, const void* delta, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "add_inplace");
  if (n == 0) return;
  dispatch(dt, "add_inplace", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (aligned16(x) && aligned16(delta))
      k_add_inplace_vec<T><<<grid_vec(n), kThreads, 0, stream>>>(static_cast<T*>(x), static_cast<const T*>(delta), n);
    else
      k_add_inplace<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<T*>(x), static_cast<const T*>(delta), n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void accumulate_f32(float* acc, const void* x, float scale, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "accumulate_f32");
  if (n == 0) return;
  dispatch(dt, "accumulate_f32", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (aligned16(acc) && aligned16(x))
      k_accumulate_vec<T><<<grid_vec(n), kThreads, 0, stream>>>(acc, static_cast<const T*>(x), scale, n);
    else
      k_accumulate<T><<<grid_1d(n), kThreads, 0, stream>>>(acc, static_cast<const T*>(x), scale, n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void scale_inplace(void* x, float scale, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "scale_inplace");
  if (n == 0) return;
  dispatch(dt, "scale_inplace", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (aligned16(x))
      k_scale_vec<T><<<grid_vec(n), kThreads, 0, stream>>>(static_cast<T*>(x), scale, n);
    else
      k_scale<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<T*>(x), scale, n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_forward(const void* gate, const void* up, void* h, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "swiglu_forward");
  if (n == 0) return;
  dispatch(dt, "swiglu_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = static_cast<const T*>(gate);
    const T* u = static_cast<const T*>(up);
    if (aligned16(gate) && aligned16(up) && aligned16(h))
      k_swiglu_fwd_vec<T><<<grid_vec(n), kThreads, 0, stream>>>(g, u, static_cast<T*>(h), n);
    else
      k_swiglu_fwd<T><<<grid_1d(n), kThreads, 0, stream>>>(g, u, static_cast<T*>(h), n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(const void* gate, const void* up, const void* dh, void* dgate, void* dup, int64_t n, DType dt,
                     cudaStream_t stream) {
  check_n(n, "swiglu_backward");
  if (n == 0 || (!dgate && !dup)) return;
  dispatch(dt, "swiglu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = static_cast<const T*>(gate);
    const T* u = static_cast<const T*>(up);
    const T* d = static_cast<const T*>(dh);
    // A null output counts as aligned (it is never written).
    if (aligned16(gate) && aligned16(up) && aligned16(dh) && aligned16(dgate) && aligned16(dup))
      k_swiglu_bwd_vec<T><<<grid_vec(n), kThreads, 0, stream>>>(g, u, d, static_cast<T*>(dgate), static_cast<T*>(dup), n);
    else
      k_swiglu_bwd<T><<<grid_1d(n), kThreads, 0, stream>>>(g, u, d, static_cast<T*>(dgate), static_cast<T*>(dup), n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void embedding_forward(const void* table, const int32_t* ids, void* out, int64_t n, int64_t V, int64_t D, DType dt,
                       cudaStream_t stream) {
  if (n < 0 || V < 0 || D < 0) OPDLM_FAIL("cuda::embedding_forward: n = ", n, ", V = ", V, ", D = ", D, " must be >= 0");
  if (n == 0 || D == 0) return;
  if (V == 0) OPDLM_FAIL("cuda::embedding_forward: empty table (V = 0) for ", n, " ids");
  dispatch(dt, "embedding_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = D >= kThreads ? kThreads : static_cast<int>((D + 31) / 32 * 32);
    const int grid = static_cast<int>(std::min<int64_t>(n, 65535));
    k_embedding_fwd<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(table), ids, static_cast<T*>(out), n, D);
  });
  CUDA_CHECK(cudaGetLastError());
}

void embedding_backward(const int32_t* ids, const void* dy, float* dtable, int64_t n, int64_t V, int64_t D, DType dt,
                        cudaStream_t stream) {
  if (n < 0 || V < 0 || D < 0)
    OPDLM_FAIL("cuda::embedding_backward: n = ", n, ", V = ", V, ", D = ", D, " must be >= 0");
  if (n == 0 || D == 0) return;
  if (V == 0) OPDLM_FAIL("cuda::embedding_backward: empty table (V = 0) for ", n, " ids");
  dispatch(dt, "embedding_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // One block per token (a grid stride past 65535); only the first token of each id does the work.
    const int grid = static_cast<int>(std::min<int64_t>(n, 65535));
    k_embedding_bwd<T><<<grid, kThreads, 0, stream>>>(ids, static_cast<const T*>(dy), dtable, n, V, D);
  });
  CUDA_CHECK(cudaGetLastError());
}

size_t sum_squares_scratch_bytes(int64_t n) {
  return n > 0 ? static_cast<size_t>(sum_blocks(n)) * sizeof(double) : 0;
}

void sum_squares(const float* x, int64_t n, double* out, void* scratch, cudaStream_t stream) {
  check_n(n, "sum_squares");
  if (n == 0) {  // the empty sum: 0, without a launch
    CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  if (!scratch) OPDLM_FAIL("cuda::sum_squares: scratch is null; it needs sum_squares_scratch_bytes(", n, ") bytes");
  const int64_t blocks = sum_blocks(n);
  double* partial = static_cast<double*>(scratch);
  k_sumsq_partial<<<static_cast<int>(blocks), kThreads, 0, stream>>>(x, n, partial);
  CUDA_CHECK(cudaGetLastError());
  k_sumsq_final<<<1, kThreads, 0, stream>>>(partial, blocks, out);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
