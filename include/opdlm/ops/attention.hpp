// Scaled dot-product attention on the CPU with grouped-query heads and mask descriptors (never a
// dense mask): forward writes the log-sum-exp that the backward uses to recompute probabilities.
#pragma once

#include <span>

#include "opdlm/ops/mask.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D], Hq % Hkv == 0 (query head h uses kv head h / (Hq/Hkv)).
// masks: B descriptors (one per batch row), or exactly 1 shared by all rows. All f32 or all f64, CPU.
// Returns o [B, Tq, Hq, D]; when lse is non-null writes lse [B, Hq, Tq] = log sum_k exp(scale q.k)
// over the allowed keys (allocated if undefined, else shape- and dtype-checked).
Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                         std::span<const MaskDescriptor> masks, double scale, Tensor* lse);

// Gradients of the forward above for upstream gradient dout [B, Tq, Hq, D]. dq, dk, dv are
// OVERWRITTEN (allocated if undefined, else shape- and dtype-checked). Probabilities are recomputed
// from q, k and lse; o is only used for the row terms sum_d dout * o.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                        const Tensor& lse, const Tensor& dout, std::span<const MaskDescriptor> masks,
                        double scale, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace opdlm::ops
