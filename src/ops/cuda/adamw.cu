// CUDA twin of adamw_step_range (ops/adamw.hpp): the torch.optim.AdamW update on f32 master weights,
// math in double with every operation written as an explicitly rounded intrinsic (no fused
// multiply-add contraction), in the CPU's evaluation order, so the f32 results equal the CPU's bit for
// bit. The step constants are computed on the host with std::pow/std::sqrt, as the CPU does.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"

namespace opdlm::cuda {
namespace {

// ---- kernel ------------------------------------------------------------------------------------------

struct StepConstants {
  double decay, step_size, bc2_sqrt, b1, one_minus_b1, b2, one_minus_b2, eps;
};

// The CPU loop body, operation by operation (double, round-to-nearest each):
//   mi = b1 * m + (1 - b1) * g;   vi = b2 * v + (1 - b2) * g * g;
//   p  = decay * p - step_size * mi / (sqrt(vi) / bc2_sqrt + eps).
__global__ void k_adamw(float* param, const float* grad, float* m, float* v, int64_t n, StepConstants k,
                        __nv_bfloat16* param_bf16) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double gi = grad[i];
    const double mi = __dadd_rn(__dmul_rn(k.b1, double(m[i])), __dmul_rn(k.one_minus_b1, gi));
    const double vi = __dadd_rn(__dmul_rn(k.b2, double(v[i])), __dmul_rn(__dmul_rn(k.one_minus_b2, gi), gi));
    m[i] = __double2float_rn(mi);
    v[i] = __double2float_rn(vi);
    const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(vi), k.bc2_sqrt), k.eps);
    const double update = __ddiv_rn(__dmul_rn(k.step_size, mi), denom);
    const float p = __double2float_rn(__dsub_rn(__dmul_rn(k.decay, double(param[i])), update));
    param[i] = p;
    if (param_bf16) param_bf16[i] = __float2bfloat16_rn(p);
  }
}

// Same checks and messages as the CPU's check_config.
void check_config(const ops::AdamWConfig& c, int64_t step) {
  if (step < 1) OPDLM_FAIL("adamw_step: 'step' is ", step, ", must be >= 1 (1-based, counting this step)");
  if (!(std::isfinite(c.lr) && c.lr >= 0.0)) OPDLM_FAIL("adamw_step: 'lr' is ", c.lr, ", must be finite and >= 0");
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) OPDLM_FAIL("adamw_step: 'beta1' is ", c.beta1, ", must be in [0, 1)");
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) OPDLM_FAIL("adamw_step: 'beta2' is ", c.beta2, ", must be in [0, 1)");
  if (!(std::isfinite(c.eps) && c.eps >= 0.0)) OPDLM_FAIL("adamw_step: 'eps' is ", c.eps, ", must be finite and >= 0");
  if (!(std::isfinite(c.weight_decay) && c.weight_decay >= 0.0))
    OPDLM_FAIL("adamw_step: 'weight_decay' is ", c.weight_decay, ", must be finite and >= 0");
}

}  // namespace

// ---- host wrapper ------------------------------------------------------------------------------------

void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                const ops::AdamWConfig& cfg, void* param_bf16, cudaStream_t stream) {
  check_config(cfg, step);
  if (n < 0) OPDLM_FAIL("cuda::adamw_step: n is ", n);
  if (n == 0) return;
  // The CPU's constants, computed the same way on the host.
  StepConstants k;
  k.decay = 1.0 - cfg.lr * cfg.weight_decay;
  k.step_size = cfg.lr / (1.0 - std::pow(cfg.beta1, static_cast<double>(step)));
  k.bc2_sqrt = std::sqrt(1.0 - std::pow(cfg.beta2, static_cast<double>(step)));
  k.b1 = cfg.beta1, k.one_minus_b1 = 1.0 - cfg.beta1;
  k.b2 = cfg.beta2, k.one_minus_b2 = 1.0 - cfg.beta2;
  k.eps = cfg.eps;
  const int threads = 256;
  const int grid = static_cast<int>(std::clamp<int64_t>((n + threads - 1) / threads, 1, 65535));
  k_adamw<<<grid, threads, 0, stream>>>(param, grad, m, v, n, k, static_cast<__nv_bfloat16*>(param_bf16));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
