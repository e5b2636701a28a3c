// RolloutBuffer: the rollouts of one RL step (prompt ids, response ids, step map, stop flag, forward
// counts, global sample id), the student weight version that generated them and the sampler settings.
// Serialised as flat arrays (concatenated ids with offsets), the layout the HDF5 checkpoint will use.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <vector>

#include "opdlm/diffusion/sampler.hpp"

namespace opdlm::diffusion {

// The buffer as flat arrays (one entry per rollout unless said otherwise); rollout i's prompt is
// prompt_ids[prompt_offsets[i], prompt_offsets[i+1]), its response and step map share
// response_offsets.
struct FlatRollouts {
  std::vector<uint32_t> sample_id;
  std::vector<int64_t> prompt_offsets;    // n + 1, starts at 0
  std::vector<int32_t> prompt_ids;
  std::vector<int64_t> response_offsets;  // n + 1, starts at 0
  std::vector<int32_t> response_ids;
  std::vector<int32_t> step_map;          // same length as response_ids
  std::vector<uint8_t> stopped_at_eos;
  std::vector<int64_t> denoise_forwards;
  std::vector<int64_t> commit_forwards;
  bool operator==(const FlatRollouts&) const = default;
};

class RolloutBuffer {
 public:
  RolloutBuffer() = default;
  RolloutBuffer(int64_t weight_version, const SamplerOptions& sampler)
      : weight_version_(weight_version), sampler_(sampler) {}

  // Student optimizer step whose weights generated the rollouts.
  int64_t weight_version() const { return weight_version_; }
  void set_weight_version(int64_t v) { weight_version_ = v; }
  const SamplerOptions& sampler() const { return sampler_; }
  void set_sampler(const SamplerOptions& s) { sampler_ = s; }

  // Only successful rollouts are stored: Error for a status other than ok or a step map whose
  // length differs from the response's.
  void append(Rollout r);
  // Appends the ok rollouts of a sampler call, skips the others; returns how many were skipped.
  size_t append_ok(std::span<const Rollout> rs);
  // Drops the rollouts; weight version and sampler settings stay.
  void clear() { rollouts_.clear(); }

  size_t size() const { return rollouts_.size(); }
  bool empty() const { return rollouts_.empty(); }
  const Rollout& operator[](size_t i) const { return rollouts_[i]; }
  std::vector<Rollout>::const_iterator begin() const { return rollouts_.begin(); }
  std::vector<Rollout>::const_iterator end() const { return rollouts_.end(); }

  // Budget counters (algorithm.md A 7).
  int64_t prompt_tokens() const;
  int64_t response_tokens() const;

  FlatRollouts to_flat() const;
  // Error naming `source` and the array when offsets or lengths are inconsistent.
  void assign_flat(const FlatRollouts& f, const std::string& source = "rollouts");

  // {"format": "opdlm.rollout_buffer", "version": 1, "weight_version", "sampler": {...},
  //  "num_rollouts", then every FlatRollouts array under its field name}.
  nlohmann::json to_json() const;
  static RolloutBuffer from_json(const nlohmann::json& j, const std::string& source = "rollouts");

  bool operator==(const RolloutBuffer&) const = default;

 private:
  int64_t weight_version_ = 0;
  SamplerOptions sampler_;
  std::vector<Rollout> rollouts_;
};

}  // namespace opdlm::diffusion
