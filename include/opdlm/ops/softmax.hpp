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
// exp runs in T (expf for f32: ~1 ulp and several times cheaper than exp in double, which
// dominated large-vocabulary losses); sums are carried in double, flushed every 256 terms.
template <class T>
double row_logsumexp(const T* x, int64_t V) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, x[v]);
  if (mx == -std::numeric_limits<T>::infinity()) return -std::numeric_limits<double>::infinity();
  double s = 0;
  for (int64_t v0 = 0; v0 < V; v0 += 256) {
    T part = 0;
    const int64_t v1 = std::min<int64_t>(V, v0 + 256);
    for (int64_t v = v0; v < v1; ++v) part += std::exp(x[v] - mx);
    s += static_cast<double>(part);
  }
  return static_cast<double>(mx) + std::log(s);
}
}  // namespace detail

}  // namespace opdlm::ops
