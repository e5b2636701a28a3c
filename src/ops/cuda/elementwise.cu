// CUDA twins of the elementwise CPU ops: residual add and gradient accumulation (ops/residual.hpp),
// scaling, SwiGLU (ops/swiglu.hpp), the embedding gather and its deterministic scatter-add
// (ops/embedding.hpp), and the deterministic sum of squares behind the gradient norm
// (ops/grad_norm.hpp). Storage f32 or bf16, arithmetic f32 (sums of squares in double).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"

namespace opdlm::cuda {
namespace {

// ---- helpers ---------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks (the trees below rely on it)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Blocks for a grid-stride loop over n items (n > 0); the cap only bounds the launch, the loops cover n.
int grid_1d(int64_t n, int64_t per_block = kThreads) {
  return static_cast<int>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, 65535));
}

template <class T> struct Tag { using type = T; };

// Calls f(Tag<float>) or f(Tag<__nv_bfloat16>) for dt; any other dtype is an Error naming `fn`.
template <class F>
void dispatch(DType dt, const char* fn, F&& f) {
  if (dt == DType::f32) f(Tag<float>{});
  else if (dt == DType::bf16) f(Tag<__nv_bfloat16>{});
  else OPDLM_FAIL("cuda::", fn, ": dtype ", dtype_name(dt), " unsupported; expected f32 or bf16");
}

void check_n(int64_t n, const char* fn) {
  if (n < 0) OPDLM_FAIL("cuda::", fn, ": n is ", n, ", must be >= 0");
}

#define OPDLM_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// ---- residual and elementwise ------------------------------------------------------------------------

template <class T>
__global__ void k_add_inplace(T* x, const T* d, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(d[i]));
}

template <class T>
__global__ void k_accumulate(float* acc, const T* x, float scale, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) acc[i] += to_f32(x[i]) * scale;
}

template <class T>
__global__ void k_scale(T* x, float scale, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) x[i] = from_f32<T>(to_f32(x[i]) * scale);
}

// ---- SwiGLU --------------------------------------------------------------------------------------------

// As the CPU: sigmoid written so that exp never overflows for large |g|.
__device__ __forceinline__ float sigmoid(float g) {
  if (g >= 0.f) return 1.f / (1.f + expf(-g));
  const float e = expf(g);
  return e / (1.f + e);
}

template <class T>
__global__ void k_swiglu_fwd(const T* gate, const T* up, T* h, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) {
    const float g = to_f32(gate[i]);
    h[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
  }
}

// silu'(g) = s + g s (1 - s), s = sigmoid(g). Inputs are read before the stores (dg/du may alias them).
template <class T>
__global__ void k_swiglu_bwd(const T* gate, const T* up, const T* dh, T* dg, T* du, int64_t n) {
  OPDLM_GRID_STRIDE(i, n) {
    const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dh[i]);
    const float s = sigmoid(g);
    if (dg) dg[i] = from_f32<T>(d * u * (s + g * s * (1.f - s)));
    if (du) du[i] = from_f32<T>(d * g * s);
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

// Scatter-add, deterministic without scratch or atomics: thread (column c, vocabulary slice y) owns the
// elements dtable[v, c] for v in its slice and walks ALL tokens in order, adding those whose id falls in
// the slice. Each element has one owner and the CPU's token order (so f32 gives the CPU's bits); the
// slices only add parallelism. Ids are staged through shared memory a tile at a time.
constexpr int kIdTile = 1024;

template <class T>
__global__ void k_embedding_bwd(const int32_t* ids, const T* dy, float* dtable, int64_t n, int64_t V, int64_t D) {
  __shared__ int32_t s_ids[kIdTile];
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t v0 = V * blockIdx.y / gridDim.y, v1 = V * (blockIdx.y + 1) / gridDim.y;
  for (int64_t i0 = 0; i0 < n; i0 += kIdTile) {
    const int64_t m = min(int64_t(kIdTile), n - i0);
    __syncthreads();  // the previous tile is consumed
    for (int64_t k = threadIdx.x; k < m; k += blockDim.x) s_ids[k] = ids[i0 + k];
    __syncthreads();
    if (c >= D) continue;  // no early return: every thread takes part in the barriers
    for (int64_t k = 0; k < m; ++k) {
      const int64_t v = s_ids[k];
      if (v >= v0 && v < v1) dtable[v * D + c] += to_f32(dy[(i0 + k) * D + c]);
    }
  }
}

// ---- sum of squares ---------------------------------------------------------------------------------

// Pass 1: block b sums x^2 (double) over its grid-stride share into partial[b]; pass 2: one block
// adds the partials. The block count depends on n only, so the order (and the bits) are fixed per n.
constexpr int64_t kSumMaxBlocks = 1024;
constexpr int64_t kSumPerBlock = kThreads * 16;  // elements per block before the cap applies

int64_t sum_blocks(int64_t n) { return std::clamp<int64_t>((n + kSumPerBlock - 1) / kSumPerBlock, 1, kSumMaxBlocks); }

// Sum of v over the block (blockDim.x == kThreads) in a fixed tree; the result is valid in thread 0.
__device__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

__global__ void __launch_bounds__(kThreads) k_sumsq_partial(const float* x, int64_t n, double* partial) {
  __shared__ double red[kThreads];
  double acc = 0;
  OPDLM_GRID_STRIDE(i, n) {
    const double v = x[i];
    acc += v * v;
  }
  const double s = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads) k_sumsq_final(const double* partial, int64_t nparts, double* out) {
  __shared__ double red[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[i];
  const double s = block_sum(acc, red);
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
    k_add_inplace<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<T*>(x), static_cast<const T*>(delta), n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void accumulate_f32(float* acc, const void* x, float scale, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "accumulate_f32");
  if (n == 0) return;
  dispatch(dt, "accumulate_f32", [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_accumulate<T><<<grid_1d(n), kThreads, 0, stream>>>(acc, static_cast<const T*>(x), scale, n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void scale_inplace(void* x, float scale, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "scale_inplace");
  if (n == 0) return;
  dispatch(dt, "scale_inplace", [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_scale<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<T*>(x), scale, n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_forward(const void* gate, const void* up, void* h, int64_t n, DType dt, cudaStream_t stream) {
  check_n(n, "swiglu_forward");
  if (n == 0) return;
  dispatch(dt, "swiglu_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_swiglu_fwd<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                                         static_cast<T*>(h), n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(const void* gate, const void* up, const void* dh, void* dgate, void* dup, int64_t n, DType dt,
                     cudaStream_t stream) {
  check_n(n, "swiglu_backward");
  if (n == 0 || (!dgate && !dup)) return;
  dispatch(dt, "swiglu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    k_swiglu_bwd<T><<<grid_1d(n), kThreads, 0, stream>>>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                                         static_cast<const T*>(dh), static_cast<T*>(dgate),
                                                         static_cast<T*>(dup), n);
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
    const int64_t col_blocks = (D + kThreads - 1) / kThreads;
    // About 512 blocks in all; each vocabulary slice rescans the ids (cheap, from shared memory).
    const int64_t slices = std::clamp<int64_t>(512 / col_blocks, 1, std::min<int64_t>(V, 65535));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(slices));
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
