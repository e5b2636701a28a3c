// CPU AdamW step (torch.optim.AdamW semantics), elementwise with OpenMP.
#include "opdlm/ops/adamw.hpp"

#include <cmath>
#include <utility>

namespace opdlm::ops {

namespace {

void check_config(const AdamWConfig& c, int64_t step) {
  if (step < 1) OPDLM_FAIL("adamw_step: 'step' is ", step, ", must be >= 1 (1-based, counting this step)");
  if (!(std::isfinite(c.lr) && c.lr >= 0.0)) OPDLM_FAIL("adamw_step: 'lr' is ", c.lr, ", must be finite and >= 0");
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) OPDLM_FAIL("adamw_step: 'beta1' is ", c.beta1, ", must be in [0, 1)");
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) OPDLM_FAIL("adamw_step: 'beta2' is ", c.beta2, ", must be in [0, 1)");
  if (!(std::isfinite(c.eps) && c.eps >= 0.0)) OPDLM_FAIL("adamw_step: 'eps' is ", c.eps, ", must be finite and >= 0");
  if (!(std::isfinite(c.weight_decay) && c.weight_decay >= 0.0))
    OPDLM_FAIL("adamw_step: 'weight_decay' is ", c.weight_decay, ", must be finite and >= 0");
}

template <class T>
void kernel_range(T* p, const T* g, T* pm, T* pv, int64_t N, int64_t step, const AdamWConfig& c) {
  const double decay = 1.0 - c.lr * c.weight_decay;
  const double step_size = c.lr / (1.0 - std::pow(c.beta1, static_cast<double>(step)));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(c.beta2, static_cast<double>(step)));
  const double b1 = c.beta1, b2 = c.beta2, eps = c.eps;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    const double gi = g[i];
    const double mi = b1 * pm[i] + (1.0 - b1) * gi;
    const double vi = b2 * pv[i] + (1.0 - b2) * gi * gi;
    pm[i] = static_cast<T>(mi);
    pv[i] = static_cast<T>(vi);
    // torch divides sqrt(v) by sqrt(bc2) before adding eps; same order here.
    p[i] = static_cast<T>(decay * p[i] - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps));
  }
}

}  // namespace

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, int64_t step, const AdamWConfig& cfg) {
  expect_float_cpu(param, "param");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&grad, "grad"}, {&m, "m"}, {&v, "v"}}) {
    expect_float_cpu(*t, name);
    expect_same_dtype(param, "param", *t, name);
    expect_shape(*t, name, param.shape(), "shape of 'param'");
  }
  check_config(cfg, step);
  if (param.dtype() == DType::f32)
    kernel_range<float>(param.data<float>(), grad.data<float>(), m.data<float>(), v.data<float>(), param.numel(), step, cfg);
  else
    kernel_range<double>(param.data<double>(), grad.data<double>(), m.data<double>(), v.data<double>(), param.numel(),
                         step, cfg);
}

void adamw_step_range(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                      const AdamWConfig& cfg) {
  check_config(cfg, step);
  if (n < 0) OPDLM_FAIL("adamw_step_range: n is ", n);
  kernel_range<float>(param, grad, m, v, n, step, cfg);
}

}  // namespace opdlm::ops
