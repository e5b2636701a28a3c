// OPD training rows and the conversion loop: state selection statistics against their definitions
// (B 4.2-4.3, B 7), loss positions (A 3), the teacher's index shift with a toy teacher whose
// predictions are known (B 5.2), the rollout-length ramp (B 3.6), and whole conversion runs: bitwise
// deterministic for a seed, every mode, bad prompts skipped per sample.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "opdlm/io/bpe_trainer.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "opdlm/train/opd_trainer.hpp"
#include "test_util.hpp"

using namespace opdlm;
namespace fs = std::filesystem;

namespace {

// Block values of a masked vector for block [s, e).
std::vector<uint8_t> slice(const std::vector<uint8_t>& m, size_t s, size_t e) { return {m.begin() + long(s), m.begin() + long(e)}; }

}  // namespace

// ---- state selection -----------------------------------------------------------------------------

TEST(StateSelection, OneStatePerBlockIsUniformOverThatBlocksRounds) {
  // Block 0: 4 one-token steps (rounds 4,3,2,1 masked); block 1: two steps (2+2); block 2: one step;
  // block 3 (partial, 2 slots): two steps.
  const std::vector<int32_t> sm = {1, 3, 2, 4, 5, 6, 5, 6, 7, 7, 7, 7, 8, 9};
  const int64_t b = 4;
  std::map<std::string, int> seen[4];  // key: the block's mask as bytes
  const int n = 4000;
  for (int i = 0; i < n; ++i) {
    const auto m = train::select_state_per_block(sm, b, {7, RngPurpose::state_select, 3, uint32_t(i), 0});
    ASSERT_EQ(m.size(), sm.size());
    for (size_t k = 0; k < 4; ++k) {
      const size_t s = k * 4, e = std::min(sm.size(), s + 4);
      const auto blk = slice(m, s, e);
      // The state is a round: masked exactly where step_map >= some v of the block; never all revealed.
      bool is_round = false;
      for (size_t j = s; j < e; ++j) {
        std::vector<uint8_t> r;
        for (size_t q = s; q < e; ++q) r.push_back(sm[q] >= sm[j]);
        is_round |= r == blk;
      }
      EXPECT_TRUE(is_round);
      EXPECT_GT(std::count(blk.begin(), blk.end(), uint8_t(1)), 0);
      ++seen[k][std::string(blk.begin(), blk.end())];
    }
  }
  const size_t rounds[4] = {4, 2, 1, 2};
  for (size_t k = 0; k < 4; ++k) {
    ASSERT_EQ(seen[k].size(), rounds[k]) << "block " << k;
    const double p = 1.0 / double(rounds[k]), sd = std::sqrt(n * p * (1 - p));
    for (const auto& [state, count] : seen[k]) EXPECT_NEAR(count, n * p, 5 * sd + 1e-9) << "block " << k;
  }
  // Keyed by (seed, step, sample id): the same key gives the same state; the draw is per block.
  EXPECT_EQ(train::select_state_per_block(sm, b, {7, RngPurpose::state_select, 3, 11, 0}),
            train::select_state_per_block(sm, b, {7, RngPurpose::state_select, 3, 11, 0}));
}

TEST(StateSelection, AllRoundsAdvanceEveryBlockInLockStep) {
  const std::vector<int32_t> sm = {1, 3, 2, 4, 5, 5, 6, 6, 7};
  const auto rows = train::all_rounds(sm, 4);
  ASSERT_EQ(rows.size(), 4u);  // block 0 has 4 rounds
  EXPECT_EQ(rows[0], (std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 1, 1}));  // round 1: all masked
  EXPECT_EQ(rows[1], (std::vector<uint8_t>{0, 1, 1, 1, 0, 0, 1, 1, 0}));  // block 2 has one round only
  EXPECT_EQ(rows[2], (std::vector<uint8_t>{0, 1, 0, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(rows[3], (std::vector<uint8_t>{0, 0, 0, 1, 0, 0, 0, 0, 0}));
}

TEST(StateSelection, RandomStatesFollowTheirDefinition) {
  const int64_t L1 = 10, b = 4;  // blocks of 4, 4, 2
  const int n = 6000;
  double t_sum = 0, masked_given_t = 0, expected_given_t = 0;
  int forced = 0;
  for (int i = 0; i < n; ++i) {
    const auto s = train::random_states(L1, b, {3, RngPurpose::random_mask, 0, uint32_t(i), 0});
    ASSERT_EQ(s.masked.size(), size_t(L1));
    ASSERT_EQ(s.t.size(), 3u);
    for (size_t k = 0; k < 3; ++k) {
      const size_t st = k * 4, e = std::min<size_t>(L1, st + 4);
      const auto blk = slice(s.masked, st, e);
      const auto cnt = std::count(blk.begin(), blk.end(), uint8_t(1));
      EXPECT_GE(cnt, 1) << "every block keeps at least one mask";
      EXPECT_GE(s.t[k], 0.0);
      EXPECT_LT(s.t[k], 1.0);
      t_sum += s.t[k];
      // E[#masked | t] = n t + (1 - t)^n (the forced mask when none was drawn).
      const double len = double(e - st);
      masked_given_t += double(cnt);
      expected_given_t += len * s.t[k] + std::pow(1 - s.t[k], len);
      forced += cnt == 1;
    }
  }
  EXPECT_NEAR(t_sum / (3.0 * n), 0.5, 0.01);                        // t ~ U(0, 1)
  EXPECT_NEAR(masked_given_t / expected_given_t, 1.0, 0.02);       // Bernoulli(t) per slot + the forced one
  EXPECT_GT(forced, 0);
  EXPECT_EQ(train::random_states(L1, b, {3, RngPurpose::random_mask, 0, 5, 0}).masked,
            train::random_states(L1, b, {3, RngPurpose::random_mask, 0, 5, 0}).masked);
  EXPECT_NE(train::random_states(L1, b, {3, RngPurpose::random_mask, 1, 5, 0}).t,
            train::random_states(L1, b, {3, RngPurpose::random_mask, 0, 5, 0}).t);
}

// ---- loss positions ------------------------------------------------------------------------------

TEST(LossPositions, MaskedInsideTheDomainBeforeEosAndRealLength) {
  const int32_t eos = 9;
  train::RowLossSpec spec;
  spec.eos_id = eos;
  train::TrainingRow row;
  row.prompt = {eos, 1, 2};  // an EOS in the prompt plays no role
  row.x0 = {3, 4, eos, 5, 6, 6};
  row.real_len = 4;            // x0[4:] is right padding
  row.masked = {1, 0, 1, 1, 1, 1};
  EXPECT_EQ(train::loss_domain(row.x0, 4, eos, true), (std::vector<uint8_t>{1, 1, 0, 0, 0, 0}));
  EXPECT_EQ(train::loss_domain(row.x0, 4, eos, false), (std::vector<uint8_t>{1, 1, 1, 0, 0, 0}));
  EXPECT_EQ(train::loss_positions(row, spec), (std::vector<int64_t>{0}));  // revealed slot 1 gets no loss
  spec.exclude_eos = false;
  EXPECT_EQ(train::loss_positions(row, spec), (std::vector<int64_t>{0, 2}));
  // Without EOS the domain ends at R (a truncated response's padding never gets loss, A 3).
  row.x0 = {3, 4, 7, 5, 6, 6};
  EXPECT_EQ(train::loss_positions(row, spec), (std::vector<int64_t>{0, 2, 3}));
  EXPECT_EQ(train::loss_domain(row.x0, -1, -1, true), std::vector<uint8_t>(6, 1));
}

// ---- the teacher's index shift -------------------------------------------------------------------

// A teacher whose layers are all zero (attention and MLP add nothing) and whose tied embedding is
// 8 * one-hot: its logits at position i peak at the token AT position i ("echo" model). So
// q_T(. | prompt ⊕ x0[0:j]) must peak at x0[j-1] for j > 0 and at the last prompt token for j = 0.
TEST(TeacherTargets, TargetOfTokenJIsReadAtPositionPPlusJMinusOne) {
  model::Qwen3Config c;
  c.vocab_size = 16;
  c.hidden_size = 16;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 8;
  model::Qwen3Weights w(c);
  for (auto& t : w.tensors()) {
    if (t.name.find("norm") != std::string::npos) t.value.fill(1.0);
  }
  Tensor& E = w.embed();
  for (int64_t v = 0; v < 16; ++v) E.data<float>()[v * 16 + v] = 8.0f;
  const model::Qwen3Model teacher = model::Qwen3Model::teacher(std::move(w));
  const std::vector<int32_t> prompt = {3, 7, 1}, x0 = {5, 2, 11, 4, 9, 6};
  const std::vector<int64_t> js = {0, 1, 2, 3, 4, 5};
  const Tensor lp = train::teacher_logprobs(teacher, prompt, x0, js);
  ASSERT_EQ(lp.shape()[0], 6);
  for (int64_t j = 0; j < 6; ++j) {
    int64_t best = 0;
    for (int64_t v = 1; v < 16; ++v)
      if (lp.item(j * 16 + v) > lp.item(j * 16 + best)) best = v;
    EXPECT_EQ(best, j == 0 ? prompt.back() : x0[size_t(j - 1)]) << "response token " << j;
  }
  // Subsets and order of js only select rows.
  const std::vector<int64_t> some = {4, 1};
  const Tensor lp2 = train::teacher_logprobs(teacher, prompt, x0, some);
  for (int64_t v = 0; v < 16; ++v) {
    EXPECT_EQ(lp2.item(v), lp.item(4 * 16 + v));
    EXPECT_EQ(lp2.item(16 + v), lp.item(16 + v));
  }
}

TEST(RolloutLength, CosineRampMatchesTheReferenceSchedule) {
  // B 3.6: 100 -> 4000 over 100 steps, multiples of 4.
  const std::map<int64_t, int64_t> expect = {{1, 100}, {2, 100}, {10, 148}, {25, 396}, {50, 1244}, {75, 2508}, {100, 4000}, {150, 4000}};
  for (const auto& [step, len] : expect) EXPECT_EQ(train::max_rollout_length(step, 100, 4000, 100, 4), len) << step;
  EXPECT_EQ(train::max_rollout_length(0, 0, 64, 10, 4), 64);  // no ramp
  EXPECT_EQ(train::max_rollout_length(0, 2, 64, 10, 4), 4);   // never below one block
}

// ---- whole conversion runs -----------------------------------------------------------------------


TEST(OpdTraining, ConversionStepIsBitwiseDeterministicForASeed) {
  const test::TinyOpdSetup s = test::make_tiny_opd_setup("det");
  const auto a = train::run_opd_training(test::tiny_opd_options(s, train::ConversionMode::opd, "a"), "test");
  const auto b = train::run_opd_training(test::tiny_opd_options(s, train::ConversionMode::opd, "b"), "test");
  EXPECT_GT(a.optimizer_steps, 0);
  EXPECT_EQ(a.final_loss, b.final_loss);  // bitwise
  EXPECT_EQ(a.budget.train_tokens(), b.budget.train_tokens());
  const auto wa = io::load_model(a.model_path), wb = io::load_model(b.model_path), w0 = io::load_model(s.teacher);
  bool moved = false;
  for (size_t i = 0; i < wa.tensors().size(); ++i) {
    const Tensor& x = wa.tensors()[i].value;
    const Tensor& y = wb.tensors()[i].value;
    ASSERT_EQ(std::memcmp(x.data<float>(), y.data<float>(), size_t(x.numel()) * 4), 0) << wa.tensors()[i].name;
    moved |= std::memcmp(x.data<float>(), w0.tensors()[i].value.data<float>(), size_t(x.numel()) * 4) != 0;
  }
  EXPECT_TRUE(moved) << "training changed nothing";
  // The metric lines agree too (apart from wall-clock fields).
  auto ma = test::read_metrics_jsonl(a.model_path.substr(0, a.model_path.size() - 8) + "metrics.jsonl");
  auto mb = test::read_metrics_jsonl(b.model_path.substr(0, b.model_path.size() - 8) + "metrics.jsonl");
  ASSERT_EQ(ma.size(), mb.size());
  for (size_t i = 0; i < ma.size(); ++i)
    if (ma[i]["event"] == "step") {
      EXPECT_EQ(ma[i]["loss"], mb[i]["loss"]);
      EXPECT_EQ(ma[i]["budget"], mb[i]["budget"]);
    }
  fs::remove_all(s.dir);
}

TEST(OpdTraining, APromptListIsReadAsOneSetInListOrder) {
  EXPECT_EQ(train::prompt_files("a.jsonl"), (std::vector<std::string>{"a.jsonl"}));
  EXPECT_EQ(train::prompt_files("a.jsonl, b.jsonl"), (std::vector<std::string>{"a.jsonl", "b.jsonl"}));
  EXPECT_EQ(train::prompt_files("a.jsonl,,b"), (std::vector<std::string>{"a.jsonl", "", "b"}));  // rejected by from_config
  // The same records split over two files train bit for bit like the one file.
  const test::TinyOpdSetup s = test::make_tiny_opd_setup("list");
  std::ifstream in(s.prompts);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 9u);
  const std::string first = s.dir + "/first.jsonl", second = s.dir + "/second.jsonl";
  std::ofstream f1(first), f2(second);
  for (size_t i = 0; i < lines.size(); ++i) (i < 4 ? f1 : f2) << lines[i] << "\n";
  f1.close();
  f2.close();
  const auto one = train::run_opd_training(test::tiny_opd_options(s, train::ConversionMode::opd, "one"), "test");
  auto o = test::tiny_opd_options(s, train::ConversionMode::opd, "two");
  o.prompts = first + " , " + second;
  const auto two = train::run_opd_training(o, "test");
  EXPECT_EQ(one.final_loss, two.final_loss);
  EXPECT_EQ(one.budget.train_tokens(), two.budget.train_tokens());
  EXPECT_EQ(one.budget.skipped_prompts, two.budget.skipped_prompts);
  // In the other order the stream of prompts differs, so the run does too.
  o.prompts = second + "," + first;
  o.out_dir = s.dir + "/swapped";
  const auto swapped = train::run_opd_training(o, "test");
  EXPECT_FALSE(one.budget.train_tokens() == swapped.budget.train_tokens() && one.final_loss == swapped.final_loss);
  fs::remove_all(s.dir);
}

TEST(OpdTraining, EveryModeTrainsCountsItsBudgetAndSkipsBadPrompts) {
  const test::TinyOpdSetup s = test::make_tiny_opd_setup("modes");
  for (auto mode : {train::ConversionMode::opd, train::ConversionMode::rm_kl, train::ConversionMode::rm_ce}) {
    SCOPED_TRACE(train::conversion_mode_name(mode));
    auto o = test::tiny_opd_options(s, mode, train::conversion_mode_name(mode));
    o.prompts_per_step = 3;
    o.rl_steps = 3;  // 9 draws = one epoch over the 9 records: both bad ones come up exactly once
    const auto r = train::run_opd_training(o, "test");
    const auto& bc = r.budget;
    EXPECT_EQ(r.rl_steps, 3);
    EXPECT_GT(bc.rows, 0);
    EXPECT_GT(bc.loss_positions, 0);
    EXPECT_GT(bc.train_tokens(), 0);
    EXPECT_EQ(bc.skipped_prompts, 2);
    EXPECT_GT(bc.student_forward_flops, 0);
    EXPECT_DOUBLE_EQ(bc.student_backward_flops, 2 * bc.student_forward_flops);
    if (mode == train::ConversionMode::rm_ce) {
      EXPECT_EQ(bc.generated_tokens, 0);   // gold responses: no rollouts, no teacher
      EXPECT_EQ(bc.teacher_flops, 0);
    } else {
      EXPECT_GT(bc.generated_tokens, 0);
      EXPECT_GT(bc.teacher_flops, 0);
    }
    EXPECT_GE(r.probe_own_kl_first, 0);
    EXPECT_GE(r.probe_own_kl_last, 0);
    // Skips are logged per sample with the record id and the reason.
    int skips = 0;
    for (const auto& j : test::read_metrics_jsonl(o.out_dir + "/metrics.jsonl"))
      if (j["event"] == "skip") {
        ++skips;
        EXPECT_TRUE(j["id"] == "empty" || j["id"] == "long") << j.dump();
        EXPECT_FALSE(j["reason"].get<std::string>().empty());
      }
    EXPECT_EQ(skips, 2);
  }
  fs::remove_all(s.dir);
}

TEST(OpdTraining, TokenBudgetStopsTheRun) {
  const test::TinyOpdSetup s = test::make_tiny_opd_setup("budget");
  auto o = test::tiny_opd_options(s, train::ConversionMode::rm_kl, "run");
  o.rl_steps = 50;
  o.max_train_tokens = 30;
  o.save_at_tokens = {10, 20, 1000};
  o.probe_prompts.clear();
  const auto r = train::run_opd_training(o, "test");
  EXPECT_LT(r.rl_steps, 50);
  EXPECT_GE(r.budget.train_tokens(), 30);
  // Milestone checkpoints: written once each when the counter first reaches them, never beyond.
  for (int m : {10, 20}) {
    const auto info = io::read_model_info(o.out_dir + "/checkpoints/tokens_" + std::to_string(m) + ".h5");
    EXPECT_GE(info.extra["train_tokens"].get<int64_t>(), m);
    EXPECT_LT(info.extra["train_tokens"].get<int64_t>(), 30 + m);
  }
  EXPECT_FALSE(fs::exists(o.out_dir + "/checkpoints/tokens_1000.h5"));
  fs::remove_all(s.dir);
}

TEST(OpdTraining, ModelsWithoutMaskIdOrWithOtherVocabulariesAreRejectedByName) {
  const test::TinyOpdSetup s = test::make_tiny_opd_setup("badmodel");
  // No mask_token_id in the teacher's config: the error names the file and the field.
  model::Qwen3Weights w = io::load_model(s.teacher);
  model::Qwen3Config c = w.config();
  c.mask_token_id = -1;
  model::Qwen3Weights nomask(c);
  for (size_t i = 0; i < nomask.tensors().size(); ++i) nomask.tensors()[i].value = w.tensors()[i].value;
  const std::string nomask_path = s.dir + "/nomask.h5";
  io::save_model(nomask_path, nomask);
  auto o = test::tiny_opd_options(s, train::ConversionMode::opd, "nomask");
  o.teacher = nomask_path;
  EXPECT_ERROR_HAS(train::run_opd_training(o, "test"), "nomask.h5", "mask_token_id");
  // A student whose vocabulary differs from the teacher's.
  model::Qwen3Config small = w.config();
  small.vocab_size = 259;
  small.mask_token_id = 258;
  model::Qwen3Weights other(small);
  other.init_random(1, 0.02);
  const std::string other_path = s.dir + "/other.h5";
  io::save_model(other_path, other);
  o = test::tiny_opd_options(s, train::ConversionMode::opd, "othervocab");
  o.student_init = other_path;
  EXPECT_ERROR_HAS(train::run_opd_training(o, "test"), "other.h5", "vocab_size");
  fs::remove_all(s.dir);
}

// ---- configs -------------------------------------------------------------------------------------

namespace {
std::string repo_file(const std::string& rel) {
  return (fs::path(__FILE__).parent_path().parent_path().parent_path() / rel).string();
}
}  // namespace

TEST(OpdConfig, ShippedConfigsLoadAndBadValuesNameTheKey) {
  const auto schema = train::OpdTrainOptions::schema();
  for (const char* f : {"configs/opd/quickstart.ini", "configs/opd/paper.ini"}) {
    SCOPED_TRACE(f);
    const ResolvedConfig c = load_config(schema, repo_file(f), {"--run.out_dir=/tmp/x"});
    for (auto mode : {train::ConversionMode::opd, train::ConversionMode::rm_kl, train::ConversionMode::rm_ce})
      EXPECT_NO_THROW(train::OpdTrainOptions::from_config(c, mode));
  }
  const ResolvedConfig paper = load_config(schema, repo_file("configs/opd/paper.ini"), {});
  const auto o = train::OpdTrainOptions::from_config(paper, train::ConversionMode::opd);
  EXPECT_EQ(o.schedule.total_steps, 7729);  // B 6.4: 16 * 483 + 1
  EXPECT_EQ(o.sampler.strategy, diffusion::Strategy::low_confidence_dynamic);
  EXPECT_EQ(o.sampler.tau, 0.9);
  // exclude_eos = auto: the KL modes follow the paper, rm-ce (SFT) keeps the EOS target.
  const ResolvedConfig qs = load_config(schema, repo_file("configs/opd/quickstart.ini"), {"--run.out_dir=/tmp/x"});
  EXPECT_TRUE(train::OpdTrainOptions::from_config(qs, train::ConversionMode::opd).loss.exclude_eos);
  EXPECT_FALSE(train::OpdTrainOptions::from_config(qs, train::ConversionMode::rm_ce).loss.exclude_eos);

  auto fails_with = [&](std::vector<std::string> overrides, const std::string& key) {
    overrides.push_back("--run.out_dir=/tmp/x");
    const std::string msg = test::error_of([&] {
      train::OpdTrainOptions::from_config(load_config(schema, repo_file("configs/opd/quickstart.ini"), overrides),
                                          train::ConversionMode::opd);
    });
    EXPECT_NE(msg.find(key), std::string::npos) << msg;
  };
  fails_with({"--loss.divergence=kl"}, "loss.divergence");
  fails_with({"--loss.state_selection=some"}, "loss.state_selection");
  fails_with({"--rollout.strategy=greedy"}, "rollout.strategy");
  fails_with({"--data.rows_per_update=0"}, "data.rows_per_update");
  fails_with({"--rollout.tau=2"}, "rollout.tau");
  fails_with({"--loss.no_such_key=1"}, "no_such_key");
  fails_with({"--model.teacher="}, "model.teacher");
  fails_with({"--run.save_at_tokens=500,200"}, "run.save_at_tokens");
  fails_with({"--run.save_at_tokens=5k"}, "run.save_at_tokens");
  fails_with({"--loss.exclude_eos=maybe"}, "loss.exclude_eos");
  EXPECT_NE(test::error_of([] { train::parse_conversion_mode("sft"); }).find("sft"), std::string::npos);
}
