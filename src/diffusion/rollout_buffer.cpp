// RolloutBuffer storage and its flat-array / JSON forms (checked on the way in).
#include "opdlm/diffusion/rollout_buffer.hpp"

#include <nlohmann/json.hpp>

#include "opdlm/base/error.hpp"

namespace opdlm::diffusion {

namespace {
constexpr const char* kFormat = "opdlm.rollout_buffer";
constexpr int kVersion = 1;

// offsets: n + 1 non-decreasing values from 0 to `total`.
void check_offsets(const std::vector<int64_t>& off, size_t n, size_t total, const std::string& src, const char* name) {
  if (off.size() != n + 1) OPDLM_FAIL_AT(src, name, "has ", off.size(), " entries, expected num_rollouts + 1 = ", n + 1);
  if (off.front() != 0) OPDLM_FAIL_AT(src, name, "must start at 0, starts at ", off.front());
  for (size_t i = 0; i < n; ++i)
    if (off[i + 1] < off[i]) OPDLM_FAIL_AT(src, name, "decreases at entry ", i + 1);
  if (off.back() != static_cast<int64_t>(total))
    OPDLM_FAIL_AT(src, name, "ends at ", off.back(), ", the concatenated ids hold ", total);
}

template <class T>
std::vector<T> array_of(const nlohmann::json& j, const char* key, const std::string& src) {
  if (!j.contains(key)) OPDLM_FAIL_AT(src, key, "required field is missing");
  if (!j[key].is_array()) OPDLM_FAIL_AT(src, key, "expected an array");
  try {
    return j[key].get<std::vector<T>>();
  } catch (const nlohmann::json::exception& e) {
    OPDLM_FAIL_AT(src, key, "expected an array of integers: ", e.what());
  }
}
}  // namespace

void RolloutBuffer::append(Rollout r) {
  if (!r.ok())
    OPDLM_FAIL("RolloutBuffer: rollout of sample ", r.sample_id, " has status ", rollout_status_name(r.status), " (",
               r.error, "); only ok rollouts are stored");
  if (r.step_map.size() != r.response.size())
    OPDLM_FAIL("RolloutBuffer: rollout of sample ", r.sample_id, " has ", r.step_map.size(), " step map entries for ",
               r.response.size(), " response tokens");
  rollouts_.push_back(std::move(r));
}

size_t RolloutBuffer::append_ok(std::span<const Rollout> rs) {
  size_t skipped = 0;
  for (const Rollout& r : rs) {
    if (r.ok()) append(r);
    else ++skipped;
  }
  return skipped;
}

int64_t RolloutBuffer::prompt_tokens() const {
  int64_t n = 0;
  for (const Rollout& r : rollouts_) n += static_cast<int64_t>(r.prompt.size());
  return n;
}

int64_t RolloutBuffer::response_tokens() const {
  int64_t n = 0;
  for (const Rollout& r : rollouts_) n += static_cast<int64_t>(r.response.size());
  return n;
}

FlatRollouts RolloutBuffer::to_flat() const {
  FlatRollouts f;
  f.prompt_offsets.push_back(0);
  f.response_offsets.push_back(0);
  for (const Rollout& r : rollouts_) {
    f.sample_id.push_back(r.sample_id);
    f.prompt_ids.insert(f.prompt_ids.end(), r.prompt.begin(), r.prompt.end());
    f.prompt_offsets.push_back(static_cast<int64_t>(f.prompt_ids.size()));
    f.response_ids.insert(f.response_ids.end(), r.response.begin(), r.response.end());
    f.step_map.insert(f.step_map.end(), r.step_map.begin(), r.step_map.end());
    f.response_offsets.push_back(static_cast<int64_t>(f.response_ids.size()));
    f.stopped_at_eos.push_back(r.stopped_at_eos ? 1 : 0);
    f.denoise_forwards.push_back(r.denoise_forwards);
    f.commit_forwards.push_back(r.commit_forwards);
  }
  return f;
}

void RolloutBuffer::assign_flat(const FlatRollouts& f, const std::string& src) {
  const size_t n = f.sample_id.size();
  auto per_rollout = [&](size_t size, const char* name) {
    if (size != n) OPDLM_FAIL_AT(src, name, "has ", size, " entries, expected num_rollouts = ", n);
  };
  per_rollout(f.stopped_at_eos.size(), "stopped_at_eos");
  per_rollout(f.denoise_forwards.size(), "denoise_forwards");
  per_rollout(f.commit_forwards.size(), "commit_forwards");
  check_offsets(f.prompt_offsets, n, f.prompt_ids.size(), src, "prompt_offsets");
  check_offsets(f.response_offsets, n, f.response_ids.size(), src, "response_offsets");
  if (f.step_map.size() != f.response_ids.size())
    OPDLM_FAIL_AT(src, "step_map", "has ", f.step_map.size(), " entries, response_ids ", f.response_ids.size());
  std::vector<Rollout> rs(n);
  for (size_t i = 0; i < n; ++i) {
    Rollout& r = rs[i];
    r.sample_id = f.sample_id[i];
    r.prompt.assign(f.prompt_ids.begin() + f.prompt_offsets[i], f.prompt_ids.begin() + f.prompt_offsets[i + 1]);
    r.response.assign(f.response_ids.begin() + f.response_offsets[i],
                      f.response_ids.begin() + f.response_offsets[i + 1]);
    r.step_map.assign(f.step_map.begin() + f.response_offsets[i], f.step_map.begin() + f.response_offsets[i + 1]);
    r.stopped_at_eos = f.stopped_at_eos[i] != 0;
    r.denoise_forwards = f.denoise_forwards[i];
    r.commit_forwards = f.commit_forwards[i];
  }
  rollouts_ = std::move(rs);
}

nlohmann::json RolloutBuffer::to_json() const {
  const FlatRollouts f = to_flat();
  return nlohmann::json{{"format", kFormat},
                        {"version", kVersion},
                        {"weight_version", weight_version_},
                        {"sampler", sampler_options_to_json(sampler_)},
                        {"num_rollouts", rollouts_.size()},
                        {"sample_id", f.sample_id},
                        {"prompt_offsets", f.prompt_offsets},
                        {"prompt_ids", f.prompt_ids},
                        {"response_offsets", f.response_offsets},
                        {"response_ids", f.response_ids},
                        {"step_map", f.step_map},
                        {"stopped_at_eos", f.stopped_at_eos},
                        {"denoise_forwards", f.denoise_forwards},
                        {"commit_forwards", f.commit_forwards}};
}

RolloutBuffer RolloutBuffer::from_json(const nlohmann::json& j, const std::string& src) {
  if (!j.is_object()) OPDLM_FAIL_AT(src, "", "a rollout buffer must be a JSON object");
  if (!j.contains("format") || j["format"] != kFormat)
    OPDLM_FAIL_AT(src, "format", "expected \"", kFormat, "\"");
  if (!j.contains("version") || j["version"] != kVersion)
    OPDLM_FAIL_AT(src, "version", "unsupported version ", j.value("version", nlohmann::json()).dump(), " (expected ", kVersion, ")");
  if (!j.contains("weight_version") || !j["weight_version"].is_number_integer())
    OPDLM_FAIL_AT(src, "weight_version", "expected an integer");
  if (!j.contains("sampler")) OPDLM_FAIL_AT(src, "sampler", "required field is missing");
  RolloutBuffer buf(j["weight_version"].get<int64_t>(), sampler_options_from_json(j["sampler"], src + ": sampler"));
  FlatRollouts f;
  f.sample_id = array_of<uint32_t>(j, "sample_id", src);
  f.prompt_offsets = array_of<int64_t>(j, "prompt_offsets", src);
  f.prompt_ids = array_of<int32_t>(j, "prompt_ids", src);
  f.response_offsets = array_of<int64_t>(j, "response_offsets", src);
  f.response_ids = array_of<int32_t>(j, "response_ids", src);
  f.step_map = array_of<int32_t>(j, "step_map", src);
  f.stopped_at_eos = array_of<uint8_t>(j, "stopped_at_eos", src);
  f.denoise_forwards = array_of<int64_t>(j, "denoise_forwards", src);
  f.commit_forwards = array_of<int64_t>(j, "commit_forwards", src);
  if (!j.contains("num_rollouts") || !j["num_rollouts"].is_number_integer() ||
      j["num_rollouts"].get<int64_t>() != static_cast<int64_t>(f.sample_id.size()))
    OPDLM_FAIL_AT(src, "num_rollouts", "missing or different from the ", f.sample_id.size(), " sample ids");
  buf.assign_flat(f, src);
  return buf;
}

}  // namespace opdlm::diffusion
