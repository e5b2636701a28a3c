// CPU matmul (2-D, batched, broadcast b) through OpenBLAS cblas_sgemm/cblas_dgemm, and the Linear
// forward/backward built on it.
#include "opdlm/ops/matmul.hpp"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cstring>

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
