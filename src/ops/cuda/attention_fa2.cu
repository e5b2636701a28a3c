// Attention "v2" for bf16 with head dim 64 or 128: FlashAttention-2 style kernels on mma.sync
// m16n8k16 (bf16 in, f32 accumulation) with ldmatrix fragments and cp.async tile loads. Same contract
// and semantics as the v1 kernels of attention.cu (which routes here; OPDLM_ATTN_IMPL=v1 forces v1):
// the mask rule per (q, k) pair from ops/mask_rules.hpp, key/query tiles skipped when no pair of the
// tile is allowed, the per-element test only on tiles that are not wholly allowed, GQA, per-row or one
// shared descriptor, Tq != Tk with q_offset, lse in f32 natural log, no float atomics.
//
// Forward: one block of 4 warps per (128 query rows, head, batch row); warp w owns rows 32w..32w+31
// (two m16 tiles, so every K/V fragment feeds two products) and keeps Q fragments, the running max /
// sum and the output accumulators in registers; K and V tiles come through double-buffered shared
// memory (cp.async); P goes from the S accumulator straight into the A operand of P V.
// Backward: a row-term kernel (delta = rowsum(dO * O) into the caller's scratch, as v1), a dK/dV kernel
// per 64-key tile (warp w owns keys 16w..16w+15) looping over the group's query heads and the query
// tiles in a fixed order, and a dQ kernel per 128-row query tile looping over the key tiles in order.
// Every sum has an order fixed by the shape: results are bitwise reproducible.
// H100, B=8 T=1024 Hq=16 Hkv=8 D=128: causal forward 0.24 ms (143 TFLOP/s), backward 0.83 ms (104).
// (An earlier form with 64-row tiles in the forward and dQ kernels was within 10% of this and is gone.)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/ops/cuda/attention_cuda.hpp"
#include "opdlm/ops/mask_rules.hpp"

namespace opdlm::cuda::fa2 {

namespace {

constexpr int kRows = 64;      // query rows per tile of the dK/dV kernel (4 warps x 16)
constexpr int kRows3 = 128;    // query rows per block of the forward and dQ kernels (4 warps x 32)
constexpr int kKeys3 = 32;     // keys per tile of the dQ kernel (its shared memory holds Q and dO of 128 rows)
constexpr int kKeys = 64;      // keys per tile
constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;        // bf16 elements of padding per shared row (16 bytes: ldmatrix rows hit distinct banks)
constexpr float kLog2e = 1.4426950408889634f;

using bf16 = __nv_bfloat16;

// ---- PTX helpers ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes 0 zero-fills the destination (rows past the end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

// c[4] += A (16x16, 4 regs) * B (16x8, 2 regs). Fragment layouts (PTX ISA, m16n8k16): g = lane / 4,
// t = lane % 4; A: a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols), a2 (row g, cols 2t+8..), a3 (row
// g+8, cols 2t+8..); B: b0 (k rows 2t..2t+1, col g), b1 (k rows 2t+8.., col g); C: c0, c1 (row g, cols
// 2t, 2t+1), c2, c3 (row g+8, same cols).
__device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two f32 -> packed bf16x2 (x in the low half: the lower column index), round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16(float x, float y) {
  __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---- mask ranges ----

// Allowed keys of one query row: [b0, e0) and [b1, e1) (second empty for one range); no keys for a row
// outside [0, Tq). int32: the host routes here only when Tq, Tk < 2^31.
struct Rng {
  int b0, e0, b1, e1;
  __device__ __forceinline__ bool allows(int k) const { return (k >= b0 && k < e0) || (k >= b1 && k < e1); }
  __device__ __forceinline__ bool meets(int k0, int k1) const {
    return (b0 < k1 && e0 > k0) || (b1 < k1 && e1 > k0);
  }
  // [k0, k1) (non-empty) lies inside one allowed range.
  __device__ __forceinline__ bool covers(int k0, int k1) const {
    return (k0 >= b0 && k1 <= e0) || (k0 >= b1 && k1 <= e1);
  }
};

__device__ __forceinline__ Rng row_rng(const DeviceMask& m, int q, int tq, int tk) {
  Rng r{0, 0, 0, 0};
  if (q < 0 || q >= tq) return r;
  int64_t beg[2] = {0, 0}, end[2] = {0, 0};
  const int n = ops::mask_ranges(m.kind, m.block_size, m.pad_left, m.prompt_len, m.response_len, m.q_offset, q, tk,
                                 beg, end);
  if (n >= 1) r.b0 = int(beg[0]), r.e0 = int(end[0]);
  if (n >= 2) r.b1 = int(beg[1]), r.e1 = int(end[1]);
  return r;
}

// ---- tile loads ----

// NR (64 unless told) rows x D bf16 of X (row i at X + (row0 + i) * stride) into shared dst (row stride D + kPad) with cp.async;
// rows at or past n_rows are zero-filled. All 128 threads take part.
template <int D, int NR = 64>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* X, int row0, int n_rows, int64_t stride) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < NR * kChunks; idx += kThreads) {
    const int i = idx / kChunks, c = idx % kChunks;
    const int row = row0 + i;
    const bool ok = row < n_rows;
    const bf16* src = ok ? X + int64_t(row) * stride + c * 8 : X;
    cp_async16(dst + i * (D + kPad) + c * 8, src, ok ? 16 : 0);
  }
}

// ---- backward: row terms ----

// delta[b, h, t] = sum_d dout * o (one warp per row of D = 64 or 128, a fixed shuffle tree).
template <int D>
__global__ void k_row_terms(const bf16* __restrict__ o, const bf16* __restrict__ dout, float* __restrict__ delta,
                            int64_t rows, int Tq, int Hq) {
  constexpr int kPer = D / 32;  // 2 or 4 elements per lane
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t at = row * D + lane * kPer + i;
      s = fmaf(__bfloat162float(dout[at]), __bfloat162float(o[at]), s);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      const int64_t h = row % Hq, t = (row / Hq) % Tq, b = row / (int64_t(Hq) * Tq);
      delta[(b * Hq + h) * Tq + t] = s;
    }
  }
}

// ---- backward: dK, dV per key tile ----

// Shared: K, V [64][LD] (this block's keys), Q, dO [2][64][LD] (double-buffered query tiles), and per
// query row of the current tile its ranges, lse (log2 units) and delta. Warp w owns keys 16w..16w+15 and
// accumulates dK, dV in registers over (query head of the group, query tile) in a fixed order.
template <int D>
__global__ void __launch_bounds__(kThreads)
    k_bwd_dkv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
              const float* __restrict__ lse, const bf16* __restrict__ dout, const float* __restrict__ delta,
              bf16* __restrict__ dk, bf16* __restrict__ dv, int Tq, int Tk, int Hq, int Hkv,
              const DeviceMask* __restrict__ masks, int n_masks, float scale) {
  constexpr int LD = D + kPad;
  constexpr int KD = D / 16, ND = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* Vs = Ks + kKeys * LD;
  bf16* Qs = Vs + kKeys * LD;       // [2][64][LD]
  bf16* dOs = Qs + 2 * kRows * LD;  // [2][64][LD]
  __shared__ Rng rng_s[kRows];
  __shared__ float lse_s[kRows], delta_s[kRows];

  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = Hq / Hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int k0 = kt * kKeys, k1 = min(k0 + kKeys, Tk);
  const int kw0 = k0 + warp * 16, kw1 = min(kw0 + 16, Tk);  // this warp's keys (may be empty past Tk)
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const int64_t qstride = int64_t(Hq) * D, kstride = int64_t(Hkv) * D;
  const int n_qt = (Tq + kRows - 1) / kRows;
  const int n_it = group * n_qt;  // iteration it: query head hk * group + it / n_qt, query tile it % n_qt

  // The mask does not depend on the head: a query tile is needed when some row of it meets the block's keys.
  auto next_it = [&](int from) {
    for (int it = from; it < n_it; ++it) {
      const int qq = (it % n_qt) * kRows + (tid % kRows);
      if (__syncthreads_or(row_rng(m, qq, Tq, Tk).meets(k0, k1))) return it;
    }
    return n_it;
  };
  auto load_q_tile = [&](int it, int bf) {
    const int h = hk * group + it / n_qt, q0 = (it % n_qt) * kRows;
    load_rows<D>(Qs + bf * kRows * LD, q + (int64_t(b) * Tq * Hq + h) * D, q0, Tq, qstride);
    load_rows<D>(dOs + bf * kRows * LD, dout + (int64_t(b) * Tq * Hq + h) * D, q0, Tq, qstride);
  };

  load_rows<D>(Ks, k + (int64_t(b) * Tk * Hkv + hk) * D, k0, Tk, kstride);
  load_rows<D>(Vs, v + (int64_t(b) * Tk * Hkv + hk) * D, k0, Tk, kstride);
  int cur = next_it(0);
  if (cur < n_it) load_q_tile(cur, 0);
  cp_async_commit();

  float dka[ND][4], dva[ND][4];
#pragma unroll
  for (int j = 0; j < ND; ++j) {
    dka[j][0] = dka[j][1] = dka[j][2] = dka[j][3] = 0.0f;
    dva[j][0] = dva[j][1] = dva[j][2] = dva[j][3] = 0.0f;
  }
  int buf = 0;
  // A-operand (16 keys x 16 dims) addresses of this warp's K and V rows, and the B-operand bases.
  const int a_row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;
  const int bn_row = (lane % 8) + (lane / 16) * 8, bn_col = ((lane / 8) % 2) * 8;  // non-trans B (Q, dO as [n][k])
  const int bt_row = (lane % 8) + ((lane / 8) % 2) * 8, bt_col = (lane / 16) * 8;  // trans B (Q, dO as [k][n])

  while (cur < n_it) {
    __syncthreads();  // the previous tile's reads of rng_s, lse_s, delta_s and buffer buf ^ 1 are done
    const int nxt = next_it(cur + 1);
    if (nxt < n_it) {
      load_q_tile(nxt, buf ^ 1);
      cp_async_commit();
    }
    const int h = hk * group + cur / n_qt, q0 = (cur % n_qt) * kRows;
    if (tid < kRows) {
      const int qq = q0 + tid;
      rng_s[tid] = row_rng(m, qq, Tq, Tk);
      const int64_t at = (int64_t(b) * Hq + h) * Tq + qq;
      // Rows past Tq: lse +inf makes p = 0 (their Q and dO tiles are zero).
      lse_s[tid] = qq < Tq ? lse[at] * kLog2e : INFINITY;
      delta_s[tid] = qq < Tq ? delta[at] : 0.0f;
    }
    if (nxt < n_it) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();

    // Per warp: any allowed pair, and whether every pair of its keys x the tile's rows is allowed.
    bool any = false, full = true;
    if (kw0 < kw1) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = lane + 32 * i;
        const Rng rr = rng_s[r];
        any = any || rr.meets(kw0, kw1);
        full = full && (q0 + r >= Tq || (kw1 - kw0 == 16 && rr.covers(kw0, kw1)));
      }
    }
    any = __any_sync(0xffffffffu, any);
    full = __all_sync(0xffffffffu, full);
    if (any) {
      const bf16* Qt = Qs + buf * kRows * LD;
      const bf16* dOt = dOs + buf * kRows * LD;
#pragma unroll 1
      for (int half = 0; half < 2; ++half) {  // 32 query rows at a time (register budget)
        const int c0 = half * 32;
        // ---- S^T = K Q^T and dP^T = V dO^T: 16 keys x 32 rows ----
        float st[4][4], dpt[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.0f;
          dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          uint32_t a0, a1, a2, a3;
          ldsm_x4(a0, a1, a2, a3, Ks + a_row * LD + a_col + kk * 16);
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, Qt + (c0 + jj * 16 + bn_row) * LD + bn_col + kk * 16);
            mma16816(st[2 * jj], a0, a1, a2, a3, b0, b1);
            mma16816(st[2 * jj + 1], a0, a1, a2, a3, b2, b3);
          }
          ldsm_x4(a0, a1, a2, a3, Vs + a_row * LD + a_col + kk * 16);
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3, dOt + (c0 + jj * 16 + bn_row) * LD + bn_col + kk * 16);
            mma16816(dpt[2 * jj], a0, a1, a2, a3, b0, b1);
            mma16816(dpt[2 * jj + 1], a0, a1, a2, a3, b2, b3);
          }
        }
        // ---- P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta); rows of the accumulator are keys ----
        const int key_lo = kw0 + g, key_hi = key_lo + 8;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = c0 + 8 * j + 2 * t4 + e;  // query row within the tile
            const float l2 = lse_s[r], dl = delta_s[r];
            float p0 = exp2f(st[j][e] * scale * kLog2e - l2);
            float p1 = exp2f(st[j][2 + e] * scale * kLog2e - l2);
            if (!full) {
              const Rng rr = rng_s[r];
              if (!(key_lo < Tk && rr.allows(key_lo))) p0 = 0.0f;
              if (!(key_hi < Tk && rr.allows(key_hi))) p1 = 0.0f;
            }
            st[j][e] = p0, st[j][2 + e] = p1;
            dpt[j][e] = p0 * (dpt[j][e] - dl);
            dpt[j][2 + e] = p1 * (dpt[j][2 + e] - dl);
          }
        }
        // ---- dV += P^T dO, dK += dS^T Q: A from the accumulators, B = dO / Q tiles as [rows][dims] ----
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {  // 16 query rows per k-step
          const uint32_t p0 = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
          const uint32_t p1 = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
          const uint32_t p2 = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
          const uint32_t p3 = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
          const uint32_t s0 = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
          const uint32_t s1 = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
          const uint32_t s2 = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
          const uint32_t s3 = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
          const int r0 = c0 + kk * 16;
#pragma unroll
          for (int jd = 0; jd < ND / 2; ++jd) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4_t(b0, b1, b2, b3, dOt + (r0 + bt_row) * LD + bt_col + jd * 16);
            mma16816(dva[2 * jd], p0, p1, p2, p3, b0, b1);
            mma16816(dva[2 * jd + 1], p0, p1, p2, p3, b2, b3);
            ldsm_x4_t(b0, b1, b2, b3, Qt + (r0 + bt_row) * LD + bt_col + jd * 16);
            mma16816(dka[2 * jd], s0, s1, s2, s3, b0, b1);
            mma16816(dka[2 * jd + 1], s0, s1, s2, s3, b2, b3);
          }
        }
      }
    }
    cur = nxt;
    buf ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with Ks / Vs: reuse them to stage dK / dV

  // ---- epilogue: dK (times scale) and dV in bf16 through this warp's rows of Ks / Vs ----
  bf16* dKw = Ks + warp * 16 * LD;
  bf16* dVw = Vs + warp * 16 * LD;
#pragma unroll
  for (int j = 0; j < ND; ++j) {
    const int c = 8 * j + 2 * t4;
    *reinterpret_cast<uint32_t*>(dKw + g * LD + c) = pack_bf16(dka[j][0] * scale, dka[j][1] * scale);
    *reinterpret_cast<uint32_t*>(dKw + (g + 8) * LD + c) = pack_bf16(dka[j][2] * scale, dka[j][3] * scale);
    *reinterpret_cast<uint32_t*>(dVw + g * LD + c) = pack_bf16(dva[j][0], dva[j][1]);
    *reinterpret_cast<uint32_t*>(dVw + (g + 8) * LD + c) = pack_bf16(dva[j][2], dva[j][3]);
  }
  __syncwarp();
  bf16* dkb = dk + (int64_t(b) * Tk * Hkv + hk) * D;
  bf16* dvb = dv + (int64_t(b) * Tk * Hkv + hk) * D;
  constexpr int kChunks = D / 8;
  for (int idx = lane; idx < 16 * kChunks; idx += 32) {
    const int i = idx / kChunks, c = idx % kChunks;
    const int key = kw0 + i;
    if (key < Tk) {
      *reinterpret_cast<uint4*>(dkb + int64_t(key) * kstride + c * 8) =
          *reinterpret_cast<const uint4*>(dKw + i * LD + c * 8);
      *reinterpret_cast<uint4*>(dvb + int64_t(key) * kstride + c * 8) =
          *reinterpret_cast<const uint4*>(dVw + i * LD + c * 8);
    }
  }
}

// ---- forward: 128 query rows per block ----

// Shared: Q [128][LD], K, V [2][64][LD] (double-buffered key tiles), the 128 rows' ranges.
template <int D>
__global__ void __launch_bounds__(kThreads, 2)
    k_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, bf16* __restrict__ o,
           float* __restrict__ lse, int Tq, int Tk, int Hq, int Hkv, const DeviceMask* __restrict__ masks,
           int n_masks, float scale) {
  constexpr int LD = D + kPad;
  constexpr int KD = D / 16;  // k-steps over the head dim
  constexpr int ND = D / 8;   // n-tiles over the head dim
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [128][LD]
  bf16* Ks = Qs + kRows3 * LD;                   // [2][64][LD]
  bf16* Vs = Ks + 2 * kKeys * LD;                // [2][64][LD]
  __shared__ Rng rng_s[kRows3];

  const int n_qt = (Tq + kRows3 - 1) / kRows3;
  const int qt = n_qt - 1 - int(blockIdx.x);  // latest rows first: with causal masks they work most
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q0 = qt * kRows3;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const int my_row = q0 + tid;  // the row this thread votes for: one of its warp's 32 rows
  rng_s[tid] = row_rng(m, my_row, Tq, Tk);  // this thread's own entry; other warps read it after a barrier
  const Rng& mine = rng_s[tid];              // read from shared memory where needed (registers are scarce)

  const int64_t qstride = int64_t(Hq) * D, kstride = int64_t(Hkv) * D;
  const bf16* qb = q + (int64_t(b) * Tq * Hq + h) * D;
  const bf16* kb = k + (int64_t(b) * Tk * Hkv + hk) * D;
  const bf16* vb = v + (int64_t(b) * Tk * Hkv + hk) * D;
  const int n_kt = (Tk + kKeys - 1) / kKeys;

  auto next_tile = [&](int from) {
    for (int j = from; j < n_kt; ++j) {
      const int kk0 = j * kKeys, kk1 = min(kk0 + kKeys, Tk);
      if (__syncthreads_or(mine.meets(kk0, kk1))) return j;
    }
    return n_kt;
  };

  load_rows<D, kRows3>(Qs, qb, q0, Tq, qstride);
  int cur = next_tile(0);
  if (cur < n_kt) {
    load_rows<D>(Ks, kb, cur * kKeys, Tk, kstride);
    load_rows<D>(Vs, vb, cur * kKeys, Tk, kstride);
  }
  cp_async_commit();

  float acc[2][ND][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < ND; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;
  // Running max (log2 units of the scaled scores) and sum per m-tile for rows g and g+8.
  float mrun[2][2], lrun[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) mrun[mt][0] = mrun[mt][1] = -INFINITY, lrun[mt][0] = lrun[mt][1] = 0.0f;
  const float sl2 = scale * kLog2e;
  int buf = 0;
  const bf16* qbase = Qs + (warp * 32 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;

  while (cur < n_kt) {
    const int nxt = next_tile(cur + 1);  // its barrier also ends the reads of buffer buf ^ 1
    if (nxt < n_kt) {
      load_rows<D>(Ks + (buf ^ 1) * kKeys * LD, kb, nxt * kKeys, Tk, kstride);
      load_rows<D>(Vs + (buf ^ 1) * kKeys * LD, vb, nxt * kKeys, Tk, kstride);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int k0 = cur * kKeys, k1 = min(k0 + kKeys, Tk);
    const bool any = __any_sync(0xffffffffu, mine.meets(k0, k1));
    // Rows past Tq have no keys: they count as "whole tile allowed" (their results are never stored).
    const bool full = __all_sync(0xffffffffu, my_row >= Tq || (k1 - k0 == kKeys && mine.covers(k0, k1)));
    if (any) {
      const bf16* Kt = Ks + buf * kKeys * LD;
      const bf16* Vt = Vs + buf * kKeys * LD;
      // ---- S = Q K^T (32 rows x 64 keys per warp) ----
      float s[2][8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
      const bf16* kbase = Kt + ((lane % 8) + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t qa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldsm_x4(qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], qbase + mt * 16 * LD + kk * 16);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {  // key n-tiles 2jj and 2jj+1
          uint32_t b0, b1, b2, b3;
          ldsm_x4(b0, b1, b2, b3, kbase + jj * 16 * LD + kk * 16);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(s[mt][2 * jj], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b0, b1);
            mma16816(s[mt][2 * jj + 1], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b2, b3);
          }
        }
      }
      // ---- mask, online softmax (per m-tile) ----
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int lr = warp * 32 + mt * 16 + g;  // local rows lr and lr + 8
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        if (full) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              s[mt][j][e] *= sl2, s[mt][j][2 + e] *= sl2;
              mx_lo = fmaxf(mx_lo, s[mt][j][e]), mx_hi = fmaxf(mx_hi, s[mt][j][2 + e]);
            }
          }
        } else {
          const Rng rlo = rng_s[lr], rhi = rng_s[lr + 8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x0 = s[mt][j][e] * sl2, x1 = s[mt][j][2 + e] * sl2;
              const int kq = k0 + 8 * j + 2 * t4 + e;
              if (!(kq < Tk && rlo.allows(kq))) x0 = -INFINITY;
              if (!(kq < Tk && rhi.allows(kq))) x1 = -INFINITY;
              s[mt][j][e] = x0, s[mt][j][2 + e] = x1;
              mx_lo = fmaxf(mx_lo, x0), mx_hi = fmaxf(mx_hi, x1);
            }
          }
        }
        // The 4 threads of a row (lanes 4g..4g+3) combine with a fixed butterfly.
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float mn_lo = fmaxf(mrun[mt][0], mx_lo), mn_hi = fmaxf(mrun[mt][1], mx_hi);
        // A row with nothing allowed yet keeps max -inf: exponents use 0 instead (every p is then 0).
        const float use_lo = mn_lo == -INFINITY ? 0.0f : mn_lo, use_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
        const float al_lo = exp2f(mrun[mt][0] - use_lo), al_hi = exp2f(mrun[mt][1] - use_hi);  // exp2(-inf) = 0
        mrun[mt][0] = mn_lo, mrun[mt][1] = mn_hi;
        float ps_lo = 0.0f, ps_hi = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          s[mt][j][0] = exp2f(s[mt][j][0] - use_lo);
          s[mt][j][1] = exp2f(s[mt][j][1] - use_lo);
          s[mt][j][2] = exp2f(s[mt][j][2] - use_hi);
          s[mt][j][3] = exp2f(s[mt][j][3] - use_hi);
          ps_lo += s[mt][j][0] + s[mt][j][1];
          ps_hi += s[mt][j][2] + s[mt][j][3];
        }
        ps_lo += __shfl_xor_sync(0xffffffffu, ps_lo, 1);
        ps_lo += __shfl_xor_sync(0xffffffffu, ps_lo, 2);
        ps_hi += __shfl_xor_sync(0xffffffffu, ps_hi, 1);
        ps_hi += __shfl_xor_sync(0xffffffffu, ps_hi, 2);
        lrun[mt][0] = lrun[mt][0] * al_lo + ps_lo;
        lrun[mt][1] = lrun[mt][1] * al_hi + ps_hi;
#pragma unroll
        for (int j = 0; j < ND; ++j) {
          acc[mt][j][0] *= al_lo, acc[mt][j][1] *= al_lo;
          acc[mt][j][2] *= al_hi, acc[mt][j][3] *= al_hi;
        }
      }
      // ---- O += P V: P (bf16) from the S accumulators is the A operand, 16 keys per k-step ----
      const bf16* vbase = Vt + ((lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int jd = 0; jd < ND / 2; ++jd) {  // head-dim n-tiles 2jd and 2jd+1
          uint32_t b0, b1, b2, b3;
          ldsm_x4_t(b0, b1, b2, b3, vbase + kk * 16 * LD + jd * 16);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(acc[mt][2 * jd], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b0, b1);
            mma16816(acc[mt][2 * jd + 1], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b2, b3);
          }
        }
      }
    }
    cur = nxt;
    buf ^= 1;
  }
  cp_async_wait<0>();  // no tile at all (impossible for valid rows): still drain the Q load
  __syncthreads();

  // ---- epilogue: o = acc / l through this warp's own 32 rows of Qs (16-byte stores), lse ----
  bf16* Ow = Qs + warp * 32 * LD;
  float* lb = lse + (int64_t(b) * Hq + h) * Tq;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const float l_lo = lrun[mt][0], l_hi = lrun[mt][1];
    const float inv_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f, inv_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    const int lr = mt * 16 + g;  // within the warp's rows
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      *reinterpret_cast<uint32_t*>(Ow + lr * LD + 8 * j + 2 * t4) =
          pack_bf16(acc[mt][j][0] * inv_lo, acc[mt][j][1] * inv_lo);
      *reinterpret_cast<uint32_t*>(Ow + (lr + 8) * LD + 8 * j + 2 * t4) =
          pack_bf16(acc[mt][j][2] * inv_hi, acc[mt][j][3] * inv_hi);
    }
    if (t4 == 0) {
      // lse = ln(sum exp(s*scale)) = (m2 + log2 l) * ln 2, m2 the running max in log2 units.
      const int r_lo = q0 + warp * 32 + lr, r_hi = r_lo + 8;
      if (r_lo < Tq) lb[r_lo] = (mrun[mt][0] + log2f(l_lo)) * 0.6931471805599453f;
      if (r_hi < Tq) lb[r_hi] = (mrun[mt][1] + log2f(l_hi)) * 0.6931471805599453f;
    }
  }
  __syncwarp();
  bf16* ob = o + (int64_t(b) * Tq * Hq + h) * D;
  constexpr int kChunks = D / 8;
  for (int idx = lane; idx < 32 * kChunks; idx += 32) {
    const int i = idx / kChunks, c = idx % kChunks;
    const int row = q0 + warp * 32 + i;
    if (row < Tq)
      *reinterpret_cast<uint4*>(ob + int64_t(row) * qstride + c * 8) =
          *reinterpret_cast<const uint4*>(Ow + i * LD + c * 8);
  }
}

// ---- backward: dQ per 128-row query tile ----

// Shared: Q, dO [128][LD] (this block's rows), K, V [2][32][LD] (double-buffered 32-key tiles), the 128
// rows' ranges. Warp w owns rows 32w..32w+31 and accumulates dQ over the key tiles in order.
template <int D>
__global__ void __launch_bounds__(kThreads, 2)
    k_bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
              const float* __restrict__ lse, const bf16* __restrict__ dout, const float* __restrict__ delta,
              bf16* __restrict__ dq, int Tq, int Tk, int Hq, int Hkv, const DeviceMask* __restrict__ masks,
              int n_masks, float scale) {
  constexpr int LD = D + kPad;
  constexpr int KD = D / 16, ND = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [128][LD]
  bf16* dOs = Qs + kRows3 * LD;                  // [128][LD]
  bf16* Ks = dOs + kRows3 * LD;                  // [2][32][LD]
  bf16* Vs = Ks + 2 * kKeys3 * LD;               // [2][32][LD]
  __shared__ Rng rng_s[kRows3];

  const int n_qt = (Tq + kRows3 - 1) / kRows3;
  const int qt = n_qt - 1 - int(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q0 = qt * kRows3;
  const DeviceMask m = masks[n_masks == 1 ? 0 : b];
  const int my_row = q0 + tid;
  rng_s[tid] = row_rng(m, my_row, Tq, Tk);  // this thread's own entry; other warps read it after a barrier
  const Rng& mine = rng_s[tid];              // read from shared memory where needed (registers are scarce)
  const int64_t qstride = int64_t(Hq) * D, kstride = int64_t(Hkv) * D;
  const bf16* kb = k + (int64_t(b) * Tk * Hkv + hk) * D;
  const bf16* vb = v + (int64_t(b) * Tk * Hkv + hk) * D;
  const int n_kt = (Tk + kKeys3 - 1) / kKeys3;
  const int64_t row_at = (int64_t(b) * Hq + h) * Tq;
  // Per m-tile, rows g and g+8: lse (log2 units) and delta. Rows past Tq: lse +inf makes p = 0 (their Q
  // and dO are zero, their dQ is not stored).
  float l2[2][2], dl[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = q0 + warp * 32 + mt * 16 + g + 8 * hf;
      l2[mt][hf] = r < Tq ? lse[row_at + r] * kLog2e : INFINITY;
      dl[mt][hf] = r < Tq ? delta[row_at + r] : 0.0f;
    }

  auto next_tile = [&](int from) {
    for (int j = from; j < n_kt; ++j) {
      const int kk0 = j * kKeys3, kk1 = min(kk0 + kKeys3, Tk);
      if (__syncthreads_or(mine.meets(kk0, kk1))) return j;
    }
    return n_kt;
  };

  load_rows<D, kRows3>(Qs, q + (int64_t(b) * Tq * Hq + h) * D, q0, Tq, qstride);
  load_rows<D, kRows3>(dOs, dout + (int64_t(b) * Tq * Hq + h) * D, q0, Tq, qstride);
  int cur = next_tile(0);
  if (cur < n_kt) {
    load_rows<D, kKeys3>(Ks, kb, cur * kKeys3, Tk, kstride);
    load_rows<D, kKeys3>(Vs, vb, cur * kKeys3, Tk, kstride);
  }
  cp_async_commit();

  float dqa[2][ND][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < ND; ++j) dqa[mt][j][0] = dqa[mt][j][1] = dqa[mt][j][2] = dqa[mt][j][3] = 0.0f;
  const float sl2 = scale * kLog2e;
  int buf = 0;
  const int a_row = warp * 32 + (lane % 8) + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;
  const int bn_row = (lane % 8) + (lane / 16) * 8, bn_col = ((lane / 8) % 2) * 8;
  const int bt_row = (lane % 8) + ((lane / 8) % 2) * 8, bt_col = (lane / 16) * 8;

  while (cur < n_kt) {
    const int nxt = next_tile(cur + 1);  // its barrier also ends the reads of buffer buf ^ 1
    if (nxt < n_kt) {
      load_rows<D, kKeys3>(Ks + (buf ^ 1) * kKeys3 * LD, kb, nxt * kKeys3, Tk, kstride);
      load_rows<D, kKeys3>(Vs + (buf ^ 1) * kKeys3 * LD, vb, nxt * kKeys3, Tk, kstride);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int k0 = cur * kKeys3, k1 = min(k0 + kKeys3, Tk);
    const bool any = __any_sync(0xffffffffu, mine.meets(k0, k1));
    const bool full = __all_sync(0xffffffffu, my_row >= Tq || (k1 - k0 == kKeys3 && mine.covers(k0, k1)));
    if (any) {
      const bf16* Kt = Ks + buf * kKeys3 * LD;
      const bf16* Vt = Vs + buf * kKeys3 * LD;
      float s[2][4][4], dp[2][4][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
          dp[mt][j][0] = dp[mt][j][1] = dp[mt][j][2] = dp[mt][j][3] = 0.0f;
        }
      // ---- S = Q K^T, dP = dO V^T: 32 rows x 32 keys per warp ----
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], Qs + (a_row + mt * 16) * LD + a_col + kk * 16);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4(b0, b1, b2, b3, Kt + (jj * 16 + bn_row) * LD + bn_col + kk * 16);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(s[mt][2 * jj], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
            mma16816(s[mt][2 * jj + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
          }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldsm_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], dOs + (a_row + mt * 16) * LD + a_col + kk * 16);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4(b0, b1, b2, b3, Vt + (jj * 16 + bn_row) * LD + bn_col + kk * 16);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(dp[mt][2 * jj], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
            mma16816(dp[mt][2 * jj + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
          }
        }
      }
      // ---- P = exp(S scale - lse), dS = P (dP - delta) ----
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int lr = warp * 32 + mt * 16 + g;
        Rng rlo{0, 0, 0, 0}, rhi{0, 0, 0, 0};
        if (!full) rlo = rng_s[lr], rhi = rng_s[lr + 8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float p0 = exp2f(s[mt][j][e] * sl2 - l2[mt][0]);
            float p1 = exp2f(s[mt][j][2 + e] * sl2 - l2[mt][1]);
            if (!full) {
              const int key = k0 + 8 * j + 2 * t4 + e;
              if (!(key < Tk && rlo.allows(key))) p0 = 0.0f;
              if (!(key < Tk && rhi.allows(key))) p1 = 0.0f;
            }
            dp[mt][j][e] = p0 * (dp[mt][j][e] - dl[mt][0]);
            dp[mt][j][2 + e] = p1 * (dp[mt][j][2 + e] - dl[mt][1]);
          }
        }
      }
      // ---- dQ += dS K: A = dS from the accumulators, B = K tile as [keys][dims] (trans) ----
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          a[mt][0] = pack_bf16(dp[mt][2 * kk][0], dp[mt][2 * kk][1]);
          a[mt][1] = pack_bf16(dp[mt][2 * kk][2], dp[mt][2 * kk][3]);
          a[mt][2] = pack_bf16(dp[mt][2 * kk + 1][0], dp[mt][2 * kk + 1][1]);
          a[mt][3] = pack_bf16(dp[mt][2 * kk + 1][2], dp[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int jd = 0; jd < ND / 2; ++jd) {
          uint32_t b0, b1, b2, b3;
          ldsm_x4_t(b0, b1, b2, b3, Kt + (kk * 16 + bt_row) * LD + bt_col + jd * 16);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816(dqa[mt][2 * jd], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
            mma16816(dqa[mt][2 * jd + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
          }
        }
      }
    }
    cur = nxt;
    buf ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue: dQ (times scale) in bf16 through this warp's 32 rows of Qs ----
  bf16* dQw = Qs + warp * 32 * LD;  // only this warp reads these rows of Qs
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < ND; ++j) {
      const int c = 8 * j + 2 * t4, lr = mt * 16 + g;
      *reinterpret_cast<uint32_t*>(dQw + lr * LD + c) = pack_bf16(dqa[mt][j][0] * scale, dqa[mt][j][1] * scale);
      *reinterpret_cast<uint32_t*>(dQw + (lr + 8) * LD + c) =
          pack_bf16(dqa[mt][j][2] * scale, dqa[mt][j][3] * scale);
    }
  __syncwarp();
  bf16* dqb = dq + (int64_t(b) * Tq * Hq + h) * D;
  constexpr int kChunks = D / 8;
  for (int idx = lane; idx < 32 * kChunks; idx += 32) {
    const int i = idx / kChunks, c = idx % kChunks;
    const int row = q0 + warp * 32 + i;
    if (row < Tq)
      *reinterpret_cast<uint4*>(dqb + int64_t(row) * qstride + c * 8) =
          *reinterpret_cast<const uint4*>(dQw + i * LD + c * 8);
  }
}

template <int D>
constexpr size_t tiles_bytes(int n_tiles) {
  return sizeof(bf16) * size_t(n_tiles) * 64 * (D + kPad);
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int D>
void forward_d(const void* q, const void* k, const void* v, void* o, float* lse, int64_t B, int64_t Tq, int64_t Tk,
                int64_t Hq, int64_t Hkv, const DeviceMask* masks, int64_t n_masks, float scale, cudaStream_t stream) {
  const size_t smem = tiles_bytes<D>(6);  // Q (128 rows) + 2 K + 2 V
  set_smem(k_fwd<D>, smem);
  const dim3 grid(static_cast<unsigned>((Tq + kRows3 - 1) / kRows3), static_cast<unsigned>(Hq),
                  static_cast<unsigned>(B));
  k_fwd<D><<<grid, kThreads, smem, stream>>>(static_cast<const bf16*>(q), static_cast<const bf16*>(k),
                                              static_cast<const bf16*>(v), static_cast<bf16*>(o), lse, int(Tq),
                                              int(Tk), int(Hq), int(Hkv), masks, int(n_masks), scale);
  CUDA_CHECK(cudaGetLastError());
}

// Backward: the row terms, the dK / dV kernel per 64-key tile, the dQ kernel per 128-row query tile.
template <int D>
void backward_d(const void* q, const void* k, const void* v, const void* o, const float* lse, const void* dout,
                 void* dq, void* dk, void* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv,
                 const DeviceMask* masks, int64_t n_masks, float scale, float* delta, cudaStream_t stream) {
  const bf16* Q = static_cast<const bf16*>(q);
  const bf16* K = static_cast<const bf16*>(k);
  const bf16* V = static_cast<const bf16*>(v);
  const bf16* dO = static_cast<const bf16*>(dout);
  if (Tq > 0 && Hq > 0) {
    const int64_t rows = B * Tq * Hq;
    const int64_t blocks = std::min<int64_t>((rows + 7) / 8, 65535);  // 8 warps (rows) per block
    k_row_terms<D><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<const bf16*>(o), dO, delta, rows,
                                                                       int(Tq), int(Hq));
    CUDA_CHECK(cudaGetLastError());
    const size_t smem = tiles_bytes<D>(6);  // Q + dO (128 rows each) + 2 K + 2 V (32 keys each)
    set_smem(k_bwd_dq<D>, smem);
    const dim3 grid(static_cast<unsigned>((Tq + kRows3 - 1) / kRows3), static_cast<unsigned>(Hq),
                    static_cast<unsigned>(B));
    k_bwd_dq<D><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<bf16*>(dq), int(Tq),
                                                   int(Tk), int(Hq), int(Hkv), masks, int(n_masks), scale);
    CUDA_CHECK(cudaGetLastError());
  }
  if (Tk > 0 && Hkv > 0) {  // every key gets dk, dv written (0 where no row sees it, or when Tq == 0)
    const size_t smem = tiles_bytes<D>(6);  // K + V + 2 Q + 2 dO
    set_smem(k_bwd_dkv<D>, smem);
    const dim3 grid(static_cast<unsigned>((Tk + kKeys - 1) / kKeys), static_cast<unsigned>(Hkv),
                    static_cast<unsigned>(B));
    k_bwd_dkv<D><<<grid, kThreads, smem, stream>>>(Q, K, V, lse, dO, delta, static_cast<bf16*>(dk),
                                                   static_cast<bf16*>(dv), int(Tq), int(Tk), int(Hq), int(Hkv), masks,
                                                   int(n_masks), scale);
    CUDA_CHECK(cudaGetLastError());
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

// ---- entry points (declared in attention.cu, which validates shapes first) ----

bool applies(DType dt, int64_t D, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv,
             std::initializer_list<const void*> ptrs) {
  if (dt != DType::bf16 || (D != 64 && D != 128)) return false;
  constexpr int64_t kMax = int64_t(1) << 30;  // int32 indices with headroom
  if (Tq >= kMax || Tk >= kMax || B > 65535 || Hq > 65535 || Hkv > 65535) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;  // cp.async and the 16-byte stores need 16-byte rows
  return true;
}

void forward(const void* q, const void* k, const void* v, void* o, float* lse, int64_t B, int64_t Tq, int64_t Tk,
                int64_t Hq, int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks, float scale,
                cudaStream_t stream) {
  if (B == 0 || Tq == 0 || Hq == 0) return;
  if (D == 64) return forward_d<64>(q, k, v, o, lse, B, Tq, Tk, Hq, Hkv, masks, n_masks, scale, stream);
  return forward_d<128>(q, k, v, o, lse, B, Tq, Tk, Hq, Hkv, masks, n_masks, scale, stream);
}

void backward(const void* q, const void* k, const void* v, const void* o, const float* lse, const void* dout,
                 void* dq, void* dk, void* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D,
                 const DeviceMask* masks, int64_t n_masks, float scale, float* delta, cudaStream_t stream) {
  if (B == 0) return;
  if (D == 64)
    return backward_d<64>(q, k, v, o, lse, dout, dq, dk, dv, B, Tq, Tk, Hq, Hkv, masks, n_masks, scale, delta,
                           stream);
  return backward_d<128>(q, k, v, o, lse, dout, dq, dk, dv, B, Tq, Tk, Hq, Hkv, masks, n_masks, scale, delta,
                          stream);
}

}  // namespace opdlm::cuda::fa2
