// Row-wise log-softmax over logits [n, V] (forward and backward), and the row log-sum-exp that the
// cross-entropy and KL ops share. CPU reference: f32 or f64 storage, double accumulation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// lse[i] = log sum_v exp(x[i, v]) for x [n, V]; returns [n] in x's dtype.
Tensor logsumexp_rows(const Tensor& x);

// y = x - lse(x), row by row.
Tensor log_softmax_forward(const Tensor& x);
// dx = dy - exp(y) * sum_v dy, from the forward output y (x itself is not needed).
Tensor log_softmax_backward(const Tensor& y, const Tensor& dy);

namespace detail {
// log sum exp of one row in double, shifted by the row max so large logits cannot overflow.
// A row that is all -inf gives -inf (not NaN).
template <class T>
double row_logsumexp(const T* x, int64_t V) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(x[v]));
  if (mx == -std::numeric_limits<double>::infinity()) return mx;
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<double>(x[v]) - mx);
  return mx + std::log(s);
}
}  // namespace detail

}  // namespace opdlm::ops
