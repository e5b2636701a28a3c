// Softmax cross-entropy on logits [n, V] with i32 targets [n], an optional per-row weight (the 1/t
// ELBO weights of the rm-ce baseline) and an ignore rule; per-row losses, forward and backward.
#pragma once

#include <cstdint>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// torch's default ignore_index: rows with this target get no loss and a zero gradient.
inline constexpr int32_t kIgnoreIndex = -100;

// loss[i] = w[i] * (lse[i] - logits[i, targets[i]]), 0 for ignored rows; returns [n] in the logits'
// dtype. `weight` [n] (same dtype as logits) may be undefined (all ones). When `lse` is non-null it
// receives the row log-sum-exp [n] that the backward needs. A target outside [0, V) that is not
// `ignore_index` is an Error naming 'targets', the row and the value.
Tensor cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& weight, Tensor* lse,
                             int32_t ignore_index = kIgnoreIndex);
// dlogits[i, v] = dloss[i] * w[i] * (softmax(logits)[i, v] - [v == targets[i]]), 0 for ignored rows.
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& weight,
                              const Tensor& lse, const Tensor& dloss, int32_t ignore_index = kIgnoreIndex);

}  // namespace opdlm::ops
