// Rotary position embedding on the CPU, Qwen3 rotate-half convention with explicit position ids
// (the training layout repeats positions), forward and backward (the inverse rotation).
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient convention (all of opdlm::ops): input gradients are overwritten (here: returned fresh).

// cos/sin [tokens, head_dim/2] for positions i32 [tokens]: inv_freq_i = theta^(-2i/head_dim) and the
// angles pos * inv_freq_i are computed in double, then cast to `dtype` (as rope_from_pos in
// opd_ref.py). Build once per step and reuse for q and k of every layer.
struct RopeTable {
  Tensor cos, sin;
  int64_t head_dim = 0;
};
RopeTable rope_table(const Tensor& positions, int64_t head_dim, double theta, DType dtype);

// x [tokens, heads, head_dim] (head_dim even): x <- x*cos + rotate_half(x)*sin, rotate_half(x) =
// cat(-x[h:], x[:h]); with inverse = true the rotation by -angle (the backward).
void rope_inplace(Tensor& x, const RopeTable& table, bool inverse = false);

Tensor rope_forward(const Tensor& x, const RopeTable& table);
// dx = R(-angle) dy: a rotation's Jacobian transpose is its inverse.
Tensor rope_backward(const Tensor& dy, const RopeTable& table);

// One-shot forms that build the table themselves.
Tensor rope_forward(const Tensor& x, const Tensor& positions, double theta);
Tensor rope_backward(const Tensor& dy, const Tensor& positions, double theta);

}  // namespace opdlm::ops
