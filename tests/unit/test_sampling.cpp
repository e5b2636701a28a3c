// Tests for ops/sampling: each filter's kept set, greedy ties, draw frequencies against the
// filtered softmax, confidence under the raw softmax, determinism per key, and parameter errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "opdlm/ops/sampling.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::ops;

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<bool> kept(const std::vector<float>& logits, const SamplingParams& p) {
  std::vector<float> out(logits.size());
  filter_logits(logits.data(), static_cast<int64_t>(logits.size()), p, out.data());
  std::vector<bool> k;
  for (float x : out) k.push_back(x != -kInf);
  return k;
}
}  // namespace

TEST(Sampling, TopKKeepsTiesAtTheBoundary) {
  SamplingParams p;
  p.top_k = 2;
  EXPECT_EQ(kept({1, 5, 3, 5, 0}, p), (std::vector<bool>{false, true, false, true, false}));
  EXPECT_EQ(kept({1, 5, 3, 3, 0}, p), (std::vector<bool>{false, true, true, true, false}));
  p.top_k = 10;  // larger than V: no filtering
  EXPECT_EQ(kept({1, 2}, p), (std::vector<bool>{true, true}));
}

TEST(Sampling, TopPKeepsTheSmallestSetReachingP) {
  // Probabilities 0.5, 0.3, 0.2 (logits are their logs).
  const std::vector<float> l = {std::log(0.2f), std::log(0.5f), std::log(0.3f)};
  SamplingParams p;
  p.top_p = 0.5;
  EXPECT_EQ(kept(l, p), (std::vector<bool>{false, true, false}));
  p.top_p = 0.6;
  EXPECT_EQ(kept(l, p), (std::vector<bool>{false, true, true}));
  p.top_p = 0.81;
  EXPECT_EQ(kept(l, p), (std::vector<bool>{true, true, true}));
  p.top_p = 0.01;  // always at least one token
  EXPECT_EQ(kept(l, p), (std::vector<bool>{false, true, false}));
}

TEST(Sampling, GreedyKeepsAllMaximaAndDrawsAmongThem) {
  SamplingParams p;
  p.temperature = 0;
  const std::vector<float> l = {1, 4, 4, -2};
  EXPECT_EQ(kept(l, p), (std::vector<bool>{false, true, true, false}));
  std::vector<float> scratch(4);
  int ones = 0;
  for (uint32_t s = 0; s < 2000; ++s) {
    TokenDraw d = sample_token(l.data(), 4, p, CounterRng({1, RngPurpose::rollout_token, 0, s, 0}), scratch.data());
    ASSERT_TRUE(d.token == 1 || d.token == 2);
    ones += d.token == 1;
    // Confidence is the raw softmax probability of the drawn token.
    const double z = std::exp(1.0) + 2 * std::exp(4.0) + std::exp(-2.0);
    ASSERT_NEAR(d.confidence, std::exp(4.0) / z, 1e-6);
  }
  EXPECT_NEAR(ones / 2000.0, 0.5, 0.05);
}

TEST(Sampling, DrawFrequenciesFollowTheTemperedSoftmax) {
  const std::vector<float> l = {0.0f, 1.0f, 2.0f};
  SamplingParams p;
  p.temperature = 2.0;
  std::vector<float> scratch(3);
  std::vector<int> counts(3, 0);
  const int n = 30000;
  for (uint32_t s = 0; s < n; ++s)
    counts[sample_token(l.data(), 3, p, CounterRng({9, RngPurpose::rollout_token, 0, s, 0}), scratch.data()).token]++;
  const double z = 1 + std::exp(0.5) + std::exp(1.0);
  EXPECT_NEAR(counts[0] / double(n), 1 / z, 0.01);
  EXPECT_NEAR(counts[1] / double(n), std::exp(0.5) / z, 0.01);
  EXPECT_NEAR(counts[2] / double(n), std::exp(1.0) / z, 0.01);
}

TEST(Sampling, SameKeySameTokenAndFilteredTokensNeverDrawn) {
  std::vector<float> l(50);
  for (int v = 0; v < 50; ++v) l[v] = std::sin(v * 1.3f);
  SamplingParams p;
  p.top_k = 5;
  p.top_p = 0.9;
  std::vector<float> scratch(50), filt(50);
  filter_logits(l.data(), 50, p, filt.data());
  for (uint32_t s = 0; s < 500; ++s) {
    CounterRng r({3, RngPurpose::rollout_token, 7, s, 4});
    TokenDraw a = sample_token(l.data(), 50, p, r, scratch.data());
    TokenDraw b = sample_token(l.data(), 50, p, r, scratch.data());
    ASSERT_EQ(a.token, b.token);
    ASSERT_NE(filt[a.token], -kInf);
  }
}

TEST(Sampling, BadParametersNameTheKey) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_ERROR_HAS(p.validate(), "sampling.temperature");
  p = {};
  p.top_p = 0;
  EXPECT_ERROR_HAS(p.validate(), "sampling.top_p");
  p = {};
  p.top_k = -3;
  EXPECT_ERROR_HAS(p.validate(), "sampling.top_k");
}
