// CPU residual add (out-of-place and in place) and its accumulating backward.
#include "opdlm/ops/residual.hpp"

namespace opdlm::ops {
namespace {

void check_pair(const Tensor& x, const char* xn, const Tensor& d, const char* dn) {
  expect_float_cpu(x, xn);
  expect_float_cpu(d, dn);
  expect_same_dtype(x, xn, d, dn);
  expect_shape(d, dn, x.shape(), std::string("shape of '") + xn + "'");
}

template <class T>
void add(const T* a, const T* b, T* out, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void add_into(const Tensor& a, const Tensor& b, Tensor& out) {
  if (a.dtype() == DType::f32) add(a.data<float>(), b.data<float>(), out.data<float>(), out.numel());
  else add(a.data<double>(), b.data<double>(), out.data<double>(), out.numel());
}

}  // namespace

Tensor residual_forward(const Tensor& x, const Tensor& delta) {
  check_pair(x, "x", delta, "delta");
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  add_into(x, delta, out);
  return out;
}

void residual_add_inplace(Tensor& x, const Tensor& delta) {
  check_pair(x, "x", delta, "delta");
  add_into(x, delta, x);
}

void residual_backward(const Tensor& dy, Tensor& dx_accum) {
  expect_float_cpu(dy, "dy");
  if (!dx_accum.defined()) {
    dx_accum = dy.clone();
    return;
  }
  check_pair(dx_accum, "dx_accum", dy, "dy");
  add_into(dx_accum, dy, dx_accum);
}

}  // namespace opdlm::ops
