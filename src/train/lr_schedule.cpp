// Warm-up + cosine learning-rate schedule.
#include "opdlm/train/lr_schedule.hpp"

#include <cmath>

#include "opdlm/base/error.hpp"

namespace opdlm::train {

double LrSchedule::at(int64_t n) const {
  if (n < warmup_steps) return peak_lr * static_cast<double>(n) / static_cast<double>(warmup_steps);
  if (n >= total_steps) return peak_lr * min_ratio;
  const double progress = static_cast<double>(n - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
  return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
}

void LrSchedule::validate() const {
  if (!(peak_lr > 0) || !std::isfinite(peak_lr)) OPDLM_FAIL_AT("", "optim.lr", "must be > 0, got ", peak_lr);
  if (warmup_steps < 0) OPDLM_FAIL_AT("", "optim.warmup_steps", "must be >= 0, got ", warmup_steps);
  if (total_steps <= warmup_steps)
    OPDLM_FAIL_AT("", "optim.max_steps", "must exceed optim.warmup_steps (", warmup_steps, "), got ", total_steps);
  if (!(min_ratio >= 0 && min_ratio <= 1)) OPDLM_FAIL_AT("", "optim.min_lr_ratio", "must be in [0, 1], got ", min_ratio);
}

}  // namespace opdlm::train
