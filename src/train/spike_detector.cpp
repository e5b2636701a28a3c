// SpikeDetector: a running window of accepted values and the mean + sigma * std rule.
#include "opdlm/train/spike_detector.hpp"

#include <cmath>

#include "opdlm/base/error.hpp"

namespace opdlm::train {

std::optional<Spike> SpikeDetector::check(double value) const {
  if (rule_.window <= 0 || static_cast<int64_t>(values_.size()) < rule_.window) return std::nullopt;
  // Two passes in a fixed order: the same bits on every rank and after a resume.
  double mean = 0;
  for (double v : values_) mean += v;
  mean /= static_cast<double>(values_.size());
  double var = 0;
  for (double v : values_) var += (v - mean) * (v - mean);
  var /= static_cast<double>(values_.size());
  Spike s{value, mean, std::sqrt(var), 0};
  s.threshold = std::max(mean + rule_.sigma * s.stddev, rule_.min_ratio * mean);
  if (!(value > s.threshold)) return std::nullopt;
  return s;
}

void SpikeDetector::push(double value) {
  if (rule_.window <= 0) return;
  values_.push_back(value);
  while (static_cast<int64_t>(values_.size()) > rule_.window) values_.pop_front();
}

nlohmann::json SpikeDetector::to_json() const { return nlohmann::json(std::vector<double>(values_.begin(), values_.end())); }

void SpikeDetector::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) OPDLM_FAIL_AT(where, "spike window", "expected an array of numbers");
  values_.clear();
  for (const auto& v : j) {
    if (!v.is_number()) OPDLM_FAIL_AT(where, "spike window", "expected an array of numbers, found ", v.dump());
    values_.push_back(v.get<double>());
  }
  while (rule_.window > 0 && static_cast<int64_t>(values_.size()) > rule_.window) values_.pop_front();
}

}  // namespace opdlm::train
