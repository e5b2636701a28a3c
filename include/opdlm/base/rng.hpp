// Counter-based randomness: Philox4x32-10 (Salmon et al., SC'11) keyed by (seed, purpose) with a
// counter of (step, global sample id, position, draw index). No state, no rank: the same key gives
// the same numbers on any layout and after any restart.
#pragma once

#include <array>
#include <cstdint>

namespace opdlm {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// The raw block function (10 rounds), checked against Random123's known-answer vectors.
PhiloxCounter philox4x32_10(PhiloxCounter ctr, PhiloxKey key);

// What a draw is for; each purpose is an independent stream. Values are stable: they are part of
// reproducibility across versions and stored checkpoints. Append only.
enum class RngPurpose : uint32_t {
  test = 0,
  param_init = 1,
  data_shuffle = 2,
  rollout_token = 3,   // sampler token draws
  state_select = 4,    // one-state-per-block choice
  random_mask = 5,     // rm-kl / rm-ce corruption
  prompt_order = 6,
  data_generate = 7,   // synthetic data (arithmetic problems, distractors)
};

// Everything a draw is keyed by. `index` enumerates the draws made for one (step, sample, position).
struct RngKey {
  uint32_t seed = 0;
  RngPurpose purpose = RngPurpose::test;
  uint32_t step = 0;
  uint32_t sample_id = 0;
  uint32_t position = 0;
};

// A read-only view of one key's stream: word i of the stream is word (i % 4) of the Philox block
// with counter (i / 4, position, sample_id, step). Random access; `Cursor` walks it in order.
class CounterRng {
 public:
  explicit CounterRng(const RngKey& k) : key_(k) {}

  uint32_t u32(uint32_t i) const;
  // Uniform in [0, 1) with 24 random bits (every value a float represents exactly).
  float uniform(uint32_t i) const;
  // Uniform in (0, 1): never 0, so log() is finite (Gumbel, exponential draws).
  float uniform_open(uint32_t i) const;
  double uniform_open_f64(uint32_t i) const;  // 53 bits from words 2i, 2i+1
  // Standard Gumbel(0, 1) from uniform_open_f64(i): -log(-log(u)).
  double gumbel(uint32_t i) const;
  // Standard normal by Box-Muller from uniform_open_f64(2i) and uniform_open_f64(2i + 1).
  double normal(uint32_t i) const;

  // Sequential reader that also supports rejection sampling (which consumes a variable count).
  class Cursor {
   public:
    explicit Cursor(const CounterRng& r, uint32_t start = 0) : rng_(&r), next_(start) {}
    uint32_t u32() { return rng_->u32(next_++); }
    float uniform() { return rng_->uniform(next_++); }
    // Uniform integer in [0, n) without modulo bias (Lemire's multiply-and-reject).
    uint32_t below(uint32_t n);
    uint32_t consumed() const { return next_; }

   private:
    const CounterRng* rng_;
    uint32_t next_;
  };

  const RngKey& key() const { return key_; }

 private:
  RngKey key_;
};

// Categorical draw by Gumbel-max over logits[0..n): argmax_v (logits[v] + G(v)), where G(v) uses
// stream index vocab_offset + v, so a vocabulary split into shards gives the same winner as the
// whole one (each shard takes its local argmax, then the global max wins). Returns the index in
// [0, n) and writes the perturbed score of the winner.
int64_t categorical_gumbel(const CounterRng& rng, const float* logits, int64_t n, uint32_t vocab_offset,
                           double* winner_score = nullptr);

// Categorical draw by inverse CDF of one uniform (stream index `index`) over unnormalised
// non-negative weights; -1 if every weight is zero.
int64_t categorical_inverse_cdf(const CounterRng& rng, const float* weights, int64_t n, uint32_t index = 0);

}  // namespace opdlm
