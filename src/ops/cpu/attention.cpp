// CPU attention (GQA, mask descriptors): forward and backward side by side.
//
// Blocked kernel (every call whose inputs are finite). Work is split into tiles of one batch row, one
// kv head and a run of query positions; the G = Hq/Hkv query heads of the group are stacked as the
// tile's rows (row r = position * G + head), so K and V are read once per group. Each query row may see
// at most two contiguous key ranges (MaskDescriptor::ranges), so a tile needs only the union of its
// rows' ranges: those keys are gathered into the tile's columns and masked work outside them is never
// done. Per tile: S = Q K^T and, in the backward, dP = dO V^T (register-blocked micro-kernels, AVX2+FMA
// for f32 where the CPU has it, plain loops otherwise and for f64), a row-wise masked softmax, then
// O = P V, or dQ = scale dS K and the tile's partial dK = scale dS^T Q, dV = P^T dO. Partials are summed
// per key in tile order afterwards, so every output is bitwise the same for any thread count.
//
// Exact kernel (inputs holding NaN or Inf): the per-row loop over allowed keys. The blocked kernel
// multiplies masked entries (P = 0) with the keys, values, queries or gradients of other rows of its
// tile, which only matters when those are not finite; the exact kernel reads allowed keys only.
#include "opdlm/ops/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OPDLM_ATTN_X86 1
#endif

namespace opdlm::ops {
namespace {

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
bool all_finite(const Tensor& t) {
  const T* p = t.data<T>();
  const int64_t n = t.numel();
  T acc = 0;  // x * 0 is 0 for finite x, NaN for Inf and NaN
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += p[i] * T(0);
  return acc == T(0);
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

// ================================= exact kernel (non-finite inputs) =================================

constexpr int64_t kQTile = 16;  // query rows per forward / dq task
constexpr int64_t kKTile = 32;  // keys per dk/dv task

// Accumulation happens in T itself: double for f64, float for f32 (max-subtracted softmax).
template <class T>
void exact_forward(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q,
                   const T* K, const T* V, T* O, T* LSE) {
  const int64_t D = d.D, ks = d.Hkv * D;  // ks: stride between consecutive keys of one head
  const int64_t n_tiles = (d.Tq + kQTile - 1) / kQTile;
  const int64_t n_tasks = d.B * d.Hq * n_tiles;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> sc(static_cast<size_t>(d.Tk)), acc(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t tile = task % n_tiles, h = (task / n_tiles) % d.Hq, b = task / (n_tiles * d.Hq);
      const MaskDescriptor& m = mask_of(masks, b);
      const T* Kb = K + (b * d.Tk * d.Hkv + h / d.G) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + h / d.G) * D;
      for (int64_t i = tile * kQTile; i < std::min(d.Tq, (tile + 1) * kQTile); ++i) {
        const int64_t row = (b * d.Tq + i) * d.Hq + h;
        const T* qp = Q + row * D;
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        T mx = -std::numeric_limits<T>::infinity();
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            sc[j] = dotp(qp, Kb + j * ks, D) * scale;
            mx = std::max(mx, sc[j]);
          }
        std::fill(acc.begin(), acc.end(), T(0));
        T sum = 0;
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            const T p = std::exp(sc[j] - mx);
            sum += p;
            axpy(acc.data(), p, Vb + j * ks, D);
          }
        // Every row has >= 1 key and its max term is exp(0) = 1, so sum >= 1.
        const T inv = T(1) / sum;
        T* op = O + row * D;
        for (int64_t e = 0; e < D; ++e) op[e] = acc[e] * inv;
        LSE[(b * d.Hq + h) * d.Tq + i] = mx + std::log(sum);
      }
    }
  }
}

// With p = exp(scale q.k - lse), dp = dout.v, delta = dout.o (= sum_k p dp), ds = p (dp - delta):
//   dq = scale sum_k ds k,  dk = scale sum_q ds q,  dv = sum_q p dout.
// Pass A owns dq rows (tasks over query tiles); pass B owns dk/dv rows (tasks over key tiles of one
// kv head, visiting the G query heads of its group), so no two threads write the same element.
template <class T>
void exact_backward(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q,
                    const T* K, const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* dK,
                    T* dV) {
  const int64_t D = d.D, ks = d.Hkv * D;
  std::vector<T> delta(static_cast<size_t>(d.B * d.Hq * d.Tq));

  const int64_t n_qt = (d.Tq + kQTile - 1) / kQTile;
  const int64_t n_a = d.B * d.Hq * n_qt;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> acc(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_a; ++task) {
      const int64_t tile = task % n_qt, h = (task / n_qt) % d.Hq, b = task / (n_qt * d.Hq);
      const MaskDescriptor& m = mask_of(masks, b);
      const T* Kb = K + (b * d.Tk * d.Hkv + h / d.G) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + h / d.G) * D;
      for (int64_t i = tile * kQTile; i < std::min(d.Tq, (tile + 1) * kQTile); ++i) {
        const int64_t row = (b * d.Tq + i) * d.Hq + h, lrow = (b * d.Hq + h) * d.Tq + i;
        const T* qp = Q + row * D;
        const T* dop = dO + row * D;
        const T dl = dotp(dop, O + row * D, D);
        delta[lrow] = dl;
        const T l = LSE[lrow];
        std::fill(acc.begin(), acc.end(), T(0));
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            const T p = std::exp(dotp(qp, Kb + j * ks, D) * scale - l);
            const T ds = p * (dotp(dop, Vb + j * ks, D) - dl);
            axpy(acc.data(), ds, Kb + j * ks, D);
          }
        T* g = dQ + row * D;
        for (int64_t e = 0; e < D; ++e) g[e] = acc[e] * scale;
      }
    }
  }

  const int64_t n_kt = (d.Tk + kKTile - 1) / kKTile;
  const int64_t n_b = d.B * d.Hkv * n_kt;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> acc_k(static_cast<size_t>(kKTile * D)), acc_v(static_cast<size_t>(kKTile * D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_b; ++task) {
      const int64_t tile = task % n_kt, hk = (task / n_kt) % d.Hkv, b = task / (n_kt * d.Hkv);
      const int64_t k0 = tile * kKTile, k1 = std::min(d.Tk, k0 + kKTile);
      const MaskDescriptor& m = mask_of(masks, b);
      const T* Kb = K + (b * d.Tk * d.Hkv + hk) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + hk) * D;
      std::fill(acc_k.begin(), acc_k.end(), T(0));
      std::fill(acc_v.begin(), acc_v.end(), T(0));
      for (int64_t i = 0; i < d.Tq; ++i) {
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        for (int ri = 0; ri < nr; ++ri) {
          const int64_t lo = std::max(r[ri].begin, k0), hi = std::min(r[ri].end, k1);
          if (lo >= hi) continue;
          for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
            const int64_t row = (b * d.Tq + i) * d.Hq + h, lrow = (b * d.Hq + h) * d.Tq + i;
            const T* qp = Q + row * D;
            const T* dop = dO + row * D;
            const T l = LSE[lrow], dl = delta[lrow];
            for (int64_t j = lo; j < hi; ++j) {
              const T p = std::exp(dotp(qp, Kb + j * ks, D) * scale - l);
              const T ds = p * (dotp(dop, Vb + j * ks, D) - dl);
              axpy(acc_v.data() + (j - k0) * D, p, dop, D);
              axpy(acc_k.data() + (j - k0) * D, ds, qp, D);
            }
          }
        }
      }
      for (int64_t j = k0; j < k1; ++j) {
        T* gk = dK + ((b * d.Tk + j) * d.Hkv + hk) * D;
        T* gv = dV + ((b * d.Tk + j) * d.Hkv + hk) * D;
        for (int64_t e = 0; e < D; ++e) {
          gk[e] = acc_k[(j - k0) * D + e] * scale;
          gv[e] = acc_v[(j - k0) * D + e];
        }
      }
    }
  }
}

// ====================================== blocked kernel ======================================

constexpr int64_t kMR = 4;          // rows of a micro-kernel tile
constexpr int64_t kNR = 16;         // key columns of a packed panel (S micro-kernel width)
constexpr int64_t kDB = 16;         // head-dim columns per micro-kernel pass (head dim padded to it)
constexpr int64_t kTileRows = 64;   // target stacked rows (query positions x G heads) per tile
constexpr int64_t kRedKeys = 64;    // keys per dK/dV reduction task

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Allowed columns of one query position in its tile: [a0, e0) and [a1, e1) (a1 == e1 == e0: one range).
struct RowCols {
  int64_t a0, e0, a1, e1;
};

// A tile's query positions [i0, i1) of batch row b and the union of their keys as ascending disjoint
// intervals; the tile's column c is key iv[u].begin + (c - base[u]) for the interval u holding it.
struct TileGeom {
  int64_t b, i0, i1, n;
  std::vector<KeyRange> iv;
  std::vector<int64_t> base;
};

// Query positions per tile: about kTileRows stacked rows. Depends on the shape only, never on the
// thread count, so the tiling (and every summation order) is fixed.
int64_t tile_positions(const Dims& d) { return std::max<int64_t>(1, (kTileRows + d.G - 1) / d.G); }

std::vector<TileGeom> plan_tiles(const Dims& d, std::span<const MaskDescriptor> masks) {
  const int64_t tq = tile_positions(d);
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
        for (int k = 0; k < nr; ++k) rs.push_back(r[k]);
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

// Column of key j (inside one of the tile's intervals).
int64_t column_of(const TileGeom& g, int64_t j) {
  for (size_t u = 0; u < g.iv.size(); ++u)
    if (j >= g.iv[u].begin && j < g.iv[u].end) return g.base[u] + (j - g.iv[u].begin);
  return 0;  // unreachable: every row range lies inside the union
}

void row_columns(const MaskDescriptor& m, const TileGeom& g, int64_t tk, std::vector<RowCols>& out) {
  out.resize(static_cast<size_t>(g.i1 - g.i0));
  for (int64_t i = g.i0; i < g.i1; ++i) {
    KeyRange r[2];
    const int nr = m.ranges(i, tk, r);
    RowCols rc;
    rc.a0 = column_of(g, r[0].begin);
    rc.e0 = rc.a0 + (r[0].end - r[0].begin);
    if (nr == 2) {
      rc.a1 = column_of(g, r[1].begin);
      rc.e1 = rc.a1 + (r[1].end - r[1].begin);
    } else {
      rc.a1 = rc.e1 = rc.e0;
    }
    out[static_cast<size_t>(i - g.i0)] = rc;
  }
}

// 64-byte aligned scratch that only grows; one per thread and dtype, kept across calls.
template <class T>
struct Buf {
  std::vector<T> v;
  T* get(int64_t n) {
    const size_t need = static_cast<size_t>(n) + 64 / sizeof(T);
    if (v.size() < need) v.resize(need);
    const auto p = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
  }
};

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

// Rows of the tile's stacked matrix from X [B, Tq, Hq, D] (q, dout): out [Rp, Dp], zero padded.
template <class T>
void pack_query_rows(const Dims& d, const T* X, const TileGeom& g, int64_t hk, int64_t Rp, int64_t Dp, T* out) {
  const int64_t R = (g.i1 - g.i0) * d.G;
  for (int64_t r = 0; r < Rp; ++r) {
    T* o = out + r * Dp;
    int64_t e = 0;
    if (r < R) {
      const T* src = X + ((g.b * d.Tq + g.i0 + r / d.G) * d.Hq + hk * d.G + r % d.G) * d.D;
      for (; e < d.D; ++e) o[e] = src[e];
    }
    for (; e < Dp; ++e) o[e] = T(0);
  }
}

// The tile's key columns of X [B, Tk, Hkv, D] (k, v): as rows [Np, Dp] and/or as panels of kNR columns
// [Np / kNR][Dp][kNR] (the layout of the S micro-kernel's right operand); zero padded.
template <class T>
void pack_key_columns(const Dims& d, const T* X, const TileGeom& g, int64_t hk, int64_t Np, int64_t Dp,
                      T* rows, T* panels) {
  auto put = [&](int64_t c, const T* src) {
    if (rows) {
      T* o = rows + c * Dp;
      int64_t e = 0;
      if (src)
        for (; e < d.D; ++e) o[e] = src[e];
      for (; e < Dp; ++e) o[e] = T(0);
    }
    if (panels) {
      T* o = panels + (c / kNR) * Dp * kNR + c % kNR;
      int64_t e = 0;
      if (src)
        for (; e < d.D; ++e) o[e * kNR] = src[e];
      for (; e < Dp; ++e) o[e * kNR] = T(0);
    }
  };
  for (size_t u = 0; u < g.iv.size(); ++u)
    for (int64_t j = g.iv[u].begin; j < g.iv[u].end; ++j)
      put(g.base[u] + (j - g.iv[u].begin), X + ((g.b * d.Tk + j) * d.Hkv + hk) * d.D);
  for (int64_t c = g.n; c < Np; ++c) put(c, nullptr);
}

// ---- micro-kernels: portable loops (f64, and f32 on CPUs without AVX2/FMA) ----
//
// gemm_nt: C[i][c] = sum_k A[i*lda + k] * B(k, c) for kMR rows i and the columns of panels [p0, p1) of
//          B (panel p holds columns [p*kNR, (p+1)*kNR) as [dp][kNR]).
// gemm_nn: C[i*ldc + j] = alpha * sum_{k in [k0, k1)} A[i*sam + k*sak] * B[k*ldb + j] for kMR rows i,
//          j < n (a multiple of kDB). With sam = 1, sak = ld it multiplies by A's transpose.
// row_fwd: one softmax row: s *= scale on the allowed columns, mx = their max, s = exp(s - mx) there and
//          0 elsewhere in [lo, hi), sum = sum of the exps.
// row_bwd: p = exp(s*scale - lse), ds = p (dp - delta) on the allowed columns (into s and dp), 0 on the
//          others of [0, np).
template <class T>
struct PortableOps {
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
    T z = 0;
    std::fill(s + lo, s + rc.a0, T(0));
    std::fill(s + rc.e0, s + rc.a1, T(0));
    std::fill(s + rc.e1, s + hi, T(0));
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
#define OPDLM_AVX2 __attribute__((target("avx2,fma")))

// exp for x <= 88 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp);
// 0 below -87.3 (where expf is subnormal).
OPDLM_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

OPDLM_AVX2 inline float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

OPDLM_AVX2 inline float hmax256(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Lanes [0, n) set, 0 <= n <= 8.
OPDLM_AVX2 inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct Avx2Ops {
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
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
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

bool cpu_has_avx2_fma() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#endif  // OPDLM_ATTN_X86

// Range of columns that kMR-row block rb of a tile touches: the hull of its real rows' allowed columns.
inline void block_columns(const std::vector<RowCols>& rc, int64_t rb, int64_t R, int64_t G, int64_t* lo, int64_t* hi) {
  *lo = std::numeric_limits<int64_t>::max();
  *hi = 0;
  for (int64_t r = rb * kMR; r < std::min(R, (rb + 1) * kMR); ++r) {
    const RowCols& c = rc[static_cast<size_t>(r / G)];
    *lo = std::min(*lo, c.a0);
    *hi = std::max(*hi, c.e1);  // e1 >= e0 (e1 == e0 for a one-range row)
  }
}

template <class T, class Ops>
void forward_tile(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                  const T* K, const T* V, T* O, T* LSE, Scratch<T>& sc) {
  const int64_t G = d.G, D = d.D, Dp = round_up(D, kDB), R = (g.i1 - g.i0) * G, Rp = round_up(R, kMR);
  const int64_t Np = round_up(g.n, kNR);
  row_columns(m, g, d.Tk, sc.rc);
  T* qp = sc.qp.get(Rp * Dp);
  T* kp = sc.kp.get(Np * Dp);
  T* vr = sc.vr.get(Np * Dp);
  T* s = sc.s.get(kMR * Np);
  T* acc = sc.acc.get(kMR * Dp);
  pack_query_rows(d, Q, g, hk, Rp, Dp, qp);
  pack_key_columns<T>(d, K, g, hk, Np, Dp, nullptr, kp);
  pack_key_columns<T>(d, V, g, hk, Np, Dp, vr, nullptr);
  T mx[kMR], sum[kMR];
  for (int64_t rb = 0; rb < Rp / kMR; ++rb) {
    int64_t lo, hi;
    block_columns(sc.rc, rb, R, G, &lo, &hi);
    Ops::gemm_nt(qp + rb * kMR * Dp, Dp, kp, lo / kNR, (hi + kNR - 1) / kNR, Dp, s, Np);
    const int64_t nr = std::min(kMR, R - rb * kMR);
    for (int64_t i = 0; i < nr; ++i)
      Ops::row_fwd(s + i * Np, lo, hi, sc.rc[static_cast<size_t>((rb * kMR + i) / G)], scale, &mx[i], &sum[i]);
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

// Writes dq rows of the tile and its partial dk, dv (scaled like the outputs) for its columns into
// part [2][Np][Dp].
template <class T, class Ops>
void backward_tile(const Dims& d, const MaskDescriptor& m, const TileGeom& g, int64_t hk, T scale, const T* Q,
                   const T* K, const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* part,
                   Scratch<T>& sc) {
  const int64_t G = d.G, D = d.D, Dp = round_up(D, kDB), R = (g.i1 - g.i0) * G, Rp = round_up(R, kMR);
  const int64_t Np = round_up(g.n, kNR);
  row_columns(m, g, d.Tk, sc.rc);
  T* qp = sc.qp.get(Rp * Dp);
  T* dop = sc.dop.get(Rp * Dp);
  T* kp = sc.kp.get(Np * Dp);
  T* vp = sc.vp.get(Np * Dp);
  T* kr = sc.kr.get(Np * Dp);
  T* s = sc.s.get(Rp * Np);
  T* dp = sc.dp.get(Rp * Np);
  T* acc = sc.acc.get(kMR * Dp);
  pack_query_rows(d, Q, g, hk, Rp, Dp, qp);
  pack_query_rows(d, dO, g, hk, Rp, Dp, dop);
  pack_key_columns<T>(d, K, g, hk, Np, Dp, kr, kp);
  pack_key_columns<T>(d, V, g, hk, Np, Dp, nullptr, vp);
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
      Ops::row_bwd(sb + i * Np, db + i * Np, Np, sc.rc[static_cast<size_t>(r / G)], scale,
                   LSE[(g.b * d.Hq + h) * d.Tq + pos], delta);
    }
    for (int64_t i = nr; i < kMR; ++i) {
      std::fill(sb + i * Np, sb + (i + 1) * Np, T(0));
      std::fill(db + i * Np, db + (i + 1) * Np, T(0));
    }
    Ops::gemm_nn(db, Np, 1, lo, hi, kr, Dp, Dp, acc, Dp, scale);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rb * kMR + i, pos = g.i0 + r / G, h = hk * G + r % G;
      T* o = dQ + ((g.b * d.Tq + pos) * d.Hq + h) * D;
      for (int64_t e = 0; e < D; ++e) o[e] = acc[i * Dp + e];
    }
  }
  // dk = scale dS^T Q and dv = P^T dO over the rows that see each block of kMR columns.
  T* pk = part;
  T* pv = part + Np * Dp;
  const int64_t npos = g.i1 - g.i0;
  for (int64_t c0 = 0; c0 < Np; c0 += kMR) {
    const int64_t c1 = c0 + kMR;
    int64_t first = npos, last = -1;
    for (int64_t p = 0; p < npos; ++p) {
      const RowCols& c = sc.rc[static_cast<size_t>(p)];
      if ((c.a0 < c1 && c.e0 > c0) || (c.a1 < c1 && c.e1 > c0)) {
        first = std::min(first, p);
        last = p;
      }
    }
    const int64_t r0 = first * G, r1 = (last + 1) * G;  // empty (r0 >= r1) for padding columns
    Ops::gemm_nn(dp + c0, 1, Np, r0, std::max(r0, r1), qp, Dp, Dp, pk + c0 * Dp, Dp, scale);
    Ops::gemm_nn(s + c0, 1, Np, r0, std::max(r0, r1), dop, Dp, Dp, pv + c0 * Dp, Dp, T(1));
  }
}

// Tasks (tile, kv head), largest tiles first so dynamic scheduling balances causal shapes.
std::vector<int64_t> task_order(const std::vector<TileGeom>& tiles, int64_t hkv) {
  std::vector<int64_t> order(tiles.size() * static_cast<size_t>(hkv));
  for (size_t t = 0; t < order.size(); ++t) order[t] = static_cast<int64_t>(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const TileGeom &a = tiles[static_cast<size_t>(x / hkv)], &b = tiles[static_cast<size_t>(y / hkv)];
    return a.n * (a.i1 - a.i0) > b.n * (b.i1 - b.i0);
  });
  return order;
}

template <class T, class Ops>
void blocked_forward(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                     const T* V, T* O, T* LSE) {
  const std::vector<TileGeom> tiles = plan_tiles(d, masks);
  const std::vector<int64_t> order = task_order(tiles, d.Hkv);
  const int64_t n_tasks = static_cast<int64_t>(order.size());
#pragma omp parallel if (d.parallel())
  {
    Scratch<T>& sc = thread_scratch<T>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t t = order[static_cast<size_t>(task)] / d.Hkv, hk = order[static_cast<size_t>(task)] % d.Hkv;
      const TileGeom& g = tiles[static_cast<size_t>(t)];
      forward_tile<T, Ops>(d, mask_of(masks, g.b), g, hk, scale, Q, K, V, O, LSE, sc);
    }
  }
}

template <class T, class Ops>
void blocked_backward(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q, const T* K,
                      const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* dK, T* dV) {
  const std::vector<TileGeom> tiles = plan_tiles(d, masks);
  const std::vector<int64_t> order = task_order(tiles, d.Hkv);
  const int64_t n_tasks = static_cast<int64_t>(order.size()), Dp = round_up(d.D, kDB);
  // Partial dk, dv of task (t, hk) at off[t * Hkv + hk]: [2][Np][Dp].
  std::vector<int64_t> off(order.size() + 1, 0);
  for (size_t t = 0; t < tiles.size(); ++t)
    for (int64_t hk = 0; hk < d.Hkv; ++hk) {
      const size_t i = t * static_cast<size_t>(d.Hkv) + static_cast<size_t>(hk);
      off[i + 1] = off[i] + 2 * round_up(tiles[t].n, kNR) * Dp;
    }
  static thread_local Buf<T> part_buf;  // reused across calls: no page faults on every step
  T* part = part_buf.get(off.back());
  // First tile of each batch row (tiles are ordered by batch row, then query position).
  std::vector<int64_t> first_tile(static_cast<size_t>(d.B) + 1, static_cast<int64_t>(tiles.size()));
  for (int64_t t = static_cast<int64_t>(tiles.size()) - 1; t >= 0; --t)
    first_tile[static_cast<size_t>(tiles[static_cast<size_t>(t)].b)] = t;
  const int64_t n_kc = (d.Tk + kRedKeys - 1) / kRedKeys, n_red = d.B * d.Hkv * n_kc;
#pragma omp parallel if (d.parallel())
  {
    Scratch<T>& sc = thread_scratch<T>();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t id = order[static_cast<size_t>(task)], t = id / d.Hkv, hk = id % d.Hkv;
      const TileGeom& g = tiles[static_cast<size_t>(t)];
      backward_tile<T, Ops>(d, mask_of(masks, g.b), g, hk, scale, Q, K, V, O, LSE, dO, dQ,
                            part + off[static_cast<size_t>(id)], sc);
    }
    // dk, dv of each key: the partials of the tiles of its batch row, summed in tile order.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_red; ++task) {
      const int64_t kc = task % n_kc, hk = (task / n_kc) % d.Hkv, b = task / (n_kc * d.Hkv);
      const int64_t k0 = kc * kRedKeys, k1 = std::min(d.Tk, k0 + kRedKeys);
      T* acc = sc.acc.get(2 * kRedKeys * d.D);
      std::fill(acc, acc + 2 * kRedKeys * d.D, T(0));
      const int64_t t_end = b + 1 < d.B ? first_tile[static_cast<size_t>(b + 1)] : static_cast<int64_t>(tiles.size());
      for (int64_t t = first_tile[static_cast<size_t>(b)]; t < t_end; ++t) {
        const TileGeom& g = tiles[static_cast<size_t>(t)];
        const T* pk = part + off[static_cast<size_t>(t * d.Hkv + hk)];
        const T* pv = pk + round_up(g.n, kNR) * Dp;
        for (size_t u = 0; u < g.iv.size(); ++u) {
          const int64_t lo = std::max(k0, g.iv[u].begin), hi = std::min(k1, g.iv[u].end);
          for (int64_t j = lo; j < hi; ++j) {
            const int64_t c = g.base[u] + (j - g.iv[u].begin);
            T* ak = acc + (j - k0) * d.D;
            T* av = acc + (kRedKeys + j - k0) * d.D;
#pragma omp simd
            for (int64_t e = 0; e < d.D; ++e) {
              ak[e] += pk[c * Dp + e];
              av[e] += pv[c * Dp + e];
            }
          }
        }
      }
      for (int64_t j = k0; j < k1; ++j) {
        const int64_t at = ((b * d.Tk + j) * d.Hkv + hk) * d.D;
        std::copy(acc + (j - k0) * d.D, acc + (j - k0 + 1) * d.D, dK + at);
        std::copy(acc + (kRedKeys + j - k0) * d.D, acc + (kRedKeys + j - k0 + 1) * d.D, dV + at);
      }
    }
  }
}

template <class T>
void forward_dispatch(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const Tensor& q,
                      const Tensor& k, const Tensor& v, T* O, T* LSE) {
  const T *Q = q.data<T>(), *K = k.data<T>(), *V = v.data<T>();
  if (!all_finite<T>(q) || !all_finite<T>(k) || !all_finite<T>(v))
    return exact_forward<T>(d, masks, scale, Q, K, V, O, LSE);
#ifdef OPDLM_ATTN_X86
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2_fma()) return blocked_forward<float, Avx2Ops>(d, masks, scale, Q, K, V, O, LSE);
#endif
  blocked_forward<T, PortableOps<T>>(d, masks, scale, Q, K, V, O, LSE);
}

template <class T>
void backward_dispatch(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const Tensor& q,
                       const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& dout,
                       T* dQ, T* dK, T* dV) {
  const T *Q = q.data<T>(), *K = k.data<T>(), *V = v.data<T>(), *O = o.data<T>(), *L = lse.data<T>(),
          *dO = dout.data<T>();
  if (!all_finite<T>(q) || !all_finite<T>(k) || !all_finite<T>(v) || !all_finite<T>(dout))
    return exact_backward<T>(d, masks, scale, Q, K, V, O, L, dO, dQ, dK, dV);
#ifdef OPDLM_ATTN_X86
  if constexpr (std::is_same_v<T, float>)
    if (cpu_has_avx2_fma()) return blocked_backward<float, Avx2Ops>(d, masks, scale, Q, K, V, O, L, dO, dQ, dK, dV);
#endif
  blocked_backward<T, PortableOps<T>>(d, masks, scale, Q, K, V, O, L, dO, dQ, dK, dV);
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
    forward_dispatch<double>(d, masks, scale, q, k, v, o.data<double>(), l.data<double>());
  else
    forward_dispatch<float>(d, masks, static_cast<float>(scale), q, k, v, o.data<float>(), l.data<float>());
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
    backward_dispatch<double>(d, masks, scale, q, k, v, o, lse, dout, dq.data<double>(), dk.data<double>(),
                              dv.data<double>());
  else
    backward_dispatch<float>(d, masks, static_cast<float>(scale), q, k, v, o, lse, dout, dq.data<float>(),
                             dk.data<float>(), dv.data<float>());
}

}  // namespace opdlm::ops
