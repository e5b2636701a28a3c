// Block-diffusion decoding (algorithm.md A 1, B 3): a batch of prompts of different lengths is
// prefilled with the block-causal mask, then the response is generated block by block (b fresh
// [MASK] slots from the first response position on), each block denoised in at most s steps and
// committed to an exact KV cache. Records per token the global step that revealed it (step map).
// Draws are keyed by (seed, rollout_token, step, sample id, position): a sample decodes the same in
// any batch. A second implementation without the cache (bd_generate_reference) exists for tests.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <vector>

#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/sampling.hpp"

namespace opdlm::diffusion {

// Which masked slots a denoising step reveals (n_t = quota(b, s, t), clamped to the masked count m;
// ties in confidence / entropy are broken by the lower slot index):
//   sequential:             the n_t leftmost masked slots.
//   low_confidence_static:  the n_t masked slots with the highest confidence.
//   low_confidence_dynamic: every masked slot with confidence > tau (strict); if fewer than n_t
//                           qualify, the top n_t by confidence instead.
//   entropy_bounded:        masked slots sorted by increasing entropy H (of the unfiltered
//                           temperature-1 softmax, nats); reveal the longest prefix whose summed
//                           entropy is <= entropy_bound, but at least max(1, n_t) slots.
// Every strategy reveals >= n_t slots and the quotas sum to b, so a block is always fully revealed
// within s steps. As a guard, the last step (t = s-1) reveals every slot still masked with its
// latest draw.
enum class Strategy : uint8_t { sequential, low_confidence_static, low_confidence_dynamic, entropy_bounded };

const char* strategy_name(Strategy s);
// "sequential", "low_confidence_static" (alias "static"), "low_confidence_dynamic" (alias
// "dynamic"), "entropy_bounded" (alias "entropy"); Error naming `field` otherwise.
Strategy parse_strategy(const std::string& name, const std::string& field = "strategy");

// Slots to reveal at step t (0-based) of s: b split over s as evenly as possible, the extra ones to
// the first steps (b=4, s=3 -> 2,1,1; b=2, s=4 -> 1,1,0,0).
int64_t step_quota(int64_t b, int64_t s, int64_t t);

struct SamplerOptions {
  int64_t block_size = 4;       // b
  int64_t steps_per_block = 4;  // s
  int64_t max_new_tokens = 64;  // response limit (the last block is decoded whole, then cut)
  // 0: the model's max_position_embeddings. A prompt of >= max_context tokens is rejected; others
  // get at most max_context - prompt length response tokens.
  int64_t max_context = 0;
  Strategy strategy = Strategy::low_confidence_dynamic;
  double tau = 0.9;            // low_confidence_dynamic threshold
  double entropy_bound = 1.0;  // entropy_bounded: gamma, in nats
  ops::SamplingParams sampling;  // temperature 0 = greedy
  int32_t mask_id = -1;          // required: the [MASK] token id
  int32_t eos_id = -1;           // -1: never stop early
  int32_t pad_id = 0;            // fills left padding (never attended)
  uint32_t seed = 0;
  uint32_t step = 0;  // RNG step field (the RL step)

  // Error naming the field; vocab = the model's vocabulary size.
  void validate(int64_t vocab) const;
  bool operator==(const SamplerOptions&) const;  // field by field (SamplingParams has no ==)
};

// Every field, strategy by name; from_json requires every field (names the missing one).
nlohmann::json sampler_options_to_json(const SamplerOptions& o);
SamplerOptions sampler_options_from_json(const nlohmann::json& j, const std::string& source = "sampler");

// What a denoising step knows about one still-masked slot: its draw, the draw's confidence (unfiltered
// temperature-1 softmax) and the entropy of that softmax (nats; filled for entropy_bounded only).
struct SlotDraw {
  int32_t token = -1;
  float confidence = 0.0f;
  double entropy = 0.0;
};

// The reveal rule of `o.strategy` at step t (0-based) of a block: indices into `masked` (the block's
// still-masked slots in slot order), ascending. At t = s-1 every index.
std::vector<size_t> select_reveals(std::span<const SlotDraw> masked, const SamplerOptions& o, int64_t t);

// Per-sample outcome: a bad prompt is reported here and skipped, never thrown.
enum class RolloutStatus : uint8_t { ok, empty_prompt, prompt_too_long, bad_token_id };
const char* rollout_status_name(RolloutStatus s);

struct Rollout {
  RolloutStatus status = RolloutStatus::ok;
  std::string error;  // why, when status != ok
  uint32_t sample_id = 0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> response;  // EOS included when reached; nothing after it
  // step_map[j]: the sequence's global denoising step (1-based, counted across blocks) that revealed
  // response[j]; non-decreasing, shared by tokens revealed in the same step.
  std::vector<int32_t> step_map;
  bool stopped_at_eos = false;
  // Denoising forwards this sequence took part in (= its global step count), and commit forwards
  // that wrote its blocks' K/V. A block is committed only when the sequence goes on to another
  // block (the final block's K/V would never be read). The prompt prefill is counted in neither.
  int64_t denoise_forwards = 0;
  int64_t commit_forwards = 0;

  bool ok() const { return status == RolloutStatus::ok; }
  bool operator==(const Rollout&) const = default;
};

// Decodes prompts[i] with draws keyed by sample_ids[i]. Rows are left-padded to the longest valid
// prompt on one shared cache time axis, so every row's response starts at the same slot and blocks
// advance in lock-step; a row whose block is already revealed (or whose sequence ended) stays in the
// batch with its outputs ignored (no logits are computed for it).
// Draws exclude the [MASK] id (a revealed slot always holds a real token); confidence and entropy
// are those of the unfiltered temperature-1 softmax over the whole vocabulary.
// RNG: the draw for response position j (0-based) at step t (0-based within its block) uses
// CounterRng({seed, rollout_token, step, sample_id, position = j * s + t}), and vocabulary id v
// takes stream index v (ops::sample_token). Distinct for every (j, t), independent of the batch and
// of the prompt length. Errors (thrown) only for bad options or mismatched sizes.
std::vector<Rollout> bd_generate(const model::Qwen3Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                 std::span<const uint32_t> sample_ids, const SamplerOptions& opts);

// The same decoding without a KV cache, one sequence at a time: every forward recomputes prompt +
// committed blocks + current block with the full block_causal mask (Qwen3Model::forward). Slow; it
// exists to check bd_generate. Counts the forwards bd_generate would make.
std::vector<Rollout> bd_generate_reference(const model::Qwen3Model& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           std::span<const uint32_t> sample_ids, const SamplerOptions& opts);

}  // namespace opdlm::diffusion
