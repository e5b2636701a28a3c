// Learning-rate schedule in optimizer steps: linear warm-up, then cosine decay to a floor
// (algorithm.md B 6.4: lr(n) = lr * (min_ratio + (1-min_ratio) * (1 + cos(pi (n-W)/(H-W))) / 2)).
#pragma once

#include <cstdint>

namespace opdlm::train {

struct LrSchedule {
  double peak_lr = 1e-3;
  int64_t warmup_steps = 0;  // W: lr(n) = peak * n / W for n < W (n counts from 0)
  int64_t total_steps = 1;   // H: the cosine horizon
  double min_ratio = 0.1;    // floor as a fraction of peak_lr
  // Past the horizon the rate stays at the floor (the reference's unclamped cosine would rise
  // again; our runs stop at H, so this only matters for over-long runs).
  double at(int64_t step) const;
  void validate() const;  // Error naming the config key
};

}  // namespace opdlm::train
