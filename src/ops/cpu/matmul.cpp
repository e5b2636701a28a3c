// CPU matmul (2-D, batched, broadcast b) through OpenBLAS cblas_sgemm/cblas_dgemm, a small-row
// kernel for decoding-sized products, and the Linear forward/backward built on them.
#include "opdlm/ops/matmul.hpp"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#include "simd_avx2.hpp"

namespace opdlm::ops {
namespace {

// BLAS reads a and b while it writes c: overlapping storage would give garbage silently.
bool overlaps(const Tensor& x, const Tensor& y) {
  const char* xp = static_cast<const char*>(x.raw_data());
  const char* yp = static_cast<const char*>(y.raw_data());
  return x.nbytes() && y.nbytes() && xp < yp + y.nbytes() && yp < xp + x.nbytes();
}

// BLAS takes int dimensions (OpenBLAS built with 32-bit blasint).
int blas_int(int64_t v, const char* what) {
  if (v > INT_MAX) OPDLM_FAIL("matmul: ", what, " = ", v, " exceeds the BLAS int range");
  return static_cast<int>(v);
}

void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const float* a, int lda, const float* b,
          int ldb, double beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k,
              static_cast<float>(alpha), a, lda, b, ldb, static_cast<float>(beta), c, ldc);
}
void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
          int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k,
              alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---- small-row products (decoding) ---------------------------------------------------------------
// c [m, n] = a [m, k] @ b^T, b [n, k], for a few rows (a decoding step: batch x 1..8 tokens).
// OpenBLAS packs all of b for every such call and splits the work along m, so with 8 rows one thread
// packs and multiplies while the other waits (a profile of AR decoding: 30 % of the wall time in the
// idle thread's spin). Here threads split the output columns and every b row is read once, straight
// from memory, and multiplied with all m rows while it sits in L1. Each output is one thread's dot
// product in a fixed order, so the bits do not depend on the thread count.
constexpr int64_t kSmallRows = 32;

#ifdef OPDLM_SIMD_X86
// MR rows of a times NR rows of b: MR * NR accumulators of 8 lanes, summed across lanes at the end.
template <int MR, int NR, bool PF = false>
OPDLM_AVX2 void small_rows_kernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k, float* c,
                                  int64_t ldc) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) {
    __m256 bv[NR];
    if (PF && (p & 15) == 0)  // the next panel's rows, a panel ahead (prefetches never fault)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(b + (NR + j) * ldb + p), _MM_HINT_T0);
    for (int j = 0; j < NR; ++j) {
      bv[j] = _mm256_loadu_ps(b + j * ldb + p);
      // Keep it in a register: folded into each row's FMA as a memory operand, b would be loaded MR
      // times, and the loads, not the FMAs, would set the pace.
      __asm__("" : "+x"(bv[j]));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * lda + p);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (p < k) {
    const __m256i msk = simd::lanes(k - p);
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_maskload_ps(b + j * ldb + p, msk);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_maskload_ps(a + i * lda + p, msk);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    if constexpr (NR == 4) {  // the 4 lane sums of a row at once: 3 hadds, one add, one store
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
      _mm_storeu_ps(c + i * ldc, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    } else {
      for (int j = 0; j < NR; ++j) c[i * ldc + j] = simd::hsum256(acc[i][j]);
    }
  }
}

template <int MR, bool PF = false>
OPDLM_AVX2 void small_rows_panel(const float* a, int64_t lda, const float* b, int64_t ldb, int nr, int64_t k,
                                 float* c, int64_t ldc) {
  switch (nr) {
    case 4: small_rows_kernel<MR, 4, PF>(a, lda, b, ldb, k, c, ldc); break;
    case 3: small_rows_kernel<MR, 3>(a, lda, b, ldb, k, c, ldc); break;
    case 2: small_rows_kernel<MR, 2>(a, lda, b, ldb, k, c, ldc); break;
    default: small_rows_kernel<MR, 1>(a, lda, b, ldb, k, c, ldc); break;
  }
}

// Up to 8 rows (an AR decoding step), for k <= kFewRowsMaxK: all rows against one row of b at a time,
// so b is streamed once, in order, and a (8 x k floats, half of L1 at most) stays in L1. The 2 x 4
// kernel below re-reads each panel of b from L1 for every row pair; for 8 rows this one was 1.5-2x
// faster with b streamed from DRAM (2 threads, 384 x 384 and 8192 x 384 weights).
constexpr int64_t kFewRows = 8, kFewRowsMaxK = 512;

template <int MR>
OPDLM_AVX2 void few_rows_col(const float* a, int64_t k, const float* b, float* c, int64_t ldc, bool tree) {
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) {
    if ((p & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(b + 2 * k + p), _MM_HINT_T0);
    __m256 bv = _mm256_loadu_ps(b + p);
    __asm__("" : "+x"(bv));
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i * k + p), bv, acc[i]);
  }
  if (p < k) {
    const __m256i msk = simd::lanes(k - p);
    const __m256 bv = _mm256_maskload_ps(b + p, msk);
    for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(a + i * k + p, msk), bv, acc[i]);
  }
  // The lane sums in the order the 2 x 4 kernel uses for the same column (its hadd tree in 4-column
  // panels, hsum256 in the last, narrower panel), so a row's outputs do not depend on how many rows
  // come with it.
  for (int i = 0; i < MR; ++i) {
    if (tree) {
      __m256 h = _mm256_hadd_ps(acc[i], acc[i]);
      h = _mm256_hadd_ps(h, h);
      c[i * ldc] = _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    } else {
      c[i * ldc] = simd::hsum256(acc[i]);
    }
  }
}

// c = a @ b^T (beta = 0) for m <= kFewRows rows.
OPDLM_AVX2 void few_rows_nt(const float* a, int64_t m, int64_t k, const float* b, int64_t n, float* c) {
#pragma omp parallel for schedule(static) if (m * n * k >= (int64_t{1} << 16))
  for (int64_t j = 0; j < n; ++j) {
    const float* bj = b + j * k;
    float* cj = c + j;
    const bool tree = j < n / 4 * 4;  // column j lies in a full 4-column panel of the 2 x 4 kernel
    switch (m) {
      case 8: few_rows_col<8>(a, k, bj, cj, n, tree); break;
      case 7: few_rows_col<7>(a, k, bj, cj, n, tree); break;
      case 6: few_rows_col<6>(a, k, bj, cj, n, tree); break;
      case 5: few_rows_col<5>(a, k, bj, cj, n, tree); break;
      case 4: few_rows_col<4>(a, k, bj, cj, n, tree); break;
      case 3: few_rows_col<3>(a, k, bj, cj, n, tree); break;
      case 2: few_rows_col<2>(a, k, bj, cj, n, tree); break;
      default: few_rows_col<1>(a, k, bj, cj, n, tree); break;
    }
  }
}

// c = a @ b^T (beta = 0) for m <= kSmallRows rows, all row-major and contiguous.
OPDLM_AVX2 void small_rows_nt(const float* a, int64_t m, int64_t k, const float* b, int64_t n, float* c) {
  if (m <= kFewRows && k <= kFewRowsMaxK) return few_rows_nt(a, m, k, b, n, c);
  const int64_t panels = (n + 3) / 4;
  // A thread team costs a few microseconds to wake: not worth it for a few thousand FMAs.
#pragma omp parallel for schedule(static) if (m * n * k >= (int64_t{1} << 16))
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t j0 = q * 4;
    const int nr = static_cast<int>(std::min<int64_t>(4, n - j0));
    int64_t i = m >= 2 ? 2 : 0;
    if (m >= 2) small_rows_panel<2, true>(a, k, b + j0 * k, k, nr, k, c + j0, n);  // streams the panel in
    for (; i + 2 <= m; i += 2) small_rows_panel<2>(a + i * k, k, b + j0 * k, k, nr, k, c + i * n + j0, n);
    if (i < m) small_rows_panel<1>(a + i * k, k, b + j0 * k, k, nr, k, c + i * n + j0, n);
  }
}
#endif

// Whether c = alpha a @ b^T + beta c can take small_rows_nt.
template <class T>
bool use_small_rows(bool ta, bool tb, int64_t rows, double alpha, double beta) {
#ifdef OPDLM_SIMD_X86
  return std::is_same_v<T, float> && !ta && tb && rows <= kSmallRows && alpha == 1 && beta == 0 &&
         simd::cpu_has_avx2_fma();
#else
  (void)ta, (void)tb, (void)rows, (void)alpha, (void)beta;
  return false;
#endif
}

template <class T>
void matmul_impl(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, double alpha, double beta,
                 int64_t batch, int64_t m, int64_t n, int64_t k) {
  T* C = c.data<T>();
  if (m == 0 || n == 0 || batch == 0) return;
  if (k == 0) {  // empty inner product: c = beta * c (BLAS leaves ld checks awkward here)
    const int64_t total = batch * m * n;
    if (beta == 0) std::fill_n(C, total, T(0));
    else
      for (int64_t i = 0; i < total; ++i) C[i] = static_cast<T>(beta * C[i]);
    return;
  }
  const T* A = a.data<T>();
  const T* B = b.data<T>();
  const int lda = blas_int(ta ? m : k, "lda"), ldb = blas_int(tb ? k : n, "ldb");
  const int ldc = blas_int(n, "ldc"), ni = blas_int(n, "N"), ki = blas_int(k, "K");
  const bool b_shared = b.ndim() == 2 && batch > 1;
#ifdef OPDLM_SIMD_X86
  if constexpr (std::is_same_v<T, float>) {
    const int64_t rows = b_shared || batch == 1 ? batch * m : m + kSmallRows;  // batched b: not here
    if (use_small_rows<T>(ta, tb, rows, alpha, beta)) {
      small_rows_nt(A, rows, k, B, n, C);
      return;
    }
  }
#endif
  if (b_shared && !ta) {
    // a [B, M, K] row-major is [B*M, K]: one large GEMM instead of B small ones.
    gemm(false, tb, blas_int(batch * m, "B*M"), ni, ki, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const int mi = blas_int(m, "M");
  for (int64_t i = 0; i < batch; ++i)
    gemm(ta, tb, mi, ni, ki, alpha, A + i * m * k, lda, b_shared ? B : B + i * k * n, ldb, beta, C + i * m * n,
         ldc);
}

}  // namespace

void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta) {
  expect_float_cpu(a, "a");
  expect_float_cpu(b, "b");
  expect_same_dtype(a, "a", b, "b");
  if (a.ndim() != 2 && a.ndim() != 3)
    OPDLM_FAIL("matmul: tensor 'a' ", a.describe(), " has ", a.ndim(), " dimensions, expected 2 or 3");
  if (a.ndim() == 2) expect_ndim(b, "b", 2);
  else if (b.ndim() != 2 && b.ndim() != 3)
    OPDLM_FAIL("matmul: tensor 'b' ", b.describe(), " has ", b.ndim(), " dimensions, expected 2 or 3");
  const int ad = a.ndim(), bd = b.ndim();
  const int64_t batch = ad == 3 ? a.size(0) : 1;
  const int64_t m = trans_a ? a.size(-1) : a.size(-2);
  const int64_t k = trans_a ? a.size(-2) : a.size(-1);
  expect_dim(b, "b", trans_b ? bd - 1 : bd - 2, k, "inner dimension of 'a'");
  if (bd == 3) expect_dim(b, "b", 0, batch, "batch size of 'a'");
  const int64_t n = trans_b ? b.size(-2) : b.size(-1);
  const Shape cs = ad == 3 ? Shape{batch, m, n} : Shape{m, n};
  if (!c.defined() && beta != 0) OPDLM_FAIL("matmul: tensor 'c' is undefined but beta = ", beta, " reads it");
  prepare_output(c, "c", cs, a.dtype());
  if (overlaps(c, a) || overlaps(c, b)) OPDLM_FAIL("matmul: tensor 'c' shares memory with '", overlaps(c, a) ? "a" : "b", "'");
  if (a.dtype() == DType::f32) matmul_impl<float>(a, trans_a, b, trans_b, c, alpha, beta, batch, m, n, k);
  else matmul_impl<double>(a, trans_a, b, trans_b, c, alpha, beta, batch, m, n, k);
}

Tensor matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b) {
  Tensor c;
  matmul(a, trans_a, b, trans_b, c);
  return c;
}

// ---- Linear (HF layout) ---------------------------------------------------------------------------
static void check_linear(const Tensor& x, const Tensor& w) {
  expect_float_cpu(x, "x");
  expect_float_cpu(w, "w");
  expect_ndim(x, "x", 2);
  expect_ndim(w, "w", 2);
  expect_same_dtype(x, "x", w, "w");
  expect_dim(x, "x", 1, w.size(1), "in_features of 'w' [out, in]");
}

Tensor linear_forward(const Tensor& x, const Tensor& w) {
  check_linear(x, w);
  Tensor y = Tensor::empty({x.size(0), w.size(0)}, x.dtype());
  matmul(x, false, w, true, y);
  return y;
}

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor* dw) {
  check_linear(x, w);
  expect_float_cpu(dy, "dy");
  expect_same_dtype(x, "x", dy, "dy");
  expect_shape(dy, "dy", {x.size(0), w.size(0)}, "[n, out] of 'x' and 'w'");
  if (dx) {
    prepare_output(*dx, "dx", x.shape(), x.dtype());
    matmul(dy, false, w, false, *dx);  // dx = dy @ w
  }
  if (dw) {
    prepare_accumulator(*dw, "dw", w.shape(), w.dtype());
    matmul(dy, true, x, false, *dw, 1.0, 1.0);  // dw += dy^T @ x
  }
}

}  // namespace opdlm::ops
