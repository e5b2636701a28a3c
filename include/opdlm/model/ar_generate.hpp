// Autoregressive decoding with the KV cache: a batch of prompts of different lengths (left-padded),
// greedy / temperature / top-k / top-p, stop at EOS or the length limit. Draws are keyed by
// (seed, rollout_token, step, sample id, position): a sample decodes the same in any batch.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/sampling.hpp"

namespace opdlm::model {

struct ArGenerateOptions {
  int64_t max_new_tokens = 64;
  ops::SamplingParams sampling;  // temperature 0 = greedy
  int32_t eos_id = -1;           // -1: never stop early
  int32_t pad_id = 0;            // fills left padding (never attended)
  uint32_t seed = 0;
  uint32_t step = 0;             // RNG step field (e.g. the RL step)
};

struct ArGeneration {
  std::vector<int32_t> tokens;  // generated ids (EOS included when reached)
  bool stopped_at_eos = false;
  int64_t forwards = 0;         // model calls that produced this sequence's tokens
};

// prompts[i] must be non-empty; sample_ids[i] keys sequence i's draws.
std::vector<ArGeneration> ar_generate(const Qwen3Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                      std::span<const uint32_t> sample_ids, const ArGenerateOptions& opts);

// log p(ids[t] | ids[<t]) for t = 1..n-1 under a causal pass (n-1 values).
std::vector<double> token_logprobs(const Qwen3Model& model, std::span<const int32_t> ids);

}  // namespace opdlm::model
