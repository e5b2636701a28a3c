// RMSNorm on the CPU (Qwen3: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps) over the last dim),
// forward and backward.
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient convention (all of opdlm::ops): input gradients are overwritten, parameter gradients are
// ACCUMULATED (+=); an undefined output Tensor is allocated (zero-filled when accumulated).

// x [rows, D], w [D] (f32/f64, same dtype) -> y [rows, D]. Per-head q/k norms view x as
// [tokens*heads, head_dim]. When `rstd` is non-null it receives rstd [rows] for the backward.
Tensor rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor* rstd = nullptr);
// From x, w, the saved rstd [rows] and dy [rows, D]: dx (overwritten, may be null) and
// dw [D] (ACCUMULATED, may be null).
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor* dx,
                      Tensor* dw);

}  // namespace opdlm::ops
