// CPU row-wise log-softmax (forward/backward) and row log-sum-exp; OpenMP over rows.
#include "opdlm/ops/softmax.hpp"

namespace opdlm::ops {

namespace {

void check_rows(const Tensor& x, const char* name) {
  expect_float_cpu(x, name);
  expect_ndim(x, name, 2);
  if (x.size(1) < 1) OPDLM_FAIL("tensor '", name, "' ", x.describe(), " dimension 1 (vocabulary) is 0, expected >= 1");
}

template <class T>
void lse_kernel(const Tensor& x, Tensor& lse) {
  const int64_t n = x.size(0), V = x.size(1);
  const T* px = x.data<T>();
  T* pl = lse.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) pl[i] = static_cast<T>(detail::row_logsumexp(px + i * V, V));
}

template <class T>
void log_softmax_fwd_kernel(const Tensor& x, Tensor& y) {
  const int64_t n = x.size(0), V = x.size(1);
  const T* px = x.data<T>();
  T* py = y.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = px + i * V;
    const double lse = detail::row_logsumexp(xr, V);
    for (int64_t v = 0; v < V; ++v) py[i * V + v] = static_cast<T>(static_cast<double>(xr[v]) - lse);
  }
}

template <class T>
void log_softmax_bwd_kernel(const Tensor& y, const Tensor& dy, Tensor& dx) {
  const int64_t n = y.size(0), V = y.size(1);
  const T* py = y.data<T>();
  const T* pg = dy.data<T>();
  T* pd = dx.data<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += pg[i * V + v];
    for (int64_t v = 0; v < V; ++v) {
      const int64_t k = i * V + v;
      pd[k] = static_cast<T>(pg[k] - std::exp(static_cast<double>(py[k])) * s);
    }
  }
}

}  // namespace

Tensor logsumexp_rows(const Tensor& x) {
  check_rows(x, "x");
  Tensor lse = Tensor::empty({x.size(0)}, x.dtype());
  if (x.dtype() == DType::f32) lse_kernel<float>(x, lse);
  else lse_kernel<double>(x, lse);
  return lse;
}

Tensor log_softmax_forward(const Tensor& x) {
  check_rows(x, "x");
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  if (x.dtype() == DType::f32) log_softmax_fwd_kernel<float>(x, y);
  else log_softmax_fwd_kernel<double>(x, y);
  return y;
}

Tensor log_softmax_backward(const Tensor& y, const Tensor& dy) {
  check_rows(y, "y");
  expect_float_cpu(dy, "dy");
  expect_same_dtype(y, "y", dy, "dy");
  expect_shape(dy, "dy", y.shape(), "shape of 'y'");
  Tensor dx = Tensor::empty(y.shape(), y.dtype());
  if (y.dtype() == DType::f32) log_softmax_bwd_kernel<float>(y, dy, dx);
  else log_softmax_bwd_kernel<double>(y, dy, dx);
  return dx;
}

}  // namespace opdlm::ops
