// Dense matrix products on the CPU (OpenBLAS sgemm/dgemm) and the bias-free Linear layer in the
// Hugging Face weight layout (w [out, in], y = x @ w^T), forward and backward side by side.
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient-output convention shared by every op in opdlm::ops:
//   * input gradients (dx, dgate, ...) are OVERWRITTEN;
//   * parameter gradients (dw, dtable, ...) are ACCUMULATED (+=) so micro-batches add up;
//   * an output passed as an undefined Tensor is allocated (zero-filled first when accumulated);
//     a defined one must already have the right shape and dtype.

// c = alpha * op(a) @ op(b) + beta * c, op(t) = t^T when trans_t. All f32 or all f64, CPU.
//   2-D:     a [M, K] (or [K, M]), b [K, N] (or [N, K]), c [M, N]
//   batched: a [B, M, K] (or [B, K, M]), b [B, K, N] / [B, N, K] or 2-D (shared by every batch),
//            c [B, M, N]
// An undefined `c` is allocated (requires beta == 0); c must not share memory with a or b.
void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
            double alpha = 1, double beta = 0);
// Allocating form: returns op(a) @ op(b).
Tensor matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b);

// y [n, out] = x [n, in] @ w^T, w [out, in] (torch.nn.functional.linear without bias).
Tensor linear_forward(const Tensor& x, const Tensor& w);
// dx [n, in] = dy @ w (overwritten, may be null); dw [out, in] += dy^T @ x (ACCUMULATED, may be null).
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor* dw);

}  // namespace opdlm::ops
