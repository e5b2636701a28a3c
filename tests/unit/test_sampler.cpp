// Tests for the block-diffusion sampler and the rollout buffer: the cached batch decoder against the
// recompute-everything reference (every strategy, greedy and sampled, f32 and f64, ragged prompts),
// batch independence, the reveal rules and quotas, EOS truncation, step maps, forward counts,
// per-sample rejection of bad prompts, and the buffer's flat JSON round trip.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "opdlm/diffusion/rollout_buffer.hpp"
#include "opdlm/diffusion/sampler.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::diffusion;

namespace {

constexpr int64_t kVocab = 24;
constexpr int32_t kMask = kVocab - 1;

model::Qwen3Model tiny_model(DType dt, uint32_t seed = 11) {
  model::Qwen3Config c = test::tiny_qwen3_config(kVocab, 16, 32, 2, 1, 8);
  c.mask_token_id = kMask;
  model::Qwen3Weights w(c, dt);
  w.init_random(seed, 0.3);  // peaked enough that confidences and entropies differ between slots
  return model::Qwen3Model::teacher(std::move(w));
}

// Prompt lengths 1, 3, 5, 6, 8: several not multiples of b; ids avoid the mask.
std::vector<std::vector<int32_t>> ragged_prompts() {
  std::vector<std::vector<int32_t>> ps;
  const int lens[] = {5, 1, 8, 3, 6};
  for (int i = 0; i < 5; ++i) {
    std::vector<int32_t> p;
    for (int t = 0; t < lens[i]; ++t) p.push_back(static_cast<int32_t>((7 * i + 5 * t + 3) % (kVocab - 1)));
    ps.push_back(p);
  }
  return ps;
}

std::vector<uint32_t> ids_for(size_t n, uint32_t first = 100) {
  std::vector<uint32_t> v;
  for (size_t i = 0; i < n; ++i) v.push_back(first + static_cast<uint32_t>(3 * i));
  return v;
}

SamplerOptions opts(Strategy st, int64_t b, int64_t s, double temperature, int64_t max_new = 10) {
  SamplerOptions o;
  o.block_size = b;
  o.steps_per_block = s;
  o.max_new_tokens = max_new;
  o.strategy = st;
  o.tau = 0.3;            // the tiny model's confidences straddle it
  o.entropy_bound = 3.5;  // about one to two slots' entropy: reveals vary per step
  o.sampling.temperature = temperature;
  o.mask_id = kMask;
  o.eos_id = -1;
  o.pad_id = 0;
  o.seed = 5;
  o.step = 2;
  return o;
}

std::string show(const Rollout& r) {
  std::string s = "response";
  for (int32_t t : r.response) s += " " + std::to_string(t);
  s += " | steps";
  for (int32_t t : r.step_map) s += " " + std::to_string(t);
  return s + " | fwd " + std::to_string(r.denoise_forwards) + "+" + std::to_string(r.commit_forwards);
}

void expect_same(const std::vector<Rollout>& a, const std::vector<Rollout>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].status, b[i].status) << what << " sample " << i;
    EXPECT_EQ(a[i].response, b[i].response) << what << " sample " << i << "\n" << show(a[i]) << "\n" << show(b[i]);
    EXPECT_EQ(a[i].step_map, b[i].step_map) << what << " sample " << i;
    EXPECT_EQ(a[i].stopped_at_eos, b[i].stopped_at_eos) << what << " sample " << i;
    EXPECT_EQ(a[i].denoise_forwards, b[i].denoise_forwards) << what << " sample " << i;
    EXPECT_EQ(a[i].commit_forwards, b[i].commit_forwards) << what << " sample " << i;
  }
}

// Step-map invariants: 1-based, every value of block k below every value of block k+1, values of a
// block inside [first, first + s), and without EOS (and whole blocks) the counts follow from the map.
void expect_step_map_valid(const Rollout& r, int64_t b, int64_t s, const std::string& what) {
  ASSERT_EQ(r.step_map.size(), r.response.size()) << what;
  int32_t prev_max = 0;
  for (size_t k0 = 0; k0 < r.step_map.size(); k0 += size_t(b)) {
    const auto first = r.step_map.begin() + std::ptrdiff_t(k0);
    const auto last = r.step_map.begin() + std::ptrdiff_t(std::min(r.step_map.size(), k0 + size_t(b)));
    const int32_t lo = *std::min_element(first, last), hi = *std::max_element(first, last);
    EXPECT_GE(lo, prev_max + 1) << what;
    if (last - first == b)  // a cut block may have lost the tokens of its first step
      EXPECT_EQ(lo, prev_max + 1) << what << " block at " << k0 << ": the first step of a block reveals a token";
    EXPECT_LT(hi - lo, s) << what;
    prev_max = hi;
  }
  EXPECT_GE(r.denoise_forwards, prev_max) << what;  // tokens cut after EOS / the limit took steps too
  if (!r.stopped_at_eos && !r.response.empty()) {
    if (int64_t(r.response.size()) % b == 0) EXPECT_EQ(r.denoise_forwards, prev_max) << what;
    EXPECT_EQ(r.commit_forwards, (int64_t(r.response.size()) + b - 1) / b - 1) << what;
  }
}

}  // namespace

TEST(SamplerQuota, SplitsEvenlyExtrasFirst) {
  EXPECT_EQ(step_quota(4, 3, 0), 2);
  EXPECT_EQ(step_quota(4, 3, 1), 1);
  EXPECT_EQ(step_quota(4, 3, 2), 1);
  for (int t = 0; t < 4; ++t) EXPECT_EQ(step_quota(4, 4, t), 1);
  EXPECT_EQ(step_quota(2, 4, 0), 1);
  EXPECT_EQ(step_quota(2, 4, 1), 1);
  EXPECT_EQ(step_quota(2, 4, 2), 0);
  EXPECT_EQ(step_quota(5, 2, 0), 3);
  EXPECT_EQ(step_quota(5, 2, 1), 2);
  EXPECT_EQ(step_quota(1, 1, 0), 1);
}

TEST(SamplerReveal, RulesPerStrategy) {
  // Four masked slots: confidences and entropies.
  const std::vector<SlotDraw> d = {{1, 0.20f, 2.0}, {2, 0.95f, 0.3}, {3, 0.50f, 1.0}, {4, 0.95f, 0.2}};
  SamplerOptions o = opts(Strategy::low_confidence_static, 4, 3, 1.0);  // quotas 2, 1, 1
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{1, 3}));        // top 2, tie at 0.95 both in
  EXPECT_EQ(select_reveals(d, o, 1), (std::vector<size_t>{1}));           // tie: the lower slot
  EXPECT_EQ(select_reveals(d, o, 2), (std::vector<size_t>{0, 1, 2, 3}));  // last step: the rest
  o.strategy = Strategy::sequential;
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{0, 1}));
  o.strategy = Strategy::low_confidence_dynamic;
  o.tau = 0.4;
  EXPECT_EQ(select_reveals(d, o, 1), (std::vector<size_t>{1, 2, 3}));  // all three > 0.4
  o.tau = 0.5;
  EXPECT_EQ(select_reveals(d, o, 1), (std::vector<size_t>{1, 3}));  // strict: 0.5 is not > 0.5
  o.tau = 0.99;
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{1, 3}));  // none qualify: top n_t = 2
  o.tau = 0.0;
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{0, 1, 2, 3}));
  o.strategy = Strategy::entropy_bounded;
  o.entropy_bound = 0.5;  // 0.2 + 0.3 <= 0.5, + 1.0 is over
  EXPECT_EQ(select_reveals(d, o, 1), (std::vector<size_t>{1, 3}));
  o.entropy_bound = 0.1;  // nothing fits: at least max(1, n_t)
  EXPECT_EQ(select_reveals(d, o, 1), (std::vector<size_t>{3}));
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{1, 3}));
  o.entropy_bound = 100;
  EXPECT_EQ(select_reveals(d, o, 0), (std::vector<size_t>{0, 1, 2, 3}));
}

TEST(SamplerReveal, QuotaClampedToMaskedSlots) {
  // b = 6, s = 3: quota 2 at step 1, but only one slot is still masked.
  SamplerOptions o = opts(Strategy::low_confidence_static, 6, 3, 1.0);
  const std::vector<SlotDraw> one = {{7, 0.1f, 1.0}};
  EXPECT_EQ(select_reveals(one, o, 1), (std::vector<size_t>{0}));
  o.strategy = Strategy::low_confidence_dynamic;
  EXPECT_EQ(select_reveals(one, o, 1), (std::vector<size_t>{0}));
  o.strategy = Strategy::sequential;
  EXPECT_EQ(select_reveals(one, o, 0), (std::vector<size_t>{0}));
  EXPECT_TRUE(select_reveals(std::span<const SlotDraw>(), o, 0).empty());
  // End to end: dynamic with a low threshold reveals more than the quota early, so later quotas
  // exceed the masked count; the rollout still matches the reference and every slot is revealed once.
  const auto m = tiny_model(DType::f64);
  o.tau = 0.02;
  o.strategy = Strategy::low_confidence_dynamic;
  o.max_new_tokens = 24;
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  const auto got = bd_generate(m, ps, ids, o);
  expect_same(got, bd_generate_reference(m, ps, ids, o), "clamp");
  int clamped = 0;  // blocks whose first step left fewer masked slots than the second step's quota 2
  for (const auto& r : got) {
    EXPECT_EQ(r.response.size(), 24u);
    expect_step_map_valid(r, 6, 3, "clamp");
    for (int k = 0; k < 4; ++k) {
      const auto first = r.step_map.begin() + 6 * k, last = first + 6;
      clamped += std::count(first, last, *std::min_element(first, last)) == 5;
    }
  }
  EXPECT_GT(clamped, 0) << "no block exercised the clamp";
}

TEST(SamplerEquivalence, CachedMatchesReferenceEveryStrategy) {
  // Every strategy x greedy / sampled x b in {1,2,4} x s in {1,2,4} x {f32, f64}, ragged prompts,
  // an EOS that occurs, so rows finish at different blocks while others go on.
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  int64_t eos_stops = 0, rollouts = 0, multi_reveal_steps = 0;
  for (DType dt : {DType::f32, DType::f64}) {
    const auto m = tiny_model(dt);
    for (Strategy st : {Strategy::sequential, Strategy::low_confidence_static, Strategy::low_confidence_dynamic,
                        Strategy::entropy_bounded})
      for (double temp : {0.0, 1.0})
        for (int64_t b : {1, 2, 4})
          for (int64_t s : {1, 2, 4}) {
            SamplerOptions o = opts(st, b, s, temp, 9);
            o.eos_id = 4;
            const std::string what = std::string(dtype_name(dt)) + " " + strategy_name(st) + " T=" +
                                     std::to_string(temp) + " b=" + std::to_string(b) + " s=" + std::to_string(s);
            const auto got = bd_generate(m, ps, ids, o);
            expect_same(got, bd_generate_reference(m, ps, ids, o), what);
            for (const auto& r : got) {
              ASSERT_TRUE(r.ok()) << what;
              EXPECT_LE(r.response.size(), 9u) << what;
              EXPECT_EQ(std::count(r.response.begin(), r.response.end(), kMask), 0) << what << ": [MASK] drawn";
              expect_step_map_valid(r, b, s, what);
              eos_stops += r.stopped_at_eos;
              ++rollouts;
              for (size_t j = 1; j < r.step_map.size(); ++j) multi_reveal_steps += r.step_map[j] == r.step_map[j - 1];
            }
          }
  }
  EXPECT_GT(eos_stops, 0) << "no rollout met the EOS: finished rows are not exercised";
  EXPECT_LT(eos_stops, rollouts);
  EXPECT_GT(multi_reveal_steps, 0);
}

TEST(SamplerEquivalence, TopKTopPAndLongerBlocks) {
  const auto m = tiny_model(DType::f32, 3);
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  for (Strategy st : {Strategy::low_confidence_static, Strategy::low_confidence_dynamic, Strategy::entropy_bounded}) {
    SamplerOptions o = opts(st, 3, 2, 0.8, 11);  // b = 3 does not divide 11; quotas 2, 1
    o.sampling.top_k = 6;
    o.sampling.top_p = 0.9;
    expect_same(bd_generate(m, ps, ids, o), bd_generate_reference(m, ps, ids, o), strategy_name(st));
  }
}

TEST(SamplerBatch, SameSampleIdSameRolloutInAnyBatch) {
  const auto m = tiny_model(DType::f32);
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  SamplerOptions o = opts(Strategy::low_confidence_dynamic, 4, 4, 1.0, 12);
  const auto all = bd_generate(m, ps, ids, o);
  // Each prompt alone, and the batch reversed with an extra long prompt.
  for (size_t i = 0; i < ps.size(); ++i)
    expect_same(bd_generate(m, {ps[i]}, std::vector<uint32_t>{ids[i]}, o), {all[i]}, "alone " + std::to_string(i));
  std::vector<std::vector<int32_t>> rev(ps.rbegin(), ps.rend());
  std::vector<uint32_t> rev_ids(ids.rbegin(), ids.rend());
  rev.push_back(std::vector<int32_t>(13, 2));
  rev_ids.push_back(999);
  const auto r = bd_generate(m, rev, rev_ids, o);
  for (size_t i = 0; i < ps.size(); ++i) expect_same({r[ps.size() - 1 - i]}, {all[i]}, "reversed " + std::to_string(i));
  // A different sample id (or seed, or RL step) draws differently.
  const auto other = bd_generate(m, ps, ids_for(ps.size(), 7), o);
  int differ = 0;
  for (size_t i = 0; i < ps.size(); ++i) differ += other[i].response != all[i].response;
  EXPECT_GT(differ, 0);
}

TEST(SamplerStrategy, StaticWithBEqualsSRevealsOneTokenPerStep) {
  const auto m = tiny_model(DType::f64);
  const auto ps = ragged_prompts();
  for (int64_t b : {2, 4}) {
    SamplerOptions o = opts(Strategy::low_confidence_static, b, b, 1.0, 12);
    for (const auto& r : bd_generate(m, ps, ids_for(ps.size()), o)) {
      ASSERT_EQ(r.response.size(), 12u);
      std::vector<int32_t> sorted = r.step_map;
      std::sort(sorted.begin(), sorted.end());
      for (size_t j = 0; j < sorted.size(); ++j) EXPECT_EQ(sorted[j], int32_t(j + 1));  // a permutation of 1..12
      for (size_t j = 0; j < r.step_map.size(); ++j) EXPECT_EQ((r.step_map[j] - 1) / b, int64_t(j) / b);
      EXPECT_EQ(r.denoise_forwards, 12);
      EXPECT_EQ(r.commit_forwards, 12 / b - 1);
    }
  }
}

TEST(SamplerStrategy, DynamicThresholdExtremes) {
  const auto m = tiny_model(DType::f32);
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  for (double temp : {0.0, 1.0}) {
    // tau = 0: every confidence is > 0, so each block is revealed in one step.
    SamplerOptions o = opts(Strategy::low_confidence_dynamic, 4, 4, temp, 10);
    o.tau = 0.0;
    for (const auto& r : bd_generate(m, ps, ids, o)) {
      for (size_t j = 0; j < r.step_map.size(); ++j) EXPECT_EQ(r.step_map[j], int32_t(j / 4 + 1));
      EXPECT_EQ(r.denoise_forwards, 3);
      EXPECT_EQ(r.commit_forwards, 2);
    }
    // tau > 1: nothing qualifies, the static rule decides.
    o.tau = 1.5;
    SamplerOptions st = o;
    st.strategy = Strategy::low_confidence_static;
    expect_same(bd_generate(m, ps, ids, o), bd_generate(m, ps, ids, st), "tau > 1");
  }
}

TEST(SamplerStrategy, QuotaSplitInRollout) {
  // b = 4, s = 3, static: per block two tokens share the first step, then one each.
  const auto m = tiny_model(DType::f64);
  SamplerOptions o = opts(Strategy::low_confidence_static, 4, 3, 0.0, 8);
  for (const auto& r : bd_generate(m, ragged_prompts(), ids_for(5), o)) {
    ASSERT_EQ(r.step_map.size(), 8u);
    for (int k = 0; k < 2; ++k) {
      std::multiset<int32_t> got(r.step_map.begin() + 4 * k, r.step_map.begin() + 4 * k + 4);
      EXPECT_EQ(got, (std::multiset<int32_t>{3 * k + 1, 3 * k + 1, 3 * k + 2, 3 * k + 3})) << show(r);
    }
    EXPECT_EQ(r.denoise_forwards, 6);
    EXPECT_EQ(r.commit_forwards, 1);
  }
  // Sequential reveals left to right with the same quotas.
  o.strategy = Strategy::sequential;
  for (const auto& r : bd_generate(m, ragged_prompts(), ids_for(5), o))
    EXPECT_EQ(r.step_map, (std::vector<int32_t>{1, 1, 2, 3, 4, 4, 5, 6}));
}

TEST(SamplerStop, EosInsideABlockTruncates) {
  const auto m = tiny_model(DType::f64);
  const auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  SamplerOptions o = opts(Strategy::low_confidence_static, 4, 4, 1.0, 16);
  const auto free_run = bd_generate(m, ps, ids, o);
  // Pick a token whose first occurrence in sample 0 is inside a block (not its last slot).
  const auto& r0 = free_run[0].response;
  int32_t eos = -1;
  size_t at = 0;
  for (size_t j = 0; j < r0.size() && eos < 0; ++j)
    if (j % 4 != 3 && std::find(r0.begin(), r0.begin() + std::ptrdiff_t(j), r0[j]) == r0.begin() + std::ptrdiff_t(j)) {
      eos = r0[j];
      at = j;
    }
  ASSERT_GE(eos, 0);
  o.eos_id = eos;
  const auto cut = bd_generate(m, ps, ids, o);
  expect_same(cut, bd_generate_reference(m, ps, ids, o), "eos");
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& full = free_run[i].response;
    const auto first = std::find(full.begin(), full.end(), eos);
    const size_t n = first == full.end() ? full.size() : size_t(first - full.begin()) + 1;
    EXPECT_EQ(cut[i].response, std::vector<int32_t>(full.begin(), full.begin() + std::ptrdiff_t(n))) << i;
    EXPECT_EQ(cut[i].step_map, std::vector<int32_t>(free_run[i].step_map.begin(),
                                                    free_run[i].step_map.begin() + std::ptrdiff_t(n)));
    EXPECT_EQ(cut[i].stopped_at_eos, first != full.end());
    // The EOS block was denoised (all s steps) but not committed.
    EXPECT_EQ(cut[i].denoise_forwards, int64_t((n + 3) / 4 * 4));
    EXPECT_EQ(cut[i].commit_forwards, int64_t((n + 3) / 4 - 1));
  }
  EXPECT_EQ(cut[0].response.size(), at + 1);
  EXPECT_TRUE(cut[0].stopped_at_eos);
}

TEST(SamplerStop, LengthLimitCutsTheLastBlockAndContext) {
  const auto m = tiny_model(DType::f32);
  const auto ps = ragged_prompts();
  SamplerOptions o = opts(Strategy::low_confidence_dynamic, 4, 4, 1.0, 6);  // the second block is cut at 2
  for (const auto& r : bd_generate(m, ps, ids_for(ps.size()), o)) {
    EXPECT_EQ(r.response.size(), 6u);
    EXPECT_FALSE(r.stopped_at_eos);
    EXPECT_EQ(r.commit_forwards, 1);
  }
  // A context of 10 leaves 10 - P response tokens.
  o.max_context = 10;
  o.max_new_tokens = 20;
  const auto got = bd_generate(m, ps, ids_for(ps.size()), o);
  expect_same(got, bd_generate_reference(m, ps, ids_for(ps.size()), o), "context");
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(got[i].response.size(), 10 - ps[i].size());
  o.max_new_tokens = 0;
  for (const auto& r : bd_generate(m, ps, ids_for(ps.size()), o)) {
    EXPECT_TRUE(r.ok());
    EXPECT_TRUE(r.response.empty());
    EXPECT_EQ(r.denoise_forwards, 0);
  }
}

TEST(SamplerInput, BadPromptsReportedPerSampleAndSkipped) {
  const auto m = tiny_model(DType::f32);
  auto ps = ragged_prompts();
  const auto ids = ids_for(ps.size());
  SamplerOptions o = opts(Strategy::low_confidence_dynamic, 4, 4, 1.0, 8);
  o.max_context = 12;
  const auto good = bd_generate(m, ps, ids, o);
  std::vector<std::vector<int32_t>> mixed = {{}, ps[0], std::vector<int32_t>(12, 1), ps[1], {1, kVocab, 2}, {-1}, ps[2]};
  std::vector<uint32_t> mixed_ids = {1, ids[0], 2, ids[1], 3, 4, ids[2]};
  for (int ref = 0; ref < 2; ++ref) {
    const auto got = ref ? bd_generate_reference(m, mixed, mixed_ids, o) : bd_generate(m, mixed, mixed_ids, o);
    ASSERT_EQ(got.size(), mixed.size());
    EXPECT_EQ(got[0].status, RolloutStatus::empty_prompt);
    EXPECT_EQ(got[2].status, RolloutStatus::prompt_too_long);
    EXPECT_EQ(got[4].status, RolloutStatus::bad_token_id);
    EXPECT_EQ(got[5].status, RolloutStatus::bad_token_id);
    for (size_t i : {0, 2, 4, 5}) {
      EXPECT_FALSE(got[i].error.empty());
      EXPECT_TRUE(got[i].response.empty());
      EXPECT_EQ(got[i].denoise_forwards, 0);
      EXPECT_EQ(got[i].sample_id, mixed_ids[i]);
    }
    EXPECT_NE(got[4].error.find("24"), std::string::npos) << got[4].error;
    expect_same({got[1], got[3], got[6]}, {good[0], good[1], good[2]}, "good rows among bad ones");
  }
  // Only bad prompts: nothing decoded, no exception.
  const auto none = bd_generate(m, {{}, {-3}}, std::vector<uint32_t>{0, 1}, o);
  EXPECT_FALSE(none[0].ok());
  EXPECT_FALSE(none[1].ok());
  EXPECT_TRUE(bd_generate(m, {}, std::vector<uint32_t>{}, o).empty());
}

TEST(SamplerInput, BadOptionsNameTheField) {
  const auto m = tiny_model(DType::f32);
  const std::vector<std::vector<int32_t>> ps = {{1, 2}};
  const std::vector<uint32_t> ids = {0};
  SamplerOptions o = opts(Strategy::sequential, 4, 4, 1.0);
  auto with = [&](auto f) {
    SamplerOptions x = o;
    f(x);
    return x;
  };
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.mask_id = -1; })), "mask_id");
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.block_size = 0; })), "block_size");
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.steps_per_block = 0; })), "steps_per_block");
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.eos_id = kVocab; })), "eos_id");
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.sampling.top_p = 0; })), "top_p");
  EXPECT_ERROR_HAS(bd_generate(m, ps, ids, with([](auto& x) { x.entropy_bound = -1; })), "entropy_bound");
  EXPECT_ERROR_HAS(bd_generate(m, ps, std::vector<uint32_t>{0, 1}, o), "2 sample ids for 1 prompts");
  EXPECT_ERROR_HAS(parse_strategy("greedy"), "unknown strategy 'greedy'");
  EXPECT_EQ(parse_strategy("static"), Strategy::low_confidence_static);
  EXPECT_EQ(parse_strategy("dynamic"), Strategy::low_confidence_dynamic);
  EXPECT_EQ(parse_strategy("entropy_bounded"), Strategy::entropy_bounded);
}

TEST(RolloutBuffer, JsonRoundTripFlatArrays) {
  const auto m = tiny_model(DType::f32);
  SamplerOptions o = opts(Strategy::entropy_bounded, 4, 3, 1.0, 7);
  o.eos_id = 4;
  o.sampling.top_k = 5;
  o.sampling.top_p = 0.75;
  o.max_context = 100;
  auto ps = ragged_prompts();
  ps.push_back({});  // a bad prompt: skipped by append_ok
  const auto rs = bd_generate(m, ps, ids_for(ps.size()), o);
  RolloutBuffer buf(42, o);
  EXPECT_EQ(buf.append_ok(rs), 1u);
  ASSERT_EQ(buf.size(), 5u);
  EXPECT_ERROR_HAS(buf.append(rs.back()), "empty_prompt");
  Rollout broken = rs[0];
  broken.step_map.pop_back();
  EXPECT_ERROR_HAS(buf.append(broken), "step map");

  const FlatRollouts f = buf.to_flat();
  EXPECT_EQ(f.prompt_offsets.size(), 6u);
  EXPECT_EQ(f.prompt_offsets.back(), buf.prompt_tokens());
  EXPECT_EQ(f.response_offsets.back(), buf.response_tokens());
  EXPECT_EQ(f.step_map.size(), f.response_ids.size());

  const nlohmann::json j = buf.to_json();
  EXPECT_EQ(j["sampler"]["strategy"], "entropy_bounded");
  const RolloutBuffer back = RolloutBuffer::from_json(nlohmann::json::parse(j.dump()));
  EXPECT_EQ(back, buf);
  EXPECT_EQ(back.weight_version(), 42);
  EXPECT_EQ(back.sampler(), o);
  size_t n = 0;
  for (const Rollout& r : back) {
    EXPECT_EQ(r, rs[n]);
    ++n;
  }
  EXPECT_EQ(n, 5u);

  // Inconsistent arrays are named.
  nlohmann::json bad = j;
  bad["response_offsets"].back() = 1000;
  EXPECT_ERROR_HAS(RolloutBuffer::from_json(bad, "r.json"), "response_offsets");
  bad = j;
  bad["commit_forwards"].erase(0);
  EXPECT_ERROR_HAS(RolloutBuffer::from_json(bad), "commit_forwards");
  bad = j;
  bad["sampler"].erase("tau");
  EXPECT_ERROR_HAS(RolloutBuffer::from_json(bad), "tau");
  bad = j;
  bad["sampler"]["strategy"] = "nope";
  EXPECT_ERROR_HAS(RolloutBuffer::from_json(bad), "strategy");

  buf.clear();
  EXPECT_TRUE(buf.empty());
  EXPECT_EQ(buf.weight_version(), 42);
  EXPECT_EQ(RolloutBuffer::from_json(buf.to_json()), buf);
}
