// SwiGLU activation of the Qwen3 MLP on the CPU: h = silu(gate) * up, forward and backward.
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient convention (all of opdlm::ops): input gradients are overwritten, parameter gradients are
// ACCUMULATED (+=); an undefined output Tensor is allocated.

// gate, up [rows, F] (f32/f64, same dtype) -> h [rows, F], silu(g) = g * sigmoid(g).
Tensor swiglu_forward(const Tensor& gate, const Tensor& up);
// dgate = dh * up * silu'(gate), dup = dh * silu(gate); both OVERWRITTEN, either may be null.
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor* dgate, Tensor* dup);

}  // namespace opdlm::ops
