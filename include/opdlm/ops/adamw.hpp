// AdamW, one step on one parameter tensor, exactly as torch.optim.AdamW (amsgrad off): decoupled
// weight decay, moment updates, bias correction with the 1-based step.
#pragma once

#include <cstdint>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// param *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
// param -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps).
// param, grad, m, v: same shape and dtype (f32 or f64); math in double, one rounding per store.
// step >= 1 is the count of steps including this one (torch's state['step'] after its increment).
void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, int64_t step, const AdamWConfig& cfg);
// The same update on n contiguous f32 elements (a ZeRO-1 shard of a tensor): the same kernel, so
// the bits equal adamw_step's on those elements.
void adamw_step_range(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                      const AdamWConfig& cfg);

}  // namespace opdlm::ops
