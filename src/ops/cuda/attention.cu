// CUDA twin of ops::attention_forward / attention_backward (src/ops/cpu/attention.cpp): GQA heads and
// the mask descriptors of ops/mask.hpp, flash-attention style. The mask rules are the CPU's own
// (ops/mask_rules.hpp, evaluated per query row in the kernels), so no mask is ever materialised.
//
// Forward: one thread block per (batch row, query head, tile of kBQ query rows); it walks the key tiles
// in order, skips a tile that no row of the query tile may see (a block-wide vote), applies the exact
// per-(q, k) rule inside a tile, and keeps an online softmax (running max and sum in f32) per row.
// Two implementations: a scalar one (f32 FMA from shared memory; every dtype, every D <= 256) and, for
// bf16 with D % 16 == 0, one whose Q K^T and P V products run on tensor cores (nvcuda::wmma bf16
// 16x16x16 fragments, f32 accumulation); the softmax and the mask are the same code in both.
//
// Backward (FlashAttention-2 style, recomputing P from q, k and lse): a row-term kernel (delta = sum_d
// dout * o, into the f32 scratch), a dq kernel per query tile looping over key tiles in order, and a
// dk/dv kernel per key tile looping over the group's query heads and the query tiles in a fixed order
// (scalar kernels, and for bf16 with D % 16 == 0 tensor-core ones with P and dS as bf16 operands).
// OPDLM_ATTN_SCALAR=1 in the environment selects the scalar kernels everywhere. bf16 with D = 64 or 128
// goes to the faster mma.sync kernels of attention_fa2.cu ("v2") unless OPDLM_ATTN_IMPL=v1. No float atomics anywhere: every sum has an order fixed by the shape, so results are bitwise
// reproducible run to run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/ops/cuda/attention_cuda.hpp"
#include "opdlm/ops/mask_rules.hpp"

namespace opdlm::cuda {

// ---- v2 (attention_fa2.cu): mma.sync kernels for bf16 with D = 64 or 128 ----
namespace fa2 {
bool applies(DType dt, int64_t D, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv,
             std::initializer_list<const void*> ptrs);
void forward(const void* q, const void* k, const void* v, void* o, float* lse, int64_t B, int64_t Tq, int64_t Tk,
             int64_t Hq, int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks, float scale,
             cudaStream_t stream);
void backward(const void* q, const void* k, const void* v, const void* o, const float* lse, const void* dout,
              void* dq, void* dk, void* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D,
              const DeviceMask* masks, int64_t n_masks, float scale, float* delta, cudaStream_t stream);
}  // namespace fa2

// ---- host-side descriptors ----

DeviceMask to_device_mask(const ops::MaskDescriptor& m) {
  DeviceMask d;
  d.kind = static_cast<int32_t>(m.kind);
  d.block_size = m.block_size;
  d.pad_left = m.pad_left;
  d.prompt_len = m.prompt_len;
  d.response_len = m.response_len;
  d.q_offset = m.q_offset;
  return d;
}

namespace {

// Descriptors travel as a kernel argument (copied by the launch itself), so the caller may reuse its
// host array as soon as upload_masks returns, with no pinned buffer to manage and no synchronisation.
constexpr int kMasksPerLaunch = 64;  // 64 * 48 bytes: well inside the 4 KiB kernel-parameter limit
struct MaskBatch {
  DeviceMask m[kMasksPerLaunch];
};

__global__ void k_store_masks(MaskBatch batch, int n, DeviceMask* dev) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dev[i] = batch.m[i];
}

}  // namespace

void upload_masks(std::span<const ops::MaskDescriptor> masks, DeviceMask* dev, cudaStream_t stream) {
  for (size_t i0 = 0; i0 < masks.size(); i0 += kMasksPerLaunch) {
    const int n = static_cast<int>(std::min<size_t>(kMasksPerLaunch, masks.size() - i0));
    MaskBatch batch;
    for (int i = 0; i < n; ++i) batch.m[i] = to_device_mask(masks[i0 + size_t(i)]);
    k_store_masks<<<1, 64, 0, stream>>>(batch, n, dev + i0);
    CUDA_CHECK(cudaGetLastError());
  }
}

namespace {

// ---- tiling ----

constexpr int kBQ = 32;        // query rows per tile
constexpr int kBK = 32;        // keys per tile
constexpr int kThreads = 256;  // 8 threads per tile row: row r = tid / 8, lane l8 = tid % 8
constexpr int kMaxD = 256;
constexpr int kPS = kBK + 1;   // row stride of the [32][32] probability tiles (padded: no bank conflicts)

__device__ inline float to_f(float x) { return x; }
__device__ inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ inline T from_f(float x);
template <>
__device__ inline float from_f<float>(float x) {
  return x;
}
template <>
__device__ inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Allowed keys of one query row: [b0, e0) and [b1, e1) (the second empty when the rule gives one range).
struct RowRanges {
  int64_t b0, e0, b1, e1;
  __device__ bool allows(int64_t k) const { return (k >= b0 && k < e0) || (k >= b1 && k < e1); }
  __device__ bool meets(int64_t k0, int64_t k1) const { return (b0 < k1 && e0 > k0) || (b1 < k1 && e1 > k0); }
};

// A row outside [0, Tq) gets no keys at all.
__device__ inline RowRanges row_ranges(const DeviceMask& m, int64_t q, int64_t tq, int64_t tk) {
  RowRanges r{0, 0, 0, 0};
  if (q < 0 || q >= tq) return r;
  int64_t beg[2] = {0, 0}, end[2] = {0, 0};
  const int n = ops::mask_ranges(m.kind, m.block_size, m.pad_left, m.prompt_len, m.response_len, m.q_offset, q, tk,
                                 beg, end);
  if (n >= 1) r.b0 = beg[0], r.e0 = end[0];
  if (n >= 2) r.b1 = beg[1], r.e1 = end[1];
  return r;
}

// Sum / max over the 8 consecutive lanes that share a tile row (a fixed butterfly: deterministic).
__device__ inline float sum8(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}
__device__ inline float max8(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  return x;
}

// rows x D elements of X (row i at X + (row0 + i) * row_stride, D contiguous) into f32 shared memory
// dst[i * ld + d]; rows at or past n_rows are zero.
template <class T>
__device__ inline void load_tile(float* dst, int ld, const T* X, int64_t row0, int64_t n_rows, int64_t row_stride,
                                 int D, int rows) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int i = idx / D, d = idx - i * D;
    const int64_t row = row0 + i;
    dst[i * ld + d] = row < n_rows ? to_f(X[row * row_stride + d]) : 0.0f;
  }
}

// ---- forward: the online softmax step shared by both kernels ----

// One key tile of one row (this thread's 4 scores s[i] of keys k0 + l8 + 8 i): masks, updates the
// running max m and sum l, rescales acc by exp(m_old - m_new) and returns the probabilities in p.
template <int NJ>
__device__ __forceinline__ void online_softmax_step(float s[4], const RowRanges& rr, int64_t k0, int64_t tk, int l8,
                                           float scale, float& m, float& l, float acc[NJ], float p[4]) {
  bool ok[4];
  float mt = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t kk = k0 + l8 + 8 * i;
    ok[i] = kk < tk && rr.allows(kk);
    s[i] = ok[i] ? s[i] * scale : -INFINITY;
    mt = fmaxf(mt, s[i]);
  }
  mt = max8(mt);
  const float mn = fmaxf(m, mt);
  // m == -inf: nothing accumulated yet (acc and l are 0), so any finite factor will do.
  const float alpha = (m == -INFINITY) ? 0.0f : expf(m - mn);
  float ps = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    p[i] = ok[i] ? expf(s[i] - mn) : 0.0f;
    ps += p[i];
  }
  ps = sum8(ps);
  l = l * alpha + ps;
  m = mn;
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j] *= alpha;
}

// ---- forward, scalar (f32 FMA) ----

// Shared: Q [kBQ][D+1], K and V [kBK][D+1], P [kBQ][kPS] (f32). Thread (r, l8) owns row r's scores of
// keys l8 + 8 i and its output columns l8 + 8 j.
template <class T, int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
               float* __restrict__ lse, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int D,
               const DeviceMask* masks, int64_t n_masks, float scale) {
  constexpr int NJ = DMAX / 8;
  extern __shared__ float smem[];
  const int ld = D + 1;
  float* Qs = smem;
  float* Ks = Qs + kBQ * ld;
  float* Vs = Ks + kBK * ld;
  float* Ps = Vs + kBK * ld;
  const int64_t n_qt = (Tq + kBQ - 1) / kBQ;
  const int64_t qt = n_qt - 1 - int64_t(blockIdx.x);  // latest rows first: with causal masks they work most
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, r = tid / 8, l8 = tid % 8;
  const int64_t q0 = qt * kBQ, qi = q0 + r;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const RowRanges rr = row_ranges(m, qi, Tq, Tk);

  load_tile(Qs, ld, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  float acc[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
  float mrow = -INFINITY, lrow = 0.0f;
  const T* kb = k + (b * Tk * Hkv + hk) * D;
  const T* vb = v + (b * Tk * Hkv + hk) * D;
  for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
    // The vote is also the barrier that ends the previous tile's reads of Ks, Vs and Ps.
    if (!__syncthreads_or(rr.meets(k0, k0 + kBK))) continue;
    load_tile(Ks, ld, kb, k0, Tk, Hkv * D, D, kBK);
    load_tile(Vs, ld, vb, k0, Tk, Hkv * D, D, kBK);
    __syncthreads();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* qr = Qs + r * ld;
    for (int d = 0; d < D; ++d) {
      const float x = qr[d];
#pragma unroll
      for (int i = 0; i < 4; ++i) s[i] = fmaf(x, Ks[(l8 + 8 * i) * ld + d], s[i]);
    }
    float p[4];
    online_softmax_step<NJ>(s, rr, k0, Tk, l8, scale, mrow, lrow, acc, p);
#pragma unroll
    for (int i = 0; i < 4; ++i) Ps[r * kPS + l8 + 8 * i] = p[i];
    __syncthreads();
    for (int c = 0; c < kBK; ++c) {
      const float pc = Ps[r * kPS + c];
      const float* vr = Vs + c * ld;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        if (l8 + 8 * j < D) acc[j] = fmaf(pc, vr[l8 + 8 * j], acc[j]);
    }
  }
  if (qi < Tq) {
    // Every row has at least one allowed key (the rules guarantee it), so lrow > 0.
    const float inv = 1.0f / lrow;
    T* orow = o + ((b * Tq + qi) * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (l8 + 8 * j < D) orow[l8 + 8 * j] = from_f<T>(acc[j] * inv);
    if (l8 == 0) lse[(b * Hq + h) * Tq + qi] = mrow + logf(lrow);
  }
}

size_t fwd_smem_bytes(int D) { return sizeof(float) * (size_t(kBQ + 2 * kBK) * (D + 1) + size_t(kBQ) * kPS); }

// ---- forward, tensor cores (bf16, D % 16 == 0) ----
//
// Same tiles, thread mapping and softmax as the scalar kernel; the operands stay bf16 in shared memory
// and the 8 warps compute S = Q K^T (4 warps, one 16x16 quarter each) and the tile's P V (8 warps over
// the [32][D] output, 16x16 blocks) with wmma, f32 accumulation. The running output stays in the
// threads' registers as in the scalar kernel: each tile's P V goes through an f32 shared buffer.
namespace wmma = nvcuda::wmma;

// rows x D bf16 elements of X (row i at X + (row0 + i) * stride) into dst[i * ldh + d]; rows past n_rows
// are zero.
__device__ inline void load_tile_h(__nv_bfloat16* dst, int ldh, const __nv_bfloat16* X, int64_t row0, int64_t n_rows,
                                   int64_t stride, int D, int rows) {
  const __nv_bfloat16 zero = __float2bfloat16_rn(0.0f);
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int i = idx / D, d = idx - i * D;
    const int64_t row = row0 + i;
    dst[i * ldh + d] = row < n_rows ? X[row * stride + d] : zero;
  }
}

template <int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_fwd_wmma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, float* __restrict__ lse,
                    int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int D, const DeviceMask* masks,
                    int64_t n_masks, float scale) {
  constexpr int NJ = DMAX / 8;
  extern __shared__ __align__(32) unsigned char smem_raw[];
  // bf16 operands with row stride ldh = D + 8 (a multiple of 8 elements as wmma requires; the skew
  // spreads the rows over the banks), then f32 S [kBQ][kBK + 4] and PV [kBQ][D + 4].
  const int ldh = D + 8, lds = kBK + 4, ldo = D + 4;
  __nv_bfloat16* Qh = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* Kh = Qh + kBQ * ldh;
  __nv_bfloat16* Vh = Kh + kBK * ldh;
  __nv_bfloat16* Ph = Vh + kBK * ldh;  // [kBQ][kBK + 8] bf16 probabilities
  const int ldp = kBK + 8;
  float* Sf = reinterpret_cast<float*>(Ph + kBQ * ldp);
  float* Of = Sf + kBQ * lds;
  const int64_t n_qt = (Tq + kBQ - 1) / kBQ;
  const int64_t qt = n_qt - 1 - int64_t(blockIdx.x);
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, r = tid / 8, l8 = tid % 8, warp = tid / 32;
  const int64_t q0 = qt * kBQ, qi = q0 + r;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const RowRanges rr = row_ranges(m, qi, Tq, Tk);

  load_tile_h(Qh, ldh, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  float acc[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
  float mrow = -INFINITY, lrow = 0.0f;
  const __nv_bfloat16* kb = k + (b * Tk * Hkv + hk) * D;
  const __nv_bfloat16* vb = v + (b * Tk * Hkv + hk) * D;
  for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
    if (!__syncthreads_or(rr.meets(k0, k0 + kBK))) continue;
    load_tile_h(Kh, ldh, kb, k0, Tk, Hkv * D, D, kBK);
    load_tile_h(Vh, ldh, vb, k0, Tk, Hkv * D, D, kBK);
    __syncthreads();
    if (warp < 4) {  // S quarter (wr, wc): rows 16 wr.., keys 16 wc..
      const int wr = warp / 2, wc = warp % 2;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.0f);
      for (int d = 0; d < D; d += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bf;  // K^T: K row-major
        wmma::load_matrix_sync(af, Qh + (16 * wr) * ldh + d, ldh);
        wmma::load_matrix_sync(bf, Kh + (16 * wc) * ldh + d, ldh);
        wmma::mma_sync(sf, af, bf, sf);
      }
      wmma::store_matrix_sync(Sf + (16 * wr) * lds + 16 * wc, sf, lds, wmma::mem_row_major);
    }
    __syncthreads();
    float s[4], p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] = Sf[r * lds + l8 + 8 * i];
    online_softmax_step<NJ>(s, rr, k0, Tk, l8, scale, mrow, lrow, acc, p);
#pragma unroll
    for (int i = 0; i < 4; ++i) Ph[r * ldp + l8 + 8 * i] = __float2bfloat16_rn(p[i]);
    __syncthreads();
    // PV [32][D]: 2 x (D / 16) blocks of 16x16 over the 8 warps.
    for (int blk = warp; blk < 2 * (D / 16); blk += kThreads / 32) {
      const int br = blk % 2, bc = blk / 2;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::fill_fragment(of, 0.0f);
      for (int c = 0; c < kBK; c += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bf;
        wmma::load_matrix_sync(af, Ph + (16 * br) * ldp + c, ldp);
        wmma::load_matrix_sync(bf, Vh + c * ldh + 16 * bc, ldh);
        wmma::mma_sync(of, af, bf, of);
      }
      wmma::store_matrix_sync(Of + (16 * br) * ldo + 16 * bc, of, ldo, wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (l8 + 8 * j < D) acc[j] += Of[r * ldo + l8 + 8 * j];
  }
  if (qi < Tq) {
    const float inv = 1.0f / lrow;
    __nv_bfloat16* orow = o + ((b * Tq + qi) * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (l8 + 8 * j < D) orow[l8 + 8 * j] = __float2bfloat16_rn(acc[j] * inv);
    if (l8 == 0) lse[(b * Hq + h) * Tq + qi] = mrow + logf(lrow);
  }
}

size_t fwd_wmma_smem_bytes(int D) {
  return sizeof(__nv_bfloat16) * (size_t(kBQ + 2 * kBK) * (D + 8) + size_t(kBQ) * (kBK + 8)) +
         sizeof(float) * (size_t(kBQ) * (kBK + 4) + size_t(kBQ) * (D + 4));
}

// ---- backward ----

// delta[b, h, t] = sum_d dout * o of each row (one warp per row, a fixed shuffle tree).
template <class T>
__global__ void k_attn_row_terms(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                                 int64_t rows, int64_t Tq, int64_t Hq, int D) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s = fmaf(to_f(dout[row * D + d]), to_f(o[row * D + d]), s);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      const int64_t h = row % Hq, t = (row / Hq) % Tq, b = row / (Hq * Tq);
      delta[(b * Hq + h) * Tq + t] = s;
    }
  }
}

// dq of one query tile: loops over key tiles in order. Shared: Q, dO [kBQ][D+1], K, V [kBK][D+1],
// dS [kBQ][kPS]. Thread (r, l8) as in the forward.
template <class T, int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const float* __restrict__ lse, const T* __restrict__ dout, const float* __restrict__ delta,
                  T* __restrict__ dq, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int D, const DeviceMask* masks,
                  int64_t n_masks, float scale) {
  constexpr int NJ = DMAX / 8;
  extern __shared__ float smem[];
  const int ld = D + 1;
  float* Qs = smem;
  float* dOs = Qs + kBQ * ld;
  float* Ks = dOs + kBQ * ld;
  float* Vs = Ks + kBK * ld;
  float* dSs = Vs + kBK * ld;
  const int64_t n_qt = (Tq + kBQ - 1) / kBQ;
  const int64_t qt = n_qt - 1 - int64_t(blockIdx.x);
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, r = tid / 8, l8 = tid % 8;
  const int64_t q0 = qt * kBQ, qi = q0 + r;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const RowRanges rr = row_ranges(m, qi, Tq, Tk);
  const float lse_r = qi < Tq ? lse[(b * Hq + h) * Tq + qi] : 0.0f;
  const float delta_r = qi < Tq ? delta[(b * Hq + h) * Tq + qi] : 0.0f;

  load_tile(Qs, ld, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  load_tile(dOs, ld, dout + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  float acc[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
  const T* kb = k + (b * Tk * Hkv + hk) * D;
  const T* vb = v + (b * Tk * Hkv + hk) * D;
  for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
    if (!__syncthreads_or(rr.meets(k0, k0 + kBK))) continue;
    load_tile(Ks, ld, kb, k0, Tk, Hkv * D, D, kBK);
    load_tile(Vs, ld, vb, k0, Tk, Hkv * D, D, kBK);
    __syncthreads();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* qr = Qs + r * ld;
    const float* dor = dOs + r * ld;
    for (int d = 0; d < D; ++d) {
      const float x = qr[d], y = dor[d];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[i] = fmaf(x, Ks[(l8 + 8 * i) * ld + d], s[i]);
        dp[i] = fmaf(y, Vs[(l8 + 8 * i) * ld + d], dp[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t kk = k0 + l8 + 8 * i;
      const bool ok = kk < Tk && rr.allows(kk);
      const float p = ok ? expf(s[i] * scale - lse_r) : 0.0f;
      dSs[r * kPS + l8 + 8 * i] = ok ? p * (dp[i] - delta_r) : 0.0f;
    }
    __syncthreads();
    for (int c = 0; c < kBK; ++c) {
      const float ds = dSs[r * kPS + c];
      const float* kr = Ks + c * ld;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
        if (l8 + 8 * j < D) acc[j] = fmaf(ds, kr[l8 + 8 * j], acc[j]);
    }
  }
  if (qi < Tq) {
    T* g = dq + ((b * Tq + qi) * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (l8 + 8 * j < D) g[l8 + 8 * j] = from_f<T>(scale * acc[j]);
  }
}

size_t bwd_dq_smem_bytes(int D) { return sizeof(float) * (size_t(2 * kBQ + 2 * kBK) * (D + 1) + size_t(kBQ) * kPS); }

// dk, dv of one key tile of one kv head: loops over the group's query heads, then the query tiles, in
// order. Thread (c, l8), c = tid / 8, owns key c's output columns l8 + 8 j and the scores of query rows
// l8 + 8 i. Shared: K, V [kBK][D+1], Q, dO [kBQ][D+1], P^T and dS^T [kBK][kPS], and the query rows'
// ranges, lse and delta.
template <class T, int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_bwd_dkv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const float* __restrict__ lse, const T* __restrict__ dout, const float* __restrict__ delta,
                   T* __restrict__ dk, T* __restrict__ dv, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int D,
                   const DeviceMask* masks, int64_t n_masks, float scale) {
  constexpr int NJ = DMAX / 8;
  extern __shared__ float smem[];
  __shared__ RowRanges rng[kBQ];
  __shared__ float lse_s[kBQ], delta_s[kBQ];
  const int ld = D + 1;
  float* Ks = smem;
  float* Vs = Ks + kBK * ld;
  float* Qs = Vs + kBK * ld;
  float* dOs = Qs + kBQ * ld;
  float* PT = dOs + kBQ * ld;
  float* dST = PT + kBK * kPS;
  const int64_t hk = blockIdx.y, b = blockIdx.z, G = Hq / Hkv;
  const int64_t k0 = int64_t(blockIdx.x) * kBK, k1 = k0 + kBK;
  const int tid = threadIdx.x, c = tid / 8, l8 = tid % 8;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];

  load_tile(Ks, ld, k + (b * Tk * Hkv + hk) * D, k0, Tk, Hkv * D, D, kBK);
  load_tile(Vs, ld, v + (b * Tk * Hkv + hk) * D, k0, Tk, Hkv * D, D, kBK);
  float ak[NJ], av[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) ak[j] = av[j] = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t q0 = 0; q0 < Tq; q0 += kBQ) {
      // rng, lse_s and delta_s were last read before the previous tile's middle barrier.
      bool meets = false;
      if (tid < kBQ) {
        const int64_t qq = q0 + tid;
        const RowRanges rr = row_ranges(m, qq, Tq, Tk);
        rng[tid] = rr;
        meets = rr.meets(k0, k1);
        lse_s[tid] = qq < Tq ? lse[(b * Hq + h) * Tq + qq] : 0.0f;
        delta_s[tid] = qq < Tq ? delta[(b * Hq + h) * Tq + qq] : 0.0f;
      }
      if (!__syncthreads_or(meets)) continue;
      load_tile(Qs, ld, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
      load_tile(dOs, ld, dout + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
      __syncthreads();
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const float* kr = Ks + c * ld;
      const float* vr = Vs + c * ld;
      for (int d = 0; d < D; ++d) {
        const float x = kr[d], y = vr[d];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[i] = fmaf(Qs[(l8 + 8 * i) * ld + d], x, s[i]);
          dp[i] = fmaf(dOs[(l8 + 8 * i) * ld + d], y, dp[i]);
        }
      }
      const int64_t kk = k0 + c;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qr = l8 + 8 * i;
        const bool ok = q0 + qr < Tq && kk < Tk && rng[qr].allows(kk);
        const float p = ok ? expf(s[i] * scale - lse_s[qr]) : 0.0f;
        PT[c * kPS + qr] = p;
        dST[c * kPS + qr] = ok ? p * (dp[i] - delta_s[qr]) : 0.0f;
      }
      __syncthreads();
      for (int qr = 0; qr < kBQ; ++qr) {
        const float p = PT[c * kPS + qr], ds = dST[c * kPS + qr];
        const float* qrow = Qs + qr * ld;
        const float* dorow = dOs + qr * ld;
#pragma unroll
        for (int j = 0; j < NJ; ++j)
          if (l8 + 8 * j < D) {
            av[j] = fmaf(p, dorow[l8 + 8 * j], av[j]);
            ak[j] = fmaf(ds, qrow[l8 + 8 * j], ak[j]);
          }
      }
    }
  }
  if (k0 + c < Tk) {
    T* gk = dk + ((b * Tk + k0 + c) * Hkv + hk) * D;
    T* gv = dv + ((b * Tk + k0 + c) * Hkv + hk) * D;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (l8 + 8 * j < D) {
        gk[l8 + 8 * j] = from_f<T>(scale * ak[j]);
        gv[l8 + 8 * j] = from_f<T>(av[j]);
      }
  }
}

size_t bwd_dkv_smem_bytes(int D) {
  return sizeof(float) * (size_t(2 * kBK + 2 * kBQ) * (D + 1) + size_t(2 * kBK) * kPS);
}

// ---- backward, tensor cores (bf16, D % 16 == 0) ----
//
// The scalar kernels' tiles and loop orders, with the products on wmma fragments: S = Q K^T and
// dP = dO V^T of a 32x32 tile side by side (warps 0-3 S, 4-7 dP, one 16x16 quarter each), the
// elementwise P and dS by thread (r, l8) as in the scalar kernels, then P and dS as bf16 operands of
// the accumulating products, whose f32 accumulators stay in the warps' fragments across the whole loop
// (2 x D/16 output blocks of 16x16 over the 8 warps: NF = DMAX / 64 fragments per warp and product).

// Warp w < 4: S quarter (w / 2, w % 2) of A B^T into Sf; warp w >= 4: the same quarter of A2 B2^T into
// S2f (A, A2 [32][ldh] row-major, B, B2 [32][ldh] row-major, products over D).
__device__ inline void two_products_nt(const __nv_bfloat16* A, const __nv_bfloat16* B, float* Sf,
                                       const __nv_bfloat16* A2, const __nv_bfloat16* B2, float* S2f, int ldh, int lds,
                                       int D, int warp) {
  const int wr = (warp / 2) % 2, wc = warp % 2;
  const __nv_bfloat16* a = warp < 4 ? A : A2;
  const __nv_bfloat16* bm = warp < 4 ? B : B2;
  float* out = warp < 4 ? Sf : S2f;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
  wmma::fill_fragment(sf, 0.0f);
  for (int d = 0; d < D; d += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bf;
    wmma::load_matrix_sync(af, a + (16 * wr) * ldh + d, ldh);
    wmma::load_matrix_sync(bf, bm + (16 * wc) * ldh + d, ldh);
    wmma::mma_sync(sf, af, bf, sf);
  }
  wmma::store_matrix_sync(out + (16 * wr) * lds + 16 * wc, sf, lds, wmma::mem_row_major);
}

// dq of one query tile (as k_attn_bwd_dq).
template <int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_bwd_dq_wmma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                       const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse,
                       const __nv_bfloat16* __restrict__ dout, const float* __restrict__ delta,
                       __nv_bfloat16* __restrict__ dq, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int D,
                       const DeviceMask* masks, int64_t n_masks, float scale) {
  constexpr int NF = DMAX / 64;
  extern __shared__ __align__(32) unsigned char smem_raw[];
  const int ldh = D + 8, lds = kBK + 4, ldp = kBK + 8, ldo = D + 4;
  __nv_bfloat16* Qh = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* dOh = Qh + kBQ * ldh;
  __nv_bfloat16* Kh = dOh + kBQ * ldh;
  __nv_bfloat16* Vh = Kh + kBK * ldh;
  __nv_bfloat16* dSh = Vh + kBK * ldh;  // [kBQ][ldp]
  float* Sf = reinterpret_cast<float*>(dSh + kBQ * ldp);
  float* dPf = Sf + kBQ * lds;
  float* Of = dPf + kBQ * lds;  // [kBQ][ldo]
  const int64_t n_qt = (Tq + kBQ - 1) / kBQ;
  const int64_t qt = n_qt - 1 - int64_t(blockIdx.x);
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, r = tid / 8, l8 = tid % 8, warp = tid / 32;
  const int64_t q0 = qt * kBQ, qi = q0 + r;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const RowRanges rr = row_ranges(m, qi, Tq, Tk);
  const float lse_r = qi < Tq ? lse[(b * Hq + h) * Tq + qi] : 0.0f;
  const float delta_r = qi < Tq ? delta[(b * Hq + h) * Tq + qi] : 0.0f;
  const int n_blk = 2 * (D / 16);

  load_tile_h(Qh, ldh, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  load_tile_h(dOh, ldh, dout + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.0f);
  const __nv_bfloat16* kb = k + (b * Tk * Hkv + hk) * D;
  const __nv_bfloat16* vb = v + (b * Tk * Hkv + hk) * D;
  for (int64_t k0 = 0; k0 < Tk; k0 += kBK) {
    if (!__syncthreads_or(rr.meets(k0, k0 + kBK))) continue;
    load_tile_h(Kh, ldh, kb, k0, Tk, Hkv * D, D, kBK);
    load_tile_h(Vh, ldh, vb, k0, Tk, Hkv * D, D, kBK);
    __syncthreads();
    two_products_nt(Qh, Kh, Sf, dOh, Vh, dPf, ldh, lds, D, warp);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = l8 + 8 * i;
      const int64_t kk = k0 + col;
      const bool ok = kk < Tk && rr.allows(kk);
      const float p = ok ? expf(Sf[r * lds + col] * scale - lse_r) : 0.0f;
      dSh[r * ldp + col] = __float2bfloat16_rn(ok ? p * (dPf[r * lds + col] - delta_r) : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int blk = warp + 8 * f;
      if (blk < n_blk) {
        const int br = blk % 2, bc = blk / 2;
        for (int c = 0; c < kBK; c += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bf;
          wmma::load_matrix_sync(af, dSh + (16 * br) * ldp + c, ldp);
          wmma::load_matrix_sync(bf, Kh + c * ldh + 16 * bc, ldh);
          wmma::mma_sync(acc[f], af, bf, acc[f]);
        }
      }
    }
  }
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    const int blk = warp + 8 * f;
    if (blk < n_blk)
      wmma::store_matrix_sync(Of + (16 * (blk % 2)) * ldo + 16 * (blk / 2), acc[f], ldo, wmma::mem_row_major);
  }
  __syncthreads();
  if (qi < Tq) {
    __nv_bfloat16* g = dq + ((b * Tq + qi) * Hq + h) * D;
    for (int d = l8; d < D; d += 8) g[d] = __float2bfloat16_rn(scale * Of[r * ldo + d]);
  }
}

size_t bwd_dq_wmma_smem_bytes(int D) {
  return sizeof(__nv_bfloat16) * (size_t(2 * kBQ + 2 * kBK) * (D + 8) + size_t(kBQ) * (kBK + 8)) +
         sizeof(float) * (size_t(2 * kBQ) * (kBK + 4) + size_t(kBQ) * (D + 4));
}

// dk, dv of one key tile (as k_attn_bwd_dkv): dV += P^T dO and dK += dS^T Q with P and dS stored
// [query][key], read as column-major (transposed) left operands.
template <int DMAX>
__global__ void __launch_bounds__(kThreads)
    k_attn_bwd_dkv_wmma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                        const __nv_bfloat16* __restrict__ v, const float* __restrict__ lse,
                        const __nv_bfloat16* __restrict__ dout, const float* __restrict__ delta,
                        __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv, int64_t Tq, int64_t Tk,
                        int64_t Hq, int64_t Hkv, int D, const DeviceMask* masks, int64_t n_masks, float scale) {
  constexpr int NF = DMAX / 64;
  extern __shared__ __align__(32) unsigned char smem_raw[];
  __shared__ RowRanges rng[kBQ];
  __shared__ float lse_s[kBQ], delta_s[kBQ];
  const int ldh = D + 8, lds = kBK + 4, ldp = kBK + 8, ldo = D + 4;
  __nv_bfloat16* Kh = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* Vh = Kh + kBK * ldh;
  __nv_bfloat16* Qh = Vh + kBK * ldh;
  __nv_bfloat16* dOh = Qh + kBQ * ldh;
  __nv_bfloat16* Ph = dOh + kBQ * ldh;  // [kBQ][ldp]: P[query][key]
  __nv_bfloat16* dSh = Ph + kBQ * ldp;
  float* Sf = reinterpret_cast<float*>(dSh + kBQ * ldp);
  float* dPf = Sf + kBQ * lds;
  float* Of = dPf + kBQ * lds;  // [kBK][ldo]
  const int64_t hk = blockIdx.y, b = blockIdx.z, G = Hq / Hkv;
  const int64_t k0 = int64_t(blockIdx.x) * kBK, k1 = k0 + kBK;
  const int tid = threadIdx.x, r = tid / 8, l8 = tid % 8, warp = tid / 32;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const int n_blk = 2 * (D / 16);

  load_tile_h(Kh, ldh, k + (b * Tk * Hkv + hk) * D, k0, Tk, Hkv * D, D, kBK);
  load_tile_h(Vh, ldh, v + (b * Tk * Hkv + hk) * D, k0, Tk, Hkv * D, D, kBK);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> ak[NF], av[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    wmma::fill_fragment(ak[f], 0.0f);
    wmma::fill_fragment(av[f], 0.0f);
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t q0 = 0; q0 < Tq; q0 += kBQ) {
      bool meets = false;
      if (tid < kBQ) {
        const int64_t qq = q0 + tid;
        const RowRanges rq = row_ranges(m, qq, Tq, Tk);
        rng[tid] = rq;
        meets = rq.meets(k0, k1);
        lse_s[tid] = qq < Tq ? lse[(b * Hq + h) * Tq + qq] : 0.0f;
        delta_s[tid] = qq < Tq ? delta[(b * Hq + h) * Tq + qq] : 0.0f;
      }
      if (!__syncthreads_or(meets)) continue;
      load_tile_h(Qh, ldh, q + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
      load_tile_h(dOh, ldh, dout + (b * Tq * Hq + h) * D, q0, Tq, Hq * D, D, kBQ);
      __syncthreads();
      two_products_nt(Qh, Kh, Sf, dOh, Vh, dPf, ldh, lds, D, warp);  // [query][key]
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = l8 + 8 * i;
        const int64_t kk = k0 + col;
        const bool ok = q0 + r < Tq && kk < Tk && rng[r].allows(kk);
        const float p = ok ? expf(Sf[r * lds + col] * scale - lse_s[r]) : 0.0f;
        Ph[r * ldp + col] = __float2bfloat16_rn(p);
        dSh[r * ldp + col] = __float2bfloat16_rn(ok ? p * (dPf[r * lds + col] - delta_s[r]) : 0.0f);
      }
      __syncthreads();
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        const int blk = warp + 8 * f;
        if (blk < n_blk) {
          const int br = blk % 2, bc = blk / 2;  // key rows 16 br.., head-dim columns 16 bc..
          for (int c = 0; c < kBQ; c += 16) {
            // (P^T)(i, j) = P[c + j][16 br + i]: column-major with leading dimension ldp.
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> pt, dst;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> dof, qf;
            wmma::load_matrix_sync(pt, Ph + c * ldp + 16 * br, ldp);
            wmma::load_matrix_sync(dof, dOh + c * ldh + 16 * bc, ldh);
            wmma::mma_sync(av[f], pt, dof, av[f]);
            wmma::load_matrix_sync(dst, dSh + c * ldp + 16 * br, ldp);
            wmma::load_matrix_sync(qf, Qh + c * ldh + 16 * bc, ldh);
            wmma::mma_sync(ak[f], dst, qf, ak[f]);
          }
        }
      }
    }
  }
  // Out through Of: dk (scaled) first, then dv. Thread (c = r, l8) writes key c's columns l8 + 8 j.
  const int64_t kk = k0 + r;
  for (int pass = 0; pass < 2; ++pass) {
    __syncthreads();  // the loop's last reads of the operands, or the previous pass's reads of Of
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int blk = warp + 8 * f;
      if (blk < n_blk) {
        float* dst = Of + (16 * (blk % 2)) * ldo + 16 * (blk / 2);
        if (pass == 0) wmma::store_matrix_sync(dst, ak[f], ldo, wmma::mem_row_major);
        else wmma::store_matrix_sync(dst, av[f], ldo, wmma::mem_row_major);
      }
    }
    __syncthreads();
    if (kk < Tk) {
      __nv_bfloat16* g = (pass == 0 ? dk : dv) + ((b * Tk + kk) * Hkv + hk) * D;
      const float mul = pass == 0 ? scale : 1.0f;
      for (int d = l8; d < D; d += 8) g[d] = __float2bfloat16_rn(mul * Of[r * ldo + d]);
    }
  }
}

size_t bwd_dkv_wmma_smem_bytes(int D) {
  return sizeof(__nv_bfloat16) * (size_t(2 * kBK + 2 * kBQ) * (D + 8) + size_t(2 * kBQ) * (kBK + 8)) +
         sizeof(float) * (size_t(2 * kBQ) * (kBK + 4) + size_t(kBK) * (D + 4));
}

// ---- host dispatch ----

struct Shape4 {
  int64_t B, Tq, Tk, Hq, Hkv, D;
};

void check_shape(const char* fn, const Shape4& s, int64_t n_masks, double scale, DType dt) {
  if (dt != DType::f32 && dt != DType::bf16)
    OPDLM_FAIL(fn, ": dtype ", dtype_name(dt), " is not supported (expected f32 or bf16)");
  if (s.B < 0 || s.Tq < 0 || s.Tk < 0 || s.Hq < 0 || s.D < 0)
    OPDLM_FAIL(fn, ": negative size (B ", s.B, ", Tq ", s.Tq, ", Tk ", s.Tk, ", Hq ", s.Hq, ", D ", s.D, ")");
  if (s.Hkv < 1 || s.Hq % s.Hkv != 0)
    OPDLM_FAIL(fn, ": query heads ", s.Hq, " is not a multiple of kv heads ", s.Hkv, " (expected Hkv >= 1)");
  if (s.D > kMaxD) OPDLM_FAIL(fn, ": head dim ", s.D, " exceeds the supported maximum ", kMaxD);
  if (n_masks != 1 && n_masks != s.B)
    OPDLM_FAIL(fn, ": got ", n_masks, " mask descriptors, expected 1 or B = ", s.B);
  if (!std::isfinite(scale)) OPDLM_FAIL(fn, ": attention scale is ", scale, ", expected a finite number");
  if ((s.Tq + kBQ - 1) / kBQ > 0x7fffffff || (s.Tk + kBK - 1) / kBK > 0x7fffffff || s.Hq > 65535 ||
      s.B > 65535)
    OPDLM_FAIL(fn, ": grid too large (B ", s.B, ", Tq ", s.Tq, ", Tk ", s.Tk, ", Hq ", s.Hq, ")");
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Tensor cores or the scalar kernels. OPDLM_ATTN_SCALAR=1 in the environment forces the scalar kernels
// (read on every call, so the GPU tests and the benchmark compare both paths in one process).
bool use_wmma(DType dt, int64_t D) {
  if (dt != DType::bf16 || D % 16 != 0 || D == 0) return false;
  const char* e = std::getenv("OPDLM_ATTN_SCALAR");
  return !(e && *e && *e != '0');
}

// The mma.sync kernels of attention_fa2.cu where they apply (bf16, D 64 or 128, 16-byte aligned
// tensors), unless OPDLM_ATTN_IMPL=v1 or OPDLM_ATTN_SCALAR=1 (the scalar v1 kernels). Read on every call,
// as OPDLM_ATTN_SCALAR.
bool use_fa2(DType dt, const Shape4& s, std::initializer_list<const void*> ptrs) {
  const char* impl = std::getenv("OPDLM_ATTN_IMPL");
  if (impl && std::strcmp(impl, "v1") == 0) return false;
  if (const char* e = std::getenv("OPDLM_ATTN_SCALAR"); e && *e && *e != '0') return false;
  return fa2::applies(dt, s.D, s.B, s.Tq, s.Tk, s.Hq, s.Hkv, ptrs);
}

template <class T, int DMAX>
void launch_forward(const void* q, const void* k, const void* v, void* o, float* lse, const Shape4& s,
                    const DeviceMask* masks, int64_t n_masks, float scale, bool wmma_path, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((s.Tq + kBQ - 1) / kBQ), static_cast<unsigned>(s.Hq),
                  static_cast<unsigned>(s.B));
  const int D = static_cast<int>(s.D);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (wmma_path) {
      const size_t smem = fwd_wmma_smem_bytes(D);
      set_smem(k_attn_fwd_wmma<DMAX>, smem);
      k_attn_fwd_wmma<DMAX><<<grid, kThreads, smem, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(o), lse,
          s.Tq, s.Tk, s.Hq, s.Hkv, D, masks, n_masks, scale);
      CUDA_CHECK(cudaGetLastError());
      return;
    }
  }
  const size_t smem = fwd_smem_bytes(D);
  set_smem(k_attn_fwd<T, DMAX>, smem);
  k_attn_fwd<T, DMAX><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                        static_cast<const T*>(v), static_cast<T*>(o), lse, s.Tq,
                                                        s.Tk, s.Hq, s.Hkv, D, masks, n_masks, scale);
  CUDA_CHECK(cudaGetLastError());
}

template <class T, int DMAX>
void launch_backward(const void* q, const void* k, const void* v, const void* o, const float* lse, const void* dout,
                     void* dq, void* dk, void* dv, const Shape4& s, const DeviceMask* masks, int64_t n_masks,
                     float scale, float* delta, bool wmma_path, cudaStream_t stream) {
  const int D = static_cast<int>(s.D);
  const T* Q = static_cast<const T*>(q);
  const T* K = static_cast<const T*>(k);
  const T* V = static_cast<const T*>(v);
  const T* dO = static_cast<const T*>(dout);
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if (s.Tq > 0 && s.Hq > 0) {
    const int64_t rows = s.B * s.Tq * s.Hq;
    const int64_t blocks = std::min<int64_t>((rows + 7) / 8, 65535);  // 8 warps (rows) per block
    k_attn_row_terms<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<const T*>(o), dO, delta,
                                                                            rows, s.Tq, s.Hq, D);
    CUDA_CHECK(cudaGetLastError());
    const dim3 grid(static_cast<unsigned>((s.Tq + kBQ - 1) / kBQ), static_cast<unsigned>(s.Hq),
                    static_cast<unsigned>(s.B));
    if (kBf16 && wmma_path) {
      if constexpr (kBf16) {
        const size_t smem = bwd_dq_wmma_smem_bytes(D);
        set_smem(k_attn_bwd_dq_wmma<DMAX>, smem);
        k_attn_bwd_dq_wmma<DMAX><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<T*>(dq),
                                                                   s.Tq, s.Tk, s.Hq, s.Hkv, D, masks, n_masks, scale);
      }
    } else {
      const size_t smem = bwd_dq_smem_bytes(D);
      set_smem(k_attn_bwd_dq<T, DMAX>, smem);
      k_attn_bwd_dq<T, DMAX><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<T*>(dq), s.Tq,
                                                               s.Tk, s.Hq, s.Hkv, D, masks, n_masks, scale);
    }
    CUDA_CHECK(cudaGetLastError());
  }
  if (s.Tk > 0) {  // every key gets dk, dv written (0 where no row sees it, or when Tq == 0)
    const dim3 grid(static_cast<unsigned>((s.Tk + kBK - 1) / kBK), static_cast<unsigned>(s.Hkv),
                    static_cast<unsigned>(s.B));
    if (kBf16 && wmma_path) {
      if constexpr (kBf16) {
        const size_t smem = bwd_dkv_wmma_smem_bytes(D);
        set_smem(k_attn_bwd_dkv_wmma<DMAX>, smem);
        k_attn_bwd_dkv_wmma<DMAX><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<T*>(dk),
                                                                    static_cast<T*>(dv), s.Tq, s.Tk, s.Hq, s.Hkv, D,
                                                                    masks, n_masks, scale);
      }
    } else {
      const size_t smem = bwd_dkv_smem_bytes(D);
      set_smem(k_attn_bwd_dkv<T, DMAX>, smem);
      k_attn_bwd_dkv<T, DMAX><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<T*>(dk),
                                                                static_cast<T*>(dv), s.Tq, s.Tk, s.Hq, s.Hkv, D, masks,
                                                                n_masks, scale);
    }
    CUDA_CHECK(cudaGetLastError());
  }
}

// Calls f.template operator()<T, DMAX>() for the dtype and the smallest register budget that holds D.
template <class F>
void dispatch(DType dt, int64_t D, F&& f) {
  if (dt == DType::f32) {
    if (D <= 64) return f.template operator()<float, 64>();
    if (D <= 128) return f.template operator()<float, 128>();
    return f.template operator()<float, 256>();
  }
  if (D <= 64) return f.template operator()<__nv_bfloat16, 64>();
  if (D <= 128) return f.template operator()<__nv_bfloat16, 128>();
  return f.template operator()<__nv_bfloat16, 256>();
}

}  // namespace

void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse, int64_t B, int64_t Tq,
                       int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks,
                       double scale, DType dt, cudaStream_t stream) {
  const Shape4 s{B, Tq, Tk, Hq, Hkv, D};
  check_shape("cuda::attention_forward", s, n_masks, scale, dt);
  if (B == 0 || Tq == 0 || Hq == 0) return;
  if (D == 0) {  // o is empty; lse = log(number of allowed keys) would need the rules: not a real case
    OPDLM_FAIL("cuda::attention_forward: head dim 0 is not supported");
  }
  if (use_fa2(dt, s, {q, k, v, o})) {
    fa2::forward(q, k, v, o, lse, B, Tq, Tk, Hq, Hkv, D, masks, n_masks, static_cast<float>(scale), stream);
    return;
  }
  const bool wm = use_wmma(dt, D);
  dispatch(dt, D, [&]<class T, int DMAX>() {
    launch_forward<T, DMAX>(q, k, v, o, lse, s, masks, n_masks, static_cast<float>(scale), wm, stream);
  });
}

size_t attention_backward_scratch_bytes(int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D) {
  (void)Tk, (void)Hkv, (void)D;
  // The row terms delta [B, Hq, Tq] (f32). dk and dv accumulate in registers over the group's heads in a
  // fixed order, so they need no scratch.
  return sizeof(float) * static_cast<size_t>(std::max<int64_t>(B * Hq * Tq, 1));
}

void attention_backward(const void* q, const void* k, const void* v, const void* o, const float* lse,
                        const void* dout, void* dq, void* dk, void* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq,
                        int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks, double scale,
                        void* scratch, DType dt, cudaStream_t stream) {
  const Shape4 s{B, Tq, Tk, Hq, Hkv, D};
  check_shape("cuda::attention_backward", s, n_masks, scale, dt);
  if (B == 0 || D == 0) return;
  OPDLM_CHECK(scratch != nullptr || B * Hq * Tq == 0, "cuda::attention_backward: scratch is null");
  if (use_fa2(dt, s, {q, k, v, o, dout, dq, dk, dv})) {
    fa2::backward(q, k, v, o, lse, dout, dq, dk, dv, B, Tq, Tk, Hq, Hkv, D, masks, n_masks,
                  static_cast<float>(scale), static_cast<float*>(scratch), stream);
    return;
  }
  const bool wm = use_wmma(dt, D);
  dispatch(dt, D, [&]<class T, int DMAX>() {
    launch_backward<T, DMAX>(q, k, v, o, lse, dout, dq, dk, dv, s, masks, n_masks, static_cast<float>(scale),
                             static_cast<float*>(scratch), wm, stream);
  });
}

}  // namespace opdlm::cuda
