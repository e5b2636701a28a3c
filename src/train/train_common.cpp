// The [optim] keys, the metrics log and the AdamW update shared by the training loops.
#include "opdlm/train/train_common.hpp"

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "opdlm/base/error.hpp"

namespace po = boost::program_options;

namespace opdlm::train {

void add_optim_options(po::options_description& d, double lr, int64_t warmup_steps, int64_t max_steps,
                       double weight_decay, const char* max_steps_help) {
  d.add_options()
      ("optim.lr", po::value<double>()->default_value(lr), "peak learning rate")
      ("optim.min_lr_ratio", po::value<double>()->default_value(0.1), "cosine floor / peak")
      ("optim.warmup_steps", po::value<int64_t>()->default_value(warmup_steps), "linear warm-up (optimizer steps)")
      ("optim.max_steps", po::value<int64_t>()->default_value(max_steps), max_steps_help)
      ("optim.weight_decay", po::value<double>()->default_value(weight_decay), "AdamW decoupled decay (matrices only)")
      ("optim.beta1", po::value<double>()->default_value(0.9), "AdamW beta1")
      ("optim.beta2", po::value<double>()->default_value(0.999), "AdamW beta2")
      ("optim.eps", po::value<double>()->default_value(1e-8), "AdamW epsilon")
      ("optim.grad_clip", po::value<double>()->default_value(1.0), "global-norm clip (0: off)");
}

OptimOptions read_optim_options(const ResolvedConfig& c) {
  OptimOptions o;
  o.schedule.peak_lr = c.get<double>("optim.lr");
  o.schedule.min_ratio = c.get<double>("optim.min_lr_ratio");
  o.schedule.warmup_steps = c.get<int64_t>("optim.warmup_steps");
  o.schedule.total_steps = c.get<int64_t>("optim.max_steps");
  o.adam.weight_decay = c.get<double>("optim.weight_decay");
  o.adam.beta1 = c.get<double>("optim.beta1");
  o.adam.beta2 = c.get<double>("optim.beta2");
  o.adam.eps = c.get<double>("optim.eps");
  o.grad_clip = c.get<double>("optim.grad_clip");
  require_range(c, "optim.beta1", 0, 0.999999);
  require_range(c, "optim.beta2", 0, 0.999999);
  if (!(o.grad_clip >= 0)) {
    const std::string where = c.origin.count("optim.grad_clip") ? c.origin.at("optim.grad_clip") : "config";
    OPDLM_FAIL_AT(where, "optim.grad_clip", "must be >= 0");
  }
  return o;
}

MetricsLog::MetricsLog(const std::string& path) : path_(path), out_(path, std::ios::app) {
  if (!out_) OPDLM_FAIL_AT(path, "", "cannot open the metrics log for appending");
}

void MetricsLog::truncate(uintmax_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  out_.close();
  std::filesystem::resize_file(path_, bytes);
  out_.open(path_, std::ios::app);
  if (!out_) OPDLM_FAIL_AT(path_, "", "cannot reopen the metrics log for appending");
}

void MetricsLog::write(const nlohmann::json& j) {
  std::string line;
  if (attempt_ >= 0 && j.is_object()) {
    nlohmann::json s = j;
    s["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    s["attempt"] = attempt_;
    line = s.dump() + "\n";
  } else {
    line = j.dump() + "\n";
  }
  std::lock_guard<std::mutex> lock(mu_);
  out_ << line;
  out_.flush();
}

void adamw_update(model::Qwen3Model& model, model::Qwen3Weights& m1, model::Qwen3Weights& m2, int64_t step,
                  const ops::AdamWConfig& adam) {
  auto& params = model.weights().tensors();
  auto& g = model.grads().tensors();
  for (size_t i = 0; i < params.size(); ++i) {
    ops::AdamWConfig a = adam;
    if (params[i].value.ndim() < 2) a.weight_decay = 0;  // no decay on norm gains
    ops::adamw_step(params[i].value, g[i].value, m1.tensors()[i].value, m2.tensors()[i].value, step, a);
  }
}

}  // namespace opdlm::train
