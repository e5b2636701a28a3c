// CPU RMSNorm forward/backward; row reductions accumulate in double so f32 rows of a few thousand
// elements keep full precision.
#include "opdlm/ops/rmsnorm.hpp"

#include <algorithm>
#include <cmath>

namespace opdlm::ops {
namespace {

void check_xw(const Tensor& x, const Tensor& w) {
  expect_float_cpu(x, "x");
  expect_float_cpu(w, "w");
  expect_ndim(x, "x", 2);
  expect_ndim(w, "w", 1);
  expect_same_dtype(x, "x", w, "w");
  expect_dim(w, "w", 0, x.size(1), "last dimension of 'x'");
}

template <class T>
void forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, T* rstd_out) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* X = x.data<T>();
  const T* W = w.data<T>();
  T* Y = y.data<T>();
#pragma omp parallel for schedule(static) if (rows * d > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = X + r * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += double(xr[j]) * double(xr[j]);
    const T rs = static_cast<T>(1.0 / std::sqrt(ss / double(d) + eps));
    T* yr = Y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * rs * W[j];
    if (rstd_out) rstd_out[r] = rs;
  }
}

// y_j = x_j r w_j with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D, so
//   dx_j = r w_j dy_j - x_j r^3 / D * sum_k dy_k w_k x_k,   dw_j = sum_rows dy_j x_j r.
template <class T>
void backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor* dx, Tensor* dw) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* X = x.data<T>();
  const T* W = w.data<T>();
  const T* R = rstd.data<T>();
  const T* G = dy.data<T>();
  if (dx) {
    T* DX = dx->data<T>();
#pragma omp parallel for schedule(static) if (rows * d > (1 << 14))
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = X + r * d;
      const T* gr = G + r * d;
      double dot = 0;
      for (int64_t j = 0; j < d; ++j) dot += double(gr[j]) * double(W[j]) * double(xr[j]);
      const T rs = R[r];
      const T c = static_cast<T>(dot * double(rs) * double(rs) * double(rs) / double(d));
      T* o = DX + r * d;
      for (int64_t j = 0; j < d; ++j) o[j] = rs * W[j] * gr[j] - xr[j] * c;
    }
  }
  if (dw) {
    // Column blocks per thread, rows in order: race-free and independent of the thread count.
    T* DW = dw->data<T>();
    constexpr int64_t kCols = 64;
    const int64_t nblk = (d + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (rows * d > (1 << 14))
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t c0 = blk * kCols, c1 = std::min(d, c0 + kCols);
      double acc[kCols] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = X + r * d;
        const T* gr = G + r * d;
        const double rs = R[r];
        for (int64_t j = c0; j < c1; ++j) acc[j - c0] += double(gr[j]) * double(xr[j]) * rs;
      }
      for (int64_t j = c0; j < c1; ++j) DW[j] += static_cast<T>(acc[j - c0]);
    }
  }
}

}  // namespace

Tensor rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor* rstd) {
  check_xw(x, w);
  if (!(eps >= 0)) OPDLM_FAIL("rmsnorm: eps = ", eps, " must be >= 0");
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  if (rstd) prepare_output(*rstd, "rstd", {x.size(0)}, x.dtype());
  if (x.dtype() == DType::f32) forward<float>(x, w, eps, y, rstd ? rstd->data<float>() : nullptr);
  else forward<double>(x, w, eps, y, rstd ? rstd->data<double>() : nullptr);
  return y;
}

void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor* dx,
                      Tensor* dw) {
  check_xw(x, w);
  expect_float_cpu(rstd, "rstd");
  expect_same_dtype(x, "x", rstd, "rstd");
  expect_shape(rstd, "rstd", {x.size(0)}, "rows of 'x'");
  expect_float_cpu(dy, "dy");
  expect_same_dtype(x, "x", dy, "dy");
  expect_shape(dy, "dy", x.shape(), "shape of 'x'");
  if (dx) prepare_output(*dx, "dx", x.shape(), x.dtype());
  if (dw) prepare_accumulator(*dw, "dw", w.shape(), w.dtype());
  if (x.dtype() == DType::f32) backward<float>(x, w, rstd, dy, dx, dw);
  else backward<double>(x, w, rstd, dy, dx, dw);
}

}  // namespace opdlm::ops
