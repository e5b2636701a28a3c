// Residual connection on the CPU: out = x + delta (or x += delta in place) and its backward, where the
// gradient passes unchanged to both the skip path and the branch.
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient convention (all of opdlm::ops): input gradients are overwritten, parameter gradients are
// ACCUMULATED (+=); residual_backward is the one input-gradient op that accumulates, because the
// skip path's gradient is a sum over every block that reads the stream.

// out = x + delta; x and delta of the same shape and float dtype.
Tensor residual_forward(const Tensor& x, const Tensor& delta);
// x += delta in place (the residual stream update).
void residual_add_inplace(Tensor& x, const Tensor& delta);
// d(x + delta)/dx = d(x + delta)/ddelta = identity: both branches receive dy. This adds dy into the
// running gradient of the stream, dx_accum += dy (ACCUMULATED; an undefined dx_accum becomes a copy
// of dy). The branch's gradient is dy itself, no copy needed.
void residual_backward(const Tensor& dy, Tensor& dx_accum);

}  // namespace opdlm::ops
