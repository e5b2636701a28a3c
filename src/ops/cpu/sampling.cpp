// Temperature / top-k / top-p filtering, Gumbel-max draws and confidences on one row of logits.
#include "opdlm/ops/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "opdlm/base/error.hpp"

namespace opdlm::ops {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}

void SamplingParams::validate() const {
  if (!(temperature >= 0) || !std::isfinite(temperature))
    OPDLM_FAIL_AT("", "sampling.temperature", "must be a finite value >= 0, got ", temperature);
  if (top_k < 0) OPDLM_FAIL_AT("", "sampling.top_k", "must be >= 0 (0 = off), got ", top_k);
  if (!(top_p > 0 && top_p <= 1)) OPDLM_FAIL_AT("", "sampling.top_p", "must be in (0, 1], got ", top_p);
}

void filter_logits(const float* logits, int64_t V, const SamplingParams& p, float* out) {
  OPDLM_CHECK(V > 0, "empty logits row");
  if (p.temperature == 0) {
    // Greedy: only the maximal logit(s) survive, at equal weight.
    float mx = *std::max_element(logits, logits + V);
    for (int64_t v = 0; v < V; ++v) out[v] = logits[v] == mx ? 0.0f : kNegInf;
    return;
  }
  const float inv_t = static_cast<float>(1.0 / p.temperature);
  for (int64_t v = 0; v < V; ++v) out[v] = logits[v] * inv_t;
  if (p.top_k > 0 && p.top_k < V) {
    std::vector<float> tmp(out, out + V);
    std::nth_element(tmp.begin(), tmp.begin() + (p.top_k - 1), tmp.end(), std::greater<float>());
    const float kth = tmp[static_cast<size_t>(p.top_k - 1)];
    for (int64_t v = 0; v < V; ++v)
      if (out[v] < kth) out[v] = kNegInf;
  }
  if (p.top_p < 1.0) {
    // Descending by probability (ties by id); keep tokens until the kept mass reaches top_p.
    std::vector<int64_t> order;
    order.reserve(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; ++v)
      if (out[v] != kNegInf) order.push_back(v);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return out[a] > out[b] || (out[a] == out[b] && a < b); });
    const double mx = out[order.front()];
    double total = 0;
    for (int64_t v : order) total += std::exp(double(out[v]) - mx);
    double cum = 0;
    size_t keep = 0;
    while (keep < order.size() && cum < p.top_p * total) cum += std::exp(double(out[order[keep++]]) - mx);
    for (size_t i = std::max<size_t>(keep, 1); i < order.size(); ++i) out[order[i]] = kNegInf;
  }
}

int32_t draw_token(const float* logits, int64_t V, const SamplingParams& params, const CounterRng& rng,
                   float* scratch) {
  filter_logits(logits, V, params, scratch);
  const int32_t token = static_cast<int32_t>(categorical_gumbel(rng, scratch, V, 0));
  OPDLM_CHECK(token >= 0, "every logit was filtered out");
  return token;
}

TokenDraw sample_token(const float* logits, int64_t V, const SamplingParams& params, const CounterRng& rng,
                       float* scratch) {
  TokenDraw d;
  d.token = draw_token(logits, V, params, rng, scratch);
  // Confidence under the raw softmax (temperature 1, no filters), computed stably in double.
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(logits[v]));
  double z = 0;
  for (int64_t v = 0; v < V; ++v) z += std::exp(double(logits[v]) - mx);
  d.confidence = static_cast<float>(std::exp(double(logits[d.token]) - mx) / z);
  return d;
}

}  // namespace opdlm::ops
