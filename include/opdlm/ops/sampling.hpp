// Token sampling for one row of logits: temperature, top-k, top-p, a keyed Gumbel-max draw, and the
// confidence the block-diffusion sampler ranks by (algorithm.md B 3.3). Shared by AR and DLM decoding.
#pragma once

#include <cstdint>

#include "opdlm/base/rng.hpp"

namespace opdlm::ops {

struct SamplingParams {
  double temperature = 1.0;  // 0: keep only the arg-max logit(s) (greedy; ties drawn uniformly)
  int64_t top_k = 0;         // 0: off. Keeps every logit >= the k-th largest (ties kept, as HF)
  double top_p = 1.0;        // 1: off. Smallest top set whose probability reaches top_p (>= 1 token)
  void validate() const;     // Error naming the parameter
};

struct TokenDraw {
  int32_t token = -1;
  // Probability of `token` under the UNFILTERED temperature-1 softmax of the logits.
  float confidence = 0.0f;
};

// Filters logits[0..V) by the params into `scratch` (V floats, -inf = removed), draws one token by
// Gumbel-max with the noise of vocabulary id v at stream index v of `rng`, and reports its confidence.
// Reproducible: the same logits, params and key always give the same token.
TokenDraw sample_token(const float* logits, int64_t V, const SamplingParams& params, const CounterRng& rng,
                       float* scratch);

// sample_token's token without its confidence (one pass over the vocabulary less): for callers that
// do not need the confidence or compute it themselves.
int32_t draw_token(const float* logits, int64_t V, const SamplingParams& params, const CounterRng& rng,
                   float* scratch);

// The filtering step alone (exposed for tests and the vocab-parallel path): writes the filtered,
// temperature-scaled logits to `out` (-inf where removed).
void filter_logits(const float* logits, int64_t V, const SamplingParams& params, float* out);

}  // namespace opdlm::ops
