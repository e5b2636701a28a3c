// CPU attention (GQA, mask descriptors): forward and backward side by side.
//
// Work is split into tiles: one batch row, one kv head, a run of query positions. The G = Hq/Hkv query
// heads of the group are stacked as the tile's rows (row r = position * G + head), so K and V are read
// once per group. A query row sees at most two contiguous key ranges (MaskDescriptor::ranges), so a tile
// needs only the union of its rows' ranges: those keys become the tile's columns, and keys outside them
// are never touched. Per tile, blocked: S = Q K^T (and dP = dO V^T in the backward) by register-blocked
// micro-kernels (AVX2+FMA for f32 where the CPU has it, portable loops otherwise and for f64), a masked
// row softmax, then O = P V, or dQ = scale dS K and the tile's terms of dK = scale dS^T Q, dV = P^T dO,
// each kMR-row or kMR-column block restricted to the columns or rows that can be non-zero.
//
// Threads take tasks (tile, kv head) in the forward and (group of consecutive tiles, kv head) in the
// backward; a backward task runs its tiles in order into its own dK/dV accumulator, and accumulators
// are summed per key in group order. Tiles and groups depend on the shape and masks only, so results
// are bitwise the same for any thread count.
//
// Within a tile the blocked products multiply masked entries (P = dS = 0) with other rows' queries or
// keys; that is exact for finite values only. A tile whose packed operands hold a NaN or Inf therefore
// runs the per-row loop over each row's allowed keys instead, so a non-finite key still reaches exactly
// the rows allowed to see it.
#include "opdlm/ops/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "simd_avx2.hpp"
#ifdef OPDLM_SIMD_X86
#define OPDLM_ATTN_X86 1
#endif

namespace opdlm::ops {
namespace {
#ifdef OPDLM_ATTN_X86
using simd::exp256;
using simd::hmax256;
using simd::hsum256;
using simd::lanes;
using simd::cpu_has_avx2_fma;
#endif

struct Dims {
  int64_t B, Tq, Tk, Hq, Hkv, D, G;
  // Tiny problems (tests, finite differences) run serially: waking a thread team costs more than
  // the work and, on a busy machine, spinning threads slow every call down.
  bool parallel() const { return B * Hq * Tq * Tk * D >= (int64_t(1) << 16); }
};

// The checks shared by forward and backward; errors name the tensor (or descriptor) and dimension.
Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                  std::span<const MaskDescriptor> masks, double scale) {
  expect_float_cpu(q, "q");
  expect_float_cpu(k, "k");
  expect_float_cpu(v, "v");
  expect_ndim(q, "q", 4);
  expect_ndim(k, "k", 4);
  expect_ndim(v, "v", 4);
  expect_same_dtype(q, "q", k, "k");
  expect_same_dtype(q, "q", v, "v");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 1};
  expect_dim(k, "k", 0, d.B, "batch size of 'q'");
  expect_dim(k, "k", 3, d.D, "head dim of 'q'");
  expect_shape(v, "v", k.shape(), "must match 'k'");
  if (d.Hkv < 1) OPDLM_FAIL("tensor 'k' ", k.describe(), " dimension 2 (kv heads) is ", d.Hkv, ", expected >= 1");
  if (d.Hq % d.Hkv != 0)
    OPDLM_FAIL("tensor 'q' ", q.describe(), " dimension 2 (query heads) is ", d.Hq,
               ", not a multiple of dimension 2 of 'k' (kv heads) ", d.Hkv);
  d.G = d.Hq / d.Hkv;
  if (masks.size() != 1 && static_cast<int64_t>(masks.size()) != d.B)
    OPDLM_FAIL("masks: got ", masks.size(), " descriptors, expected 1 or ", d.B,
               " (dimension 0 of 'q', the batch size)");
  for (size_t i = 0; i < masks.size(); ++i) masks[i].validate(d.Tq, d.Tk, "masks[" + std::to_string(i) + "]");
  if (!std::isfinite(scale)) OPDLM_FAIL("attention scale is ", scale, ", expected a finite number");
  return d;
}

const MaskDescriptor& mask_of(std::span<const MaskDescriptor> masks, int64_t b) {
  return masks[masks.size() == 1 ? 0 : static_cast<size_t>(b)];
}

template <class T>
inline T dotp(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline size_t idx(int64_t i) { return static_cast<size_t>(i); }

// ========================================= tiling =========================================

constexpr int64_t kMR = 4;          // rows of a micro-kernel block
constexpr int64_t kNR = 16;         // key columns per packed panel (S micro-kernel width)
constexpr int64_t kDB = 16;         // head-dim columns per micro-kernel pass (the head dim is padded to it)
constexpr int64_t kTileRows = 128;  // target stacked rows (query positions x G heads) per tile
// Tiles of at most this many stacked rows take the per-row forward (forward_rows_avx2): no packing.
constexpr int64_t kRowPathRows = 4;
constexpr int64_t kRedKeys = 64;    // keys per dK/dV reduction task

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Allowed columns of one query position of a tile: [a0, e0) and [a1, e1) (a1 == e1 == e0: one range).
struct RowCols {
  int64_t a0, e0, a1, e1;
};

// Query positions [i0, i1) of batch row b and the union of their keys as ascending, disjoint intervals;
// the tile's column c holds key iv[u].begin + (c - base[u]) for the interval u containing it.
struct TileGeom {
  int64_t b, i0, i1, n;
  std::vector<KeyRange> iv;
  std::vector<int64_t> base;
};

// About kTileRows stacked rows per tile. The tiling depends on the shape and masks only, never on the
// thread count, so every summation order is fixed.
std::vector<TileGeom> plan_tiles(const Dims& d, std::span<const MaskDescriptor> masks) {
  const int64_t tq = std::max<int64_t>(1, (kTileRows + d.G - 1) / d.G);
  std::vector<TileGeom> tiles;
  std::vector<KeyRange> rs;
  for (int64_t b = 0; b < d.B; ++b) {
    const MaskDescriptor& m = mask_of(masks, b);
    for (int64_t i0 = 0; i0 < d.Tq; i0 += tq) {
      TileGeom g{b, i0, std::min(d.Tq, i0 + tq), 0, {}, {}};
      rs.clear();
      for (int64_t i = g.i0; i < g.i1; ++i) {
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        rs.insert(rs.end(), r, r + nr);
      }
      std::sort(rs.begin(), rs.end(), [](const KeyRange& x, const KeyRange& y) { return x.begin < y.begin; });
      for (const KeyRange& r : rs) {
        if (!g.iv.empty() && r.begin <= g.iv.back().end) g.iv.back().end = std::max(g.iv.back().end, r.end);
        else g.iv.push_back(r);
      }
      for (const KeyRange& r : g.iv) {
        g.base.push_back(g.n);
        g.n += r.end - r.begin;
      }
      tiles.push_back(std::move(g));
    }
  }
  return tiles;
}

// Column of key j, which lies in one of the tile's intervals (every row range does).
int64_t column_of(const TileGeom& g, int64_t j) {
  size_t u = 0;
  while (u + 1 < g.iv.size() && j >= g.iv[u].end) ++u;
  return g.base[u] + (j - g.iv[u].begin);
}

void row_columns(const MaskDescriptor& m, const TileGeom& g, int64_t tk, std::vector<RowCols>& out) {
  out.resize(idx(g.i1 - g.i0));
  for (int64_t i = g.i0; i < g.i1; ++i) {
    KeyRange r[2];
    const int nr = m.ranges(i, tk, r);
    RowCols c;
    c.a0 = column_of(g, r[0].begin);
    c.e0 = c.a0 + (r[0].end - r[0].begin);
    c.a1 = c.e1 = c.e0;
    if (nr == 2) {
      c.a1 = column_of(g, r[1].begin);
      c.e1 = c.a1 + (r[1].end - r[1].begin);
    }
    out[idx(i - g.i0)] = c;
  }
}

// 64-byte aligned scratch that only grows.
template <class T>
struct Buf {
  std::vector<T> v;
  T* get(int64_t n) {
    const size_t need = idx(n) + 64 / sizeof(T);
    if (v.size() < need) v.resize(need);
    const auto p = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
  }
};

// Per-thread scratch, kept across calls (OpenMP reuses its threads): no allocation or page faults
// per call.
template <class T>
struct Scratch {
  Buf<T> qp, dop, kp, vp, kr, vr, s, dp, acc;
  std::vector<RowCols> rc;
};

template <class T>
Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> s;
  return s;
}

// ---- packing; each returns whether every value it read is finite ----

// Rows of the tile's stacked matrix from X [B, Tq, Hq, D] (q or dout): out [Rp, Dp], zero padded.
template <class T>
bool pack_query_rows(const Dims& d, const T* X, const TileGeom& g, int64_t hk, int64_t Rp, int64_t Dp, T* out) {
  const int64_t R = (g.i1 - g.i0) * d.G, D = d.D;
  T zero = 0;  // x * 0 is 0 for finite x, NaN otherwise
  for (int64_t r = 0; r < Rp; ++r) {
    T* o = out + r * Dp;
    if (r < R) {
      const T* src = X + ((g.b * d.Tq + g.i0 + r / d.G) * d.Hq + hk * d.G + r % d.G) * D;
#pragma omp simd reduction(+ : zero)
      for (int64_t e = 0; e < D; ++e) {
        o[e] = src[e];
        zero += src[e] * T(0);
      }
      std::fill(o + D, o + Dp, T(0));
    } else {
      std::fill(o, o + Dp, T(0));
    }
  }
  return zero == T(0);
}

// The tile's key columns of X [B, Tk, Hkv, D] (k or v) as rows: out [Np, Dp], zero padded.
template <class T>
bool pack_key_rows(const Dims& d, const T* X, const TileGeom& g, int64_t hk, int64_t Np, int64_t Dp, T* out) {
  const int64_t D = d.D;
  T zero = 0;
  for (size_t u = 0; u < g.iv.size(); ++u)
    for (int64_t j = g.iv[u].begin; j < g.iv[u].end; ++j) {
      const T* src = X + ((g.b * d.Tk + j) * d.Hkv + hk) * D;
      T* o = out + (g.base[u] + j - g.iv[u].begin) * Dp;
#pragma omp simd reduction(+ : zero)
      for (int64_t e = 0; e < D; ++e) {
        o[e] = src[e];
        zero += src[e] * T(0);
      }
      std::fill(o + D, o + Dp, T(0));
    }
  std::fill(out + g.n * Dp, out + Np * Dp, T(0));
  return zero == T(0);
}

// ---- micro-kernels: portable loops (f64, and f32 on CPUs without AVX2/FMA) ----
//
// panels:  rows [Np][Dp] -> panels [Np/kNR][Dp][kNR] (the S micro-kernel's right operand).
// gemm_nt: C[i][c] = sum_k A[i*lda + k] * B(k, c) for kMR rows i and the columns of panels [p0, p1).
// gemm_nn: C[i*ldc + j] = alpha * sum_{k in [k0, k1)} A[i*sam + k*sak] * B[k*ldb + j] for kMR rows i and
//          j < n (a multiple of kDB). With sam = 1, sak = ld it multiplies by A's transpose.
// row_fwd: one softmax row: s *= scale on the allowed columns, mx = their max, s = exp(s - mx) there and
//          0 on the other columns of [lo, hi); sum = sum of the exps.
// row_bwd: p = exp(s*scale - lse) and ds = p (dp - delta) on the allowed columns (into s and dp), 0 on
//          the others of [0, np).
template <class T>
struct PortableOps {
  static void panels(const T* rows, int64_t Np, int64_t Dp, T* out) {
    for (int64_t p = 0; p < Np / kNR; ++p)
      for (int64_t k = 0; k < Dp; ++k)
        for (int64_t c = 0; c < kNR; ++c) out[(p * Dp + k) * kNR + c] = rows[(p * kNR + c) * Dp + k];
  }
  static void gemm_nt(const T* A, int64_t lda, const T* B, int64_t p0, int64_t p1, int64_t dp, T* C, int64_t ldc) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < kMR; ++i) {
        T acc[kNR] = {};
        for (int64_t k = 0; k < dp; ++k) {
          const T a = A[i * lda + k];
          const T* b = B + (p * dp + k) * kNR;
          for (int64_t c = 0; c < kNR; ++c) acc[c] += a * b[c];
        }
        for (int64_t c = 0; c < kNR; ++c) C[i * ldc + p * kNR + c] = acc[c];
      }
  }
  static void gemm_nn(const T* A, int64_t sam, int64_t sak, int64_t k0, int64_t k1, const T* B, int64_t ldb,
                      int64_t n, T* C, int64_t ldc, T alpha) {
    for (int64_t i = 0; i < kMR; ++i)
      for (int64_t j0 = 0; j0 < n; j0 += kDB) {
        T acc[kDB] = {};
        for (int64_t k = k0; k < k1; ++k) {
          const T a = A[i * sam + k * sak];
          const T* b = B + k * ldb + j0;
          for (int64_t c = 0; c < kDB; ++c) acc[c] += a * b[c];
        }
        for (int64_t c = 0; c < kDB; ++c) C[i * ldc + j0 + c] = alpha * acc[c];
      }
  }
  static void row_fwd(T* s, int64_t lo, int64_t hi, const RowCols& rc, T scale, T* mx, T* sum) {
    const int64_t beg[2] = {rc.a0, rc.a1}, end[2] = {rc.e0, rc.e1};
    T m = -std::numeric_limits<T>::infinity();
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; ++j) {
        s[j] *= scale;
        m = std::max(m, s[j]);
      }
    std::fill(s + lo, s + rc.a0, T(0));
    std::fill(s + rc.e0, s + rc.a1, T(0));
    std::fill(s + rc.e1, s + hi, T(0));
    T z = 0;
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; ++j) {
        s[j] = std::exp(s[j] - m);
        z += s[j];
      }
    *mx = m;
    *sum = z;
  }
  static void row_bwd(T* s, T* dp, int64_t np, const RowCols& rc, T scale, T lse, T delta) {
    const int64_t beg[2] = {rc.a0, rc.a1}, end[2] = {rc.e0, rc.e1};
    const int64_t zb[3] = {0, rc.e0, rc.e1}, ze[3] = {rc.a0, rc.a1, np};
    for (int k = 0; k < 3; ++k) {
      std::fill(s + zb[k], s + ze[k], T(0));
      std::fill(dp + zb[k], dp + ze[k], T(0));
    }
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; ++j) {
        const T p = std::exp(s[j] * scale - lse);
        s[j] = p;
        dp[j] = p * (dp[j] - delta);
      }
  }
};

#ifdef OPDLM_ATTN_X86
struct Avx2Ops {
  OPDLM_AVX2 static void panels(const float* rows, int64_t Np, int64_t Dp, float* out) {
    for (int64_t c0 = 0; c0 < Np; c0 += 8)
      for (int64_t k0 = 0; k0 < Dp; k0 += 8) {  // 8 x 8 transpose: rows c0.., dims k0.. -> dims, columns
        const float* src = rows + c0 * Dp + k0;
        __m256 r0 = _mm256_load_ps(src), r1 = _mm256_load_ps(src + Dp), r2 = _mm256_load_ps(src + 2 * Dp),
               r3 = _mm256_load_ps(src + 3 * Dp), r4 = _mm256_load_ps(src + 4 * Dp),
               r5 = _mm256_load_ps(src + 5 * Dp), r6 = _mm256_load_ps(src + 6 * Dp),
               r7 = _mm256_load_ps(src + 7 * Dp);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                     t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                     t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                     t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                     u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                     u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                     u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
        r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
        r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
        r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
        r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
        r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
        r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
        r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
        float* dst = out + ((c0 / kNR) * Dp + k0) * kNR + c0 % kNR;
        _mm256_store_ps(dst, r0);
        _mm256_store_ps(dst + kNR, r1);
        _mm256_store_ps(dst + 2 * kNR, r2);
        _mm256_store_ps(dst + 3 * kNR, r3);
        _mm256_store_ps(dst + 4 * kNR, r4);
        _mm256_store_ps(dst + 5 * kNR, r5);
        _mm256_store_ps(dst + 6 * kNR, r6);
        _mm256_store_ps(dst + 7 * kNR, r7);
      }
  }

  OPDLM_AVX2 static void gemm_nt(const float* A, int64_t lda, const float* B, int64_t p0, int64_t p1, int64_t dp,
                                 float* C, int64_t ldc) {
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
    for (int64_t p = p0; p < p1; ++p) {
      const float* b = B + p * dp * kNR;
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
             c31 = c00;
      for (int64_t k = 0; k < dp; ++k) {
        const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
        __m256 a = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(a, b0, c00);
        c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(a, b0, c10);
        c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(a, b0, c20);
        c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(a, b0, c30);
        c31 = _mm256_fmadd_ps(a, b1, c31);
      }
      float* c = C + p * kNR;
      _mm256_storeu_ps(c, c00);
      _mm256_storeu_ps(c + 8, c01);
      _mm256_storeu_ps(c + ldc, c10);
      _mm256_storeu_ps(c + ldc + 8, c11);
      _mm256_storeu_ps(c + 2 * ldc, c20);
      _mm256_storeu_ps(c + 2 * ldc + 8, c21);
      _mm256_storeu_ps(c + 3 * ldc, c30);
      _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    }
  }

  OPDLM_AVX2 static void gemm_nn(const float* A, int64_t sam, int64_t sak, int64_t k0, int64_t k1, const float* B,
                                 int64_t ldb, int64_t n, float* C, int64_t ldc, float alpha) {
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t j = 0; j < n; j += kDB) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
             c31 = c00;
      const float* a = A + k0 * sak;
      const float* b = B + k0 * ldb + j;
      for (int64_t k = k0; k < k1; ++k, a += sak, b += ldb) {
        const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        __m256 x = _mm256_broadcast_ss(a);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a + sam);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a + 2 * sam);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a + 3 * sam);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
      }
      float* c = C + j;
      _mm256_storeu_ps(c, _mm256_mul_ps(va, c00));
      _mm256_storeu_ps(c + 8, _mm256_mul_ps(va, c01));
      _mm256_storeu_ps(c + ldc, _mm256_mul_ps(va, c10));
      _mm256_storeu_ps(c + ldc + 8, _mm256_mul_ps(va, c11));
      _mm256_storeu_ps(c + 2 * ldc, _mm256_mul_ps(va, c20));
      _mm256_storeu_ps(c + 2 * ldc + 8, _mm256_mul_ps(va, c21));
      _mm256_storeu_ps(c + 3 * ldc, _mm256_mul_ps(va, c30));
      _mm256_storeu_ps(c + 3 * ldc + 8, _mm256_mul_ps(va, c31));
    }
  }

  OPDLM_AVX2 static void row_fwd(float* s, int64_t lo, int64_t hi, const RowCols& rc, float scale, float* mx,
                                 float* sum) {
    const int64_t beg[2] = {rc.a0, rc.a1}, end[2] = {rc.e0, rc.e1};
    const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 vm = ninf;
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; j += 8) {
        if (end[k] - j >= 8) {
          const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), vs);
          _mm256_storeu_ps(s + j, x);
          vm = _mm256_max_ps(vm, x);
        } else {
          const __m256i msk = lanes(end[k] - j);
          const __m256 x = _mm256_mul_ps(_mm256_maskload_ps(s + j, msk), vs);
          _mm256_maskstore_ps(s + j, msk, x);
          vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(msk)));
        }
      }
    const float m = hmax256(vm);
    const __m256 vmx = _mm256_set1_ps(m);
    __m256 vz = _mm256_setzero_ps();
    std::fill(s + lo, s + rc.a0, 0.f);
    std::fill(s + rc.e0, s + rc.a1, 0.f);
    std::fill(s + rc.e1, s + hi, 0.f);
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; j += 8) {
        if (end[k] - j >= 8) {
          const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vmx));
          _mm256_storeu_ps(s + j, p);
          vz = _mm256_add_ps(vz, p);
        } else {
          const __m256i msk = lanes(end[k] - j);
          const __m256 p = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j, msk), vmx)),
                                         _mm256_castsi256_ps(msk));
          _mm256_maskstore_ps(s + j, msk, p);
          vz = _mm256_add_ps(vz, p);
        }
      }
    *mx = m;
    *sum = hsum256(vz);
  }

  OPDLM_AVX2 static void row_bwd(float* s, float* dp, int64_t np, const RowCols& rc, float scale, float lse,
                                 float delta) {
    const int64_t beg[2] = {rc.a0, rc.a1}, end[2] = {rc.e0, rc.e1};
    const int64_t zb[3] = {0, rc.e0, rc.e1}, ze[3] = {rc.a0, rc.a1, np};
    for (int k = 0; k < 3; ++k) {
      std::fill(s + zb[k], s + ze[k], 0.f);
      std::fill(dp + zb[k], dp + ze[k], 0.f);
    }
    const __m256 vs = _mm256_set1_ps(scale), vl = _mm256_set1_ps(lse), vd = _mm256_set1_ps(delta);
    for (int k = 0; k < 2; ++k)
      for (int64_t j = beg[k]; j < end[k]; j += 8) {
        if (end[k] - j >= 8) {
          const __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), vs), vl));
          _mm256_storeu_ps(s + j, p);
          _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd)));
        } else {
          const __m256i msk = lanes(end[k] - j);
          const __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(s + j, msk), vs), vl));
          _mm256_maskstore_ps(s + j, msk, p);
          _mm256_maskstore_ps(dp + j, msk, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_maskload_ps(dp + j, msk), vd)));
        }
      }
  }
};

// The per-row forward (forward_rows) vectorised, for tiles of at most kRowPathRows stacked rows (AR
// decoding: one query position times the group's heads). There the blocked path's packing of the
// tile's keys and values costs as much as the products themselves; here each row reads its allowed
// keys and values in place. Block-diffusion tiles (4 positions x G heads) stay on the blocked path,
// which measured faster for them. Non-finite values only reach the rows allowed to see them, as in
// forward_rows.
OPDLM_AVX2 inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), acc);
  if (e < n) {
    const __m256i m = lanes(n - e);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + e, m), _mm256_maskload_ps(b + e, m), acc);
  }
  return hsum256(acc);
}

OPDLM_AVX2 void forward_rows_avx2(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, float scale,
                                  const float* Q, const float* K, const float* V, float* O, float* LSE, float* sc,
                                  float* acc) {
  const int64_t D = d.D, ks = d.Hkv * D;
  const float* Kb = K + (g.b * d.Tk * d.Hkv + hk) * D;
  const float* Vb = V + (g.b * d.Tk * d.Hkv + hk) * D;
  const __m256i tail = lanes(D % 8);
  const int64_t D8 = D - D % 8;
  for (int64_t i = g.i0; i < g.i1; ++i) {
    KeyRange r[2];
    const int nr = m.ranges(i, d.Tk, r);
    for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
      const int64_t row = (g.b * d.Tq + i) * d.Hq + h;
      const float* qp = Q + row * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int ri = 0; ri < nr; ++ri)
        for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
          sc[j] = dot_avx2(qp, Kb + j * ks, D) * scale;
          mx = std::max(mx, sc[j]);
        }
      const __m256 vmx = _mm256_set1_ps(mx);
      __m256 vsum = _mm256_setzero_ps();
      for (int ri = 0; ri < nr; ++ri) {
        int64_t j = r[ri].begin;
        for (; j + 8 <= r[ri].end; j += 8) {
          const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx));
          _mm256_storeu_ps(sc + j, p);
          vsum = _mm256_add_ps(vsum, p);
        }
        if (j < r[ri].end) {
          const __m256i msk = lanes(r[ri].end - j);
          const __m256 p = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(sc + j, msk), vmx)),
                                         _mm256_castsi256_ps(msk));
          _mm256_maskstore_ps(sc + j, msk, p);
          vsum = _mm256_add_ps(vsum, p);
        }
      }
      std::fill(acc, acc + D, 0.0f);
      for (int ri = 0; ri < nr; ++ri)
        for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
          const __m256 p = _mm256_set1_ps(sc[j]);
          const float* vp = Vb + j * ks;
          int64_t e = 0;
          for (; e < D8; e += 8)
            _mm256_storeu_ps(acc + e, _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + e), _mm256_loadu_ps(acc + e)));
          if (e < D)
            _mm256_maskstore_ps(acc + e, tail,
                                _mm256_fmadd_ps(p, _mm256_maskload_ps(vp + e, tail), _mm256_maskload_ps(acc + e, tail)));
        }
      // Every row has >= 1 key and its max term is exp(0) = 1, so sum >= 1.
      const float sum = hsum256(vsum), inv = 1.0f / sum;
      float* op = O + row * D;
      for (int64_t e = 0; e < D; ++e) op[e] = acc[e] * inv;
      LSE[(g.b * d.Hq + h) * d.Tq + i] = mx + std::log(sum);
    }
  }
}

#endif  // OPDLM_ATTN_X86

// ================================= per-row path (non-finite tiles) =================================

// Accumulation happens in T itself: double for f64, float for f32 (max-subtracted softmax).
template <class T>
void forward_rows(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                  const T* K, const T* V, T* O, T* LSE, T* sc, T* acc) {
  const int64_t D = d.D, ks = d.Hkv * D;  // ks: stride between consecutive keys of one head
  const T* Kb = K + (g.b * d.Tk * d.Hkv + hk) * D;
  const T* Vb = V + (g.b * d.Tk * d.Hkv + hk) * D;
  for (int64_t i = g.i0; i < g.i1; ++i) {
    KeyRange r[2];
    const int nr = m.ranges(i, d.Tk, r);
    for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
      const int64_t row = (g.b * d.Tq + i) * d.Hq + h;
      const T* qp = Q + row * D;
      T mx = -std::numeric_limits<T>::infinity();
      for (int ri = 0; ri < nr; ++ri)
        for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
          sc[j] = dotp(qp, Kb + j * ks, D) * scale;
          mx = std::max(mx, sc[j]);
        }
      std::fill(acc, acc + D, T(0));
      T sum = 0;
      for (int ri = 0; ri < nr; ++ri)
        for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
          const T p = std::exp(sc[j] - mx);
          sum += p;
          axpy(acc, p, Vb + j * ks, D);
        }
      const T inv = T(1) / sum;
      T* op = O + row * D;
      for (int64_t e = 0; e < D; ++e) op[e] = acc[e] * inv;
      LSE[(g.b * d.Hq + h) * d.Tq + i] = mx + std::log(sum);
    }
  }
}

// Where a tile adds its dk, dv: the rows of key j are gk + (j - k0) * ld and gv + (j - k0) * ld.
template <class T>
struct KeyGrads {
  T *gk, *gv;
  int64_t k0, ld;
  T* k(int64_t j) const { return gk + (j - k0) * ld; }
  T* v(int64_t j) const { return gv + (j - k0) * ld; }
};

// dq rows of the tile, and its terms of dk, dv added to acc, from each row's allowed keys only.
template <class T>
void backward_rows(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                   const T* K, const T* V, const T* O, const T* LSE, const T* dO, T* dQ, const KeyGrads<T>& acc,
                   T* qacc) {
  const int64_t D = d.D, ks = d.Hkv * D;
  const T* Kb = K + (g.b * d.Tk * d.Hkv + hk) * D;
  const T* Vb = V + (g.b * d.Tk * d.Hkv + hk) * D;
  for (int64_t i = g.i0; i < g.i1; ++i) {
    KeyRange r[2];
    const int nr = m.ranges(i, d.Tk, r);
    for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
      const int64_t row = (g.b * d.Tq + i) * d.Hq + h;
      const T* qp = Q + row * D;
      const T* dop = dO + row * D;
      const T dl = dotp(dop, O + row * D, D), l = LSE[(g.b * d.Hq + h) * d.Tq + i];
      std::fill(qacc, qacc + D, T(0));
      for (int ri = 0; ri < nr; ++ri)
        for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
          const T p = std::exp(dotp(qp, Kb + j * ks, D) * scale - l);
          const T ds = p * (dotp(dop, Vb + j * ks, D) - dl);
          axpy(qacc, ds, Kb + j * ks, D);
          axpy(acc.k(j), ds * scale, qp, D);
          axpy(acc.v(j), p, dop, D);
        }
      T* gq = dQ + row * D;
      for (int64_t e = 0; e < D; ++e) gq[e] = qacc[e] * scale;
    }
  }
}

// ======================================= tile kernels =======================================

// Hull of the allowed columns of the real rows of kMR-row block rb.
inline void block_columns(const std::vector<RowCols>& rc, int64_t rb, int64_t R, int64_t G, int64_t* lo,
                          int64_t* hi) {
  *lo = std::numeric_limits<int64_t>::max();
  *hi = 0;
  for (int64_t r = rb * kMR; r < std::min(R, (rb + 1) * kMR); ++r) {
    const RowCols& c = rc[idx(r / G)];
    *lo = std::min(*lo, c.a0);
    *hi = std::max(*hi, c.e1);  // e1 >= e0
  }
}

template <class T, class Ops>
void forward_tile(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                  const T* K, const T* V, T* O, T* LSE, Scratch<T>& sc) {
  const int64_t G = d.G, D = d.D, Dp = round_up(D, kDB), R = (g.i1 - g.i0) * G, Rp = round_up(R, kMR);
  const int64_t Np = round_up(g.n, kNR);
#ifdef OPDLM_ATTN_X86
  if constexpr (std::is_same_v<Ops, Avx2Ops>)
    if (R <= kRowPathRows) return forward_rows_avx2(d, m, g, hk, scale, Q, K, V, O, LSE, sc.s.get(d.Tk), sc.acc.get(D));
#endif
  T* qp = sc.qp.get(Rp * Dp);
  T* kr = sc.kr.get(Np * Dp);
  T* vr = sc.vr.get(Np * Dp);
  // Non-finite queries only reach their own rows here; keys and values could reach other rows.
  pack_query_rows(d, Q, g, hk, Rp, Dp, qp);
  const bool finite = pack_key_rows(d, K, g, hk, Np, Dp, kr) && pack_key_rows(d, V, g, hk, Np, Dp, vr);
  if (!finite)
    return forward_rows(d, m, g, hk, scale, Q, K, V, O, LSE, sc.s.get(d.Tk), sc.acc.get(D));
  row_columns(m, g, d.Tk, sc.rc);
  T* kp = sc.kp.get(Np * Dp);
  T* s = sc.s.get(kMR * Np);
  T* acc = sc.acc.get(kMR * Dp);
  Ops::panels(kr, Np, Dp, kp);
  T mx[kMR], sum[kMR];
  for (int64_t rb = 0; rb < Rp / kMR; ++rb) {
    int64_t lo, hi;
    block_columns(sc.rc, rb, R, G, &lo, &hi);
    Ops::gemm_nt(qp + rb * kMR * Dp, Dp, kp, lo / kNR, (hi + kNR - 1) / kNR, Dp, s, Np);
    const int64_t nr = std::min(kMR, R - rb * kMR);
    for (int64_t i = 0; i < nr; ++i)
      Ops::row_fwd(s + i * Np, lo, hi, sc.rc[idx((rb * kMR + i) / G)], scale, &mx[i], &sum[i]);
    for (int64_t i = nr; i < kMR; ++i) std::fill(s + i * Np + lo, s + i * Np + hi, T(0));
    Ops::gemm_nn(s, Np, 1, lo, hi, vr, Dp, Dp, acc, Dp, T(1));
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rb * kMR + i, pos = g.i0 + r / G, h = hk * G + r % G;
      T* o = O + ((g.b * d.Tq + pos) * d.Hq + h) * D;
      // Every row has >= 1 key and its max term is exp(0) = 1, so sum >= 1.
      const T inv = T(1) / sum[i];
      for (int64_t e = 0; e < D; ++e) o[e] = acc[i * Dp + e] * inv;
      LSE[(g.b * d.Hq + h) * d.Tq + pos] = mx[i] + std::log(sum[i]);
    }
  }
}

// With p = exp(scale q.k - lse), dp = dout.v, delta = dout.o (= sum_k p dp), ds = p (dp - delta):
//   dq = scale sum_k ds k,  dk = scale sum_q ds q,  dv = sum_q p dout.
// Writes the tile's dq rows and adds its terms of dk, dv to acc.
template <class T, class Ops>
void backward_tile(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                   const T* K, const T* V, const T* O, const T* LSE, const T* dO, T* dQ, const KeyGrads<T>& acc,
                   Scratch<T>& sc) {
  const int64_t G = d.G, D = d.D, Dp = round_up(D, kDB), R = (g.i1 - g.i0) * G, Rp = round_up(R, kMR);
  const int64_t Np = round_up(g.n, kNR);
  T* qp = sc.qp.get(Rp * Dp);
  T* dop = sc.dop.get(Rp * Dp);
  T* kr = sc.kr.get(Np * Dp);
  T* vr = sc.vr.get(Np * Dp);
  // Every operand meets other rows or columns in dk and dv.
  bool finite = pack_query_rows(d, Q, g, hk, Rp, Dp, qp);
  finite = pack_query_rows(d, dO, g, hk, Rp, Dp, dop) && finite;
  finite = pack_key_rows(d, K, g, hk, Np, Dp, kr) && finite;
  finite = pack_key_rows(d, V, g, hk, Np, Dp, vr) && finite;
  if (!finite) return backward_rows(d, m, g, hk, scale, Q, K, V, O, LSE, dO, dQ, acc, sc.acc.get(D));
  row_columns(m, g, d.Tk, sc.rc);
  T* kp = sc.kp.get(Np * Dp);
  T* vp = sc.vp.get(Np * Dp);
  T* s = sc.s.get(Rp * Np);
  T* dp = sc.dp.get(Rp * Np);
  T* tmp = sc.acc.get(2 * kMR * Dp);
  Ops::panels(kr, Np, Dp, kp);
  Ops::panels(vr, Np, Dp, vp);
  // P and dS of every row (0 outside its keys), dq per row block.
  for (int64_t rb = 0; rb < Rp / kMR; ++rb) {
    int64_t lo, hi;
    block_columns(sc.rc, rb, R, G, &lo, &hi);
    T* sb = s + rb * kMR * Np;
    T* db = dp + rb * kMR * Np;
    Ops::gemm_nt(qp + rb * kMR * Dp, Dp, kp, lo / kNR, (hi + kNR - 1) / kNR, Dp, sb, Np);
    Ops::gemm_nt(dop + rb * kMR * Dp, Dp, vp, lo / kNR, (hi + kNR - 1) / kNR, Dp, db, Np);
    const int64_t nr = std::min(kMR, R - rb * kMR);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rb * kMR + i, pos = g.i0 + r / G, h = hk * G + r % G;
      const int64_t row = (g.b * d.Tq + pos) * d.Hq + h;
      const T delta = dotp(dO + row * D, O + row * D, D);
      Ops::row_bwd(sb + i * Np, db + i * Np, Np, sc.rc[idx(r / G)], scale, LSE[(g.b * d.Hq + h) * d.Tq + pos],
                   delta);
    }
    for (int64_t i = nr; i < kMR; ++i) {
      std::fill(sb + i * Np, sb + (i + 1) * Np, T(0));
      std::fill(db + i * Np, db + (i + 1) * Np, T(0));
    }
    Ops::gemm_nn(db, Np, 1, lo, hi, kr, Dp, Dp, tmp, Dp, scale);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rb * kMR + i, pos = g.i0 + r / G, h = hk * G + r % G;
      std::copy(tmp + i * Dp, tmp + i * Dp + D, dQ + ((g.b * d.Tq + pos) * d.Hq + h) * D);
    }
  }
  // dk = scale dS^T Q and dv = P^T dO for each block of kMR columns, over the rows that may see it (the
  // first to the last query position with an allowed column in the block), added to the keys' rows.
  const int64_t npos = g.i1 - g.i0;
  size_t u = 0;  // interval of column c0
  for (int64_t c0 = 0; c0 < g.n; c0 += kMR) {
    const int64_t c1 = c0 + kMR;
    int64_t first = npos, last = -1;
    for (int64_t p = 0; p < npos; ++p) {
      const RowCols& c = sc.rc[idx(p)];
      if ((c.a0 < c1 && c.e0 > c0) || (c.a1 < c1 && c.e1 > c0)) {
        first = std::min(first, p);
        last = p;
      }
    }
    if (last < 0) continue;
    Ops::gemm_nn(dp + c0, 1, Np, first * G, (last + 1) * G, qp, Dp, Dp, tmp, Dp, scale);
    Ops::gemm_nn(s + c0, 1, Np, first * G, (last + 1) * G, dop, Dp, Dp, tmp + kMR * Dp, Dp, T(1));
    for (int64_t c = c0; c < std::min(c1, g.n); ++c) {
      while (c >= g.base[u] + (g.iv[u].end - g.iv[u].begin)) ++u;
      const int64_t j = g.iv[u].begin + (c - g.base[u]);
      T* xk = acc.k(j);
      T* xv = acc.v(j);
      const T* tk = tmp + (c - c0) * Dp;
      const T* tv = tmp + (kMR + c - c0) * Dp;
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) {
        xk[e] += tk[e];
        xv[e] += tv[e];
      }
    }
  }
}

// ======================================= drivers =======================================

// Tasks (tile, kv head) as t * Hkv + hk, largest tiles first so dynamic scheduling balances causal shapes.
std::vector<int64_t> task_order(const std::vector<TileGeom>& tiles, int64_t hkv) {
  std::vector<int64_t> order(tiles.size() * idx(hkv));
  for (size_t t = 0; t < order.size(); ++t) order[t] = static_cast<int64_t>(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const TileGeom &a = tiles[idx(x / hkv)], &b = tiles[idx(y / hkv)];
    return a.n * (a.i1 - a.i0) > b.n * (b.i1 - b.i0);
  });
  return order;
}

template <class T, class Ops>
void forward_kernel(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                    const T* V, T* O, T* LSE) {
  const std::vector<TileGeom> tiles = plan_tiles(d, masks);
  const std::vector<int64_t> order = task_order(tiles, d.Hkv);
  const int64_t n_tasks = static_cast<int64_t>(order.size());
#pragma omp parallel if (d.parallel())
  {
    Scratch<T>& sc = thread_scratch<T>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t id = order[idx(task)];
      const TileGeom& g = tiles[idx(id / d.Hkv)];
      forward_tile<T, Ops>(d, mask_of(masks, g.b), g, id % d.Hkv, scale, Q, K, V, O, LSE, sc);
    }
  }
}

// A backward task: tiles [t0, t1) of batch row b (consecutive query positions) for one kv head, run in
// order by one thread, adding dk, dv of keys [k0, k1) (the hull of the tiles' keys) to one accumulator.
struct Group {
  int64_t b, t0, t1, k0, k1, cost;
};

// Each batch row's tiles split into ng groups of about equal work, ng chosen so that there are about
// kMinTasks tasks (group, kv head). With ng = 1 a task owns dk, dv of its (batch row, kv head) and
// writes them in place; otherwise each group has a buffer and the buffers of a key are summed in group
// order afterwards (at most about kGroupBytes of buffers). Either way the order of every sum is fixed by
// the shape alone.
constexpr int64_t kMinTasks = 32;
constexpr int64_t kGroupBytes = int64_t(32) << 20;

std::vector<Group> plan_groups(const Dims& d, const std::vector<TileGeom>& tiles, const std::vector<int64_t>& first,
                               int64_t elem_bytes, int64_t* ng_out) {
  const int64_t per_row = first[1] - first[0];  // every batch row has ceil(Tq / positions) tiles
  const int64_t pairs = d.B * d.Hkv, grads_bytes = pairs * d.Tk * d.D * 2 * elem_bytes;  // dk and dv
  const int64_t ng = std::max<int64_t>(1, std::min({(kMinTasks + pairs - 1) / pairs, per_row,
                                                    kGroupBytes / std::max<int64_t>(grads_bytes, 1)}));
  *ng_out = ng;
  auto cost = [&](int64_t t) { return tiles[idx(t)].n * (tiles[idx(t)].i1 - tiles[idx(t)].i0); };
  std::vector<Group> groups;
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t total = 0;
    for (int64_t t = first[idx(b)]; t < first[idx(b) + 1]; ++t) total += cost(t);
    int64_t t = first[idx(b)], done = 0;
    for (int64_t gi = 0; gi < ng && t < first[idx(b) + 1]; ++gi) {
      Group gr{b, t, t, std::numeric_limits<int64_t>::max(), 0, 0};
      const int64_t target = total * (gi + 1) / ng, left = ng - 1 - gi;  // groups still to fill after this one
      do {
        gr.cost += cost(t);
        done += cost(t);
        ++t;
      } while (t < first[idx(b) + 1] - left && (gi + 1 == ng || done + cost(t) <= target));
      gr.t1 = t;
      for (int64_t x = gr.t0; x < gr.t1; ++x) {
        gr.k0 = std::min(gr.k0, tiles[idx(x)].iv.front().begin);
        gr.k1 = std::max(gr.k1, tiles[idx(x)].iv.back().end);
      }
      groups.push_back(gr);
    }
  }
  return groups;
}

template <class T, class Ops>
void backward_kernel(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                     const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* dK, T* dV) {
  const int64_t D = d.D;
  const std::vector<TileGeom> tiles = plan_tiles(d, masks);
  if (tiles.empty()) {  // no query rows: no key gets a gradient
    std::fill(dK, dK + d.B * d.Tk * d.Hkv * D, T(0));
    std::fill(dV, dV + d.B * d.Tk * d.Hkv * D, T(0));
    return;
  }
  // Tiles are ordered by batch row, then query position: tiles [first[b], first[b + 1]) are row b's.
  std::vector<int64_t> first(idx(d.B) + 1, 0);
  for (const TileGeom& g : tiles) ++first[idx(g.b) + 1];
  for (int64_t b = 0; b < d.B; ++b) first[idx(b) + 1] += first[idx(b)];
  int64_t ng = 1;
  const std::vector<Group> groups = plan_groups(d, tiles, first, sizeof(T), &ng);
  // Tasks gi * Hkv + hk, most work first; with ng > 1 task id's buffer is buf + off[id]: [2][k1 - k0][D].
  const int64_t n_tasks = static_cast<int64_t>(groups.size()) * d.Hkv;
  std::vector<int64_t> order(idx(n_tasks)), off(idx(n_tasks) + 1, 0);
  for (int64_t id = 0; id < n_tasks; ++id) {
    order[idx(id)] = id;
    const Group& gr = groups[idx(id / d.Hkv)];
    off[idx(id) + 1] = off[idx(id)] + (ng > 1 ? 2 * (gr.k1 - gr.k0) * D : 0);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return groups[idx(x / d.Hkv)].cost > groups[idx(y / d.Hkv)].cost; });
  static thread_local Buf<T> group_buf;  // reused across calls, like the scratch
  T* buf = group_buf.get(off.back());
  const int64_t n_kc = (d.Tk + kRedKeys - 1) / kRedKeys, n_red = ng > 1 ? d.B * d.Hkv * n_kc : 0;
#pragma omp parallel if (d.parallel())
  {
    Scratch<T>& sc = thread_scratch<T>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t id = order[idx(task)], hk = id % d.Hkv;
      const Group& gr = groups[idx(id / d.Hkv)];
      KeyGrads<T> acc;
      if (ng == 1) {  // the whole batch row: dk, dv in place (keys no row sees stay 0)
        acc = {dK + (gr.b * d.Tk * d.Hkv + hk) * D, dV + (gr.b * d.Tk * d.Hkv + hk) * D, 0, d.Hkv * D};
        for (int64_t j = 0; j < d.Tk; ++j) {
          std::fill(acc.k(j), acc.k(j) + D, T(0));
          std::fill(acc.v(j), acc.v(j) + D, T(0));
        }
      } else {
        T* p = buf + off[idx(id)];
        acc = {p, p + (gr.k1 - gr.k0) * D, gr.k0, D};
        std::fill(p, p + 2 * (gr.k1 - gr.k0) * D, T(0));
      }
      for (int64_t t = gr.t0; t < gr.t1; ++t) {
        const TileGeom& g = tiles[idx(t)];
        backward_tile<T, Ops>(d, mask_of(masks, g.b), g, hk, scale, Q, K, V, O, LSE, dO, dQ, acc, sc);
      }
    }
    // ng > 1: dk, dv of a key are its batch row's group buffers summed in group order.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_red; ++task) {
      const int64_t kc = task % n_kc, hk = (task / n_kc) % d.Hkv, b = task / (n_kc * d.Hkv);
      const int64_t k0 = kc * kRedKeys, k1 = std::min(d.Tk, k0 + kRedKeys);
      for (int64_t j = k0; j < k1; ++j) {
        T* gk = dK + ((b * d.Tk + j) * d.Hkv + hk) * D;
        T* gv = dV + ((b * d.Tk + j) * d.Hkv + hk) * D;
        std::fill(gk, gk + D, T(0));
        std::fill(gv, gv + D, T(0));
        for (int64_t gi = b * ng; gi < (b + 1) * ng && gi < static_cast<int64_t>(groups.size()); ++gi) {
          const Group& gr = groups[idx(gi)];
          if (gr.b != b || j < gr.k0 || j >= gr.k1) continue;
          const T* pk = buf + off[idx(gi * d.Hkv + hk)] + (j - gr.k0) * D;
          const T* pv = pk + (gr.k1 - gr.k0) * D;
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) {
            gk[e] += pk[e];
            gv[e] += pv[e];
          }
        }
      }
    }
  }
}

template <class T>
void forward_dispatch(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                      const T* V, T* O, T* LSE) {
#ifdef OPDLM_ATTN_X86
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2_fma()) return forward_kernel<float, Avx2Ops>(d, masks, scale, Q, K, V, O, LSE);
#endif
  forward_kernel<T, PortableOps<T>>(d, masks, scale, Q, K, V, O, LSE);
}

template <class T>
void backward_dispatch(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                       const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* dK, T* dV) {
#ifdef OPDLM_ATTN_X86
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2_fma())
      return backward_kernel<float, Avx2Ops>(d, masks, scale, Q, K, V, O, LSE, dO, dQ, dK, dV);
#endif
  backward_kernel<T, PortableOps<T>>(d, masks, scale, Q, K, V, O, LSE, dO, dQ, dK, dV);
}

}  // namespace

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                         std::span<const MaskDescriptor> masks, double scale, Tensor* lse) {
  const Dims d = check_inputs(q, k, v, masks, scale);
  Tensor o = Tensor::empty({d.B, d.Tq, d.Hq, d.D}, q.dtype());
  Tensor lse_local;
  Tensor& l = lse ? *lse : lse_local;
  prepare_output(l, "lse", {d.B, d.Hq, d.Tq}, q.dtype());
  if (q.dtype() == DType::f64)
    forward_dispatch<double>(d, masks, scale, q.data<double>(), k.data<double>(), v.data<double>(),
                             o.data<double>(), l.data<double>());
  else
    forward_dispatch<float>(d, masks, static_cast<float>(scale), q.data<float>(), k.data<float>(),
                            v.data<float>(), o.data<float>(), l.data<float>());
  return o;
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                        const Tensor& lse, const Tensor& dout, std::span<const MaskDescriptor> masks,
                        double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Dims d = check_inputs(q, k, v, masks, scale);
  const Shape qshape{d.B, d.Tq, d.Hq, d.D};
  for (auto [t, name] : {std::pair{&o, "o"}, std::pair{&dout, "dout"}}) {
    expect_float_cpu(*t, name);
    expect_same_dtype(q, "q", *t, name);
    expect_shape(*t, name, qshape, "shape of 'q'");
  }
  expect_float_cpu(lse, "lse");
  expect_same_dtype(q, "q", lse, "lse");
  expect_shape(lse, "lse", {d.B, d.Hq, d.Tq}, "[batch, query heads, Tq] of 'q'");
  prepare_output(dq, "dq", qshape, q.dtype());
  prepare_output(dk, "dk", k.shape(), q.dtype());
  prepare_output(dv, "dv", k.shape(), q.dtype());
  if (q.dtype() == DType::f64)
    backward_dispatch<double>(d, masks, scale, q.data<double>(), k.data<double>(), v.data<double>(),
                              o.data<double>(), lse.data<double>(), dout.data<double>(), dq.data<double>(),
                              dk.data<double>(), dv.data<double>());
  else
    backward_dispatch<float>(d, masks, static_cast<float>(scale), q.data<float>(), k.data<float>(),
                             v.data<float>(), o.data<float>(), lse.data<float>(), dout.data<float>(),
                             dq.data<float>(), dk.data<float>(), dv.data<float>());
}

}  // namespace opdlm::ops
