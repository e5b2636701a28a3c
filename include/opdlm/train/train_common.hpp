// What the AR and the conversion training loops share: the [optim] config keys, the JSONL metrics
// log, and the AdamW update over every parameter of a model.
#pragma once

#include <boost/program_options/options_description.hpp>
#include <cstdint>
#include <fstream>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "opdlm/base/config.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/train/lr_schedule.hpp"

namespace opdlm::train {

struct OptimOptions {
  LrSchedule schedule;
  ops::AdamWConfig adam;
  double grad_clip = 1.0;
};

// optim.lr, min_lr_ratio, warmup_steps, max_steps, weight_decay, beta1, beta2, eps, grad_clip, with
// the given defaults (the loops differ in scale) and help for max_steps.
void add_optim_options(boost::program_options::options_description& d, double lr, int64_t warmup_steps,
                       int64_t max_steps, double weight_decay, const char* max_steps_help);
// Reads and range-checks them (errors name the key and its origin); schedule.validate() is left to
// the caller, which may derive max_steps first.
OptimOptions read_optim_options(const ResolvedConfig& c);

// RUN/metrics.jsonl: one JSON object per line, flushed at once (a killed run keeps every line).
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path);
  void write(const nlohmann::json& j);
  // From now on every line also gets "time" (Unix seconds) and "attempt" (docs/logs.md).
  void stamp_lines(int64_t attempt) { attempt_ = attempt; }
  // Thread-safe. Cuts the log back to `bytes` (a checkpoint's metrics offset) and goes on appending from there.
  void truncate(uintmax_t bytes);

 private:
  std::string path_;
  int64_t attempt_ = -1;  // < 0: lines as given
  std::mutex mu_;  // the hang watchdog writes its line from its own thread
  std::ofstream out_;
};

// One AdamW step (1-based `step`) of every parameter of `model` from its gradients, moments in
// m1/m2 (zeros_like of the weights); no weight decay on 1-D tensors (the norm gains).
void adamw_update(model::Qwen3Model& model, model::Qwen3Weights& m1, model::Qwen3Weights& m2, int64_t step,
                  const ops::AdamWConfig& adam);

}  // namespace opdlm::train
