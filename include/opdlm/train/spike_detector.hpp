// SpikeDetector: flags a value (an update's loss or gradient norm) far above a running window of the
// values accepted before it (docs/fault_tolerance.md). Pure and serialisable, so a resumed run makes
// the same decisions as an uninterrupted one.
#pragma once

#include <cstdint>
#include <deque>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace opdlm::train {

struct SpikeRule {
  int64_t window = 0;      // values kept (0: detection off)
  double sigma = 6;        // a spike is above mean + sigma * std of the window ...
  double min_ratio = 2;    // ... and above min_ratio * mean (a flat window has a std near 0)
};

struct Spike {
  double value = 0, mean = 0, stddev = 0, threshold = 0;
};

class SpikeDetector {
 public:
  SpikeDetector() = default;
  explicit SpikeDetector(SpikeRule rule) : rule_(rule) {}
  // A spike when the window is full and `value` exceeds max(mean + sigma * std, min_ratio * mean).
  // Checking does not add the value: the caller pushes the values it accepts (a skipped or rolled-back
  // update must not raise the baseline).
  std::optional<Spike> check(double value) const;
  void push(double value);
  const std::deque<double>& values() const { return values_; }

  // The window, for checkpoints; from_json refuses a malformed one naming `where`.
  nlohmann::json to_json() const;
  void from_json(const nlohmann::json& j, const std::string& where);

 private:
  SpikeRule rule_;
  std::deque<double> values_;
};

}  // namespace opdlm::train
