// Tests for the evaluation harness (eval/harness.hpp) with tiny random models built in-process: DLM
// exact match against the model's own greedy decode, the fixed-mask ELBO estimate, AR multiple
// choice against token_logprobs, gen-PPL of a model's own greedy samples, per-sample skipping of bad
// prompts, and the result JSON's hashes and knobs.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "opdlm/eval/harness.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/model/ar_generate.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::eval;

namespace {

constexpr int64_t kVocab = 264;  // the 256 bytes, 2 merges, EOS 258, MASK 259, 4 spare rows
constexpr int32_t kEos = 258, kMask = 259;
constexpr int64_t kContext = 48;

// A real byte-level BPE: 256 byte symbols, two merges, <|endoftext|>, <|MASK|>, and <|extra|> = 300,
// an id outside the models' vocabulary (a bad_token_id prompt).
std::string tokenizer_json() {
  return test::tiny_bpe_tokenizer_json({{kEos, "<|endoftext|>"}, {kMask, "<|MASK|>"}, {300, "<|extra|>"}});
}

const io::Tokenizer& tok() {
  static const io::Tokenizer t = io::Tokenizer::from_json_string(tokenizer_json(), "tiny tokenizer.json");
  return t;
}

model::Qwen3Weights tiny_weights(uint32_t seed) {
  model::Qwen3Config c = test::tiny_qwen3_config(kVocab, 16, 32, 2, 1, 8);
  c.max_position_embeddings = kContext;
  c.eos_token_id = kEos;
  c.mask_token_id = kMask;
  model::Qwen3Weights w(c, DType::f32);
  w.init_random(seed, 0.3);
  return w;
}
model::Qwen3Model tiny_model(uint32_t seed) { return model::Qwen3Model::teacher(tiny_weights(seed)); }

EvalOptions options(EvalMode mode, const model::Qwen3Model& m) {
  EvalOptions o;
  o.mode = mode;
  o.batch_size = 3;
  o.decode.max_new_tokens = 8;
  o.mc_samples = 3;
  fill_model_ids(o, m.config());
  return o;
}

io::PromptRecord rec(const std::string& id, const std::string& prompt, const std::string& gold,
                     std::vector<std::string> distractors = {}) {
  io::PromptRecord r;
  r.id = id;
  r.prompt = prompt;
  r.gold = gold;
  r.distractors = std::move(distractors);
  return r;
}

io::PromptDataset dataset(std::vector<io::PromptRecord> recs) {
  io::PromptDataset d;
  d.records = std::move(recs);
  return d;
}

const std::vector<std::string> kPrompts = {"the cat", "3+4=", "Gen 1:1 In the", "wheat"};

}  // namespace

TEST(DlmEval, ExactMatchOfTheModelsOwnGreedyDecodeIsOneAndAWrongGoldZero) {
  const model::Qwen3Model m = tiny_model(21);
  EvalOptions o = options(EvalMode::diffusion, m);
  o.decode.eos_id = -1;  // full-length responses: the forward counts below are exact
  std::vector<io::PromptRecord> probe;
  for (size_t i = 0; i < kPrompts.size(); ++i) probe.push_back(rec(std::to_string(i), kPrompts[i], "?"));
  const TaskResult first = eval_task(m, tok(), dataset(probe), "probe", o);
  ASSERT_EQ(first.n, 4);
  // The gold is what the model decodes greedily (default evaluation sampler: b 4, s 4, static).
  std::vector<io::PromptRecord> right = probe, wrong = probe;
  for (size_t i = 0; i < probe.size(); ++i) {
    right[i].gold = first.items[i].answer;
    wrong[i].gold = "zz not the answer zz";
    // The sampler reports its work: 4 steps per block, one token per step (static, b = s).
    EXPECT_EQ(first.items[i].response.size(), 8u);
    EXPECT_EQ(first.items[i].forwards, 8);
    EXPECT_EQ(first.items[i].commit_forwards, 1);
  }
  const TaskResult r = eval_task(m, tok(), dataset(right), "right", o);
  EXPECT_DOUBLE_EQ(r.exact_match, 1.0);
  EXPECT_DOUBLE_EQ(r.token_accuracy, 1.0);
  EXPECT_DOUBLE_EQ(r.tokens_per_forward, 1.0);  // static with b = s: one token per denoising forward
  EXPECT_EQ(r.generated_tokens, 32);
  EXPECT_EQ(r.forwards, 32);
  EXPECT_GT(r.tokens_per_s, 0);
  const TaskResult w = eval_task(m, tok(), dataset(wrong), "wrong", o);
  EXPECT_DOUBLE_EQ(w.exact_match, 0.0);
  // Dynamic with a low threshold reveals several tokens per forward.
  EvalOptions dyn = o;
  dyn.decode.strategy = diffusion::Strategy::low_confidence_dynamic;
  dyn.decode.tau = 0.0;
  const TaskResult d = eval_task(m, tok(), dataset(probe), "dyn", dyn);
  EXPECT_DOUBLE_EQ(d.tokens_per_forward, 4.0);
}

TEST(DlmEval, ElboIsDeterministicAndUsesTheSameMasksForEveryCandidate) {
  const model::Qwen3Model m = tiny_model(22);
  const EvalOptions o = options(EvalMode::diffusion, m);
  const auto prompt = tok().encode("the cat");
  const auto a = tok().encode(" sat on"), b = tok().encode(" ate up");
  ASSERT_EQ(a.size(), b.size());
  const double na = mc_nll_dlm(m, prompt, a, 7, o);
  EXPECT_EQ(na, mc_nll_dlm(m, prompt, a, 7, o));  // bit-identical: fixed keys, no hidden state
  EXPECT_NE(na, mc_nll_dlm(m, prompt, b, 7, o));
  // Recomputed by hand with the documented key: state s = random_states(len, b, {seed, random_mask,
  // s, sample id}) — the key holds nothing of the candidate, so both candidates see these masks.
  auto by_hand = [&](const std::vector<int32_t>& cand) {
    train::RowLossSpec spec;
    spec.objective = train::RowObjective::masked_ce;
    spec.block_size = 4;
    spec.mask_id = kMask;
    spec.eos_id = -1;
    spec.pad_id = o.decode.pad_id;
    double sum = 0;
    for (uint32_t s = 0; s < 3; ++s) {
      const auto st = train::random_states(static_cast<int64_t>(cand.size()), 4, {0, RngPurpose::random_mask, s, 7, 0});
      train::TrainingRow row;
      row.sample_id = 7;
      row.prompt = prompt;
      row.x0 = cand;
      row.masked = st.masked;
      row.t_block = st.t;
      const auto l = train::row_loss_eval(m, Tensor{}, row, spec);
      EXPECT_EQ(l.domain, static_cast<int64_t>(cand.size()));
      sum += l.loss * static_cast<double>(cand.size());
    }
    return sum / 3;
  };
  EXPECT_DOUBLE_EQ(na, by_hand(a));
  EXPECT_DOUBLE_EQ(mc_nll_dlm(m, prompt, b, 7, o), by_hand(b));
  EXPECT_GT(na, 0);
  // A different record (sample id) draws different masks.
  EXPECT_NE(na, mc_nll_dlm(m, prompt, a, 8, o));
}

TEST(DlmEval, ArMultipleChoicePicksTheHigherSummedLogProb) {
  const model::Qwen3Model m = tiny_model(23);
  const EvalOptions o = options(EvalMode::ar, m);
  const std::vector<std::string> cands = {" sat", " ran far", " is"};
  auto summed = [&](const std::string& prompt, const std::string& c) {
    auto ids = tok().encode(prompt);
    const size_t P = ids.size();
    const auto ci = tok().encode(c);
    ids.insert(ids.end(), ci.begin(), ci.end());
    const auto lp = model::token_logprobs(m, ids);
    double s = 0;
    for (size_t j = P - 1; j < lp.size(); ++j) s += lp[j];
    return s;
  };
  std::vector<io::PromptRecord> recs;
  for (size_t g = 0; g < cands.size(); ++g) {  // each candidate in turn is the gold
    std::vector<std::string> ds;
    for (size_t k = 0; k < cands.size(); ++k)
      if (k != g) ds.push_back(cands[k]);
    recs.push_back(rec(std::to_string(g), "the cat", cands[g], ds));
  }
  const TaskResult r = eval_task(m, tok(), dataset(recs), "mc", o);
  ASSERT_EQ(r.mc_n, 3);
  int64_t right = 0;
  for (size_t g = 0; g < recs.size(); ++g) {
    const ItemResult& it = r.items[g];
    ASSERT_EQ(it.mc_status, "ok");
    std::vector<std::string> order{*recs[g].gold};
    order.insert(order.end(), recs[g].distractors.begin(), recs[g].distractors.end());
    size_t best = 0;
    for (size_t k = 0; k < order.size(); ++k) {
      EXPECT_NEAR(it.mc_scores[k], summed("the cat", order[k]), 1e-9);
      if (summed("the cat", order[k]) > summed("the cat", order[best])) best = k;
    }
    EXPECT_EQ(it.mc_choice, static_cast<int64_t>(best));
    EXPECT_EQ(it.mc_correct, best == 0);
    right += best == 0;
  }
  EXPECT_EQ(right, 1);  // exactly one candidate is the most likely
  EXPECT_DOUBLE_EQ(r.mc_accuracy, 1.0 / 3.0);
}

TEST(DlmEval, GenPplOfAModelsOwnGreedySamplesIsExpOfItsNll) {
  const model::Qwen3Model m = tiny_model(24);
  EvalOptions o = options(EvalMode::ar, m);
  o.decode.eos_id = -1;  // fixed-length samples
  o.gen_ppl_sampling = {0.0, 0, 1.0};
  std::vector<io::PromptRecord> recs;
  for (size_t i = 0; i < kPrompts.size(); ++i) recs.push_back(rec(std::to_string(i), kPrompts[i], ""));
  const GenPplResult g = gen_ppl(m, m, tok(), dataset(recs), "text", o);
  ASSERT_EQ(g.n, 4);
  double nll = 0;
  int64_t n = 0;
  std::vector<int32_t> pooled;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    const auto p = tok().encode(kPrompts[i]);
    model::ArGenerateOptions ao;
    ao.max_new_tokens = 8;
    ao.sampling.temperature = 0;
    const auto gen = model::ar_generate(m, {p}, std::vector<uint32_t>{static_cast<uint32_t>(i)}, ao)[0].tokens;
    EXPECT_EQ(g.samples[i].response, gen);
    std::vector<int32_t> seq = p;
    seq.insert(seq.end(), gen.begin(), gen.end());
    const auto lp = model::token_logprobs(m, seq);
    for (size_t j = p.size() - 1; j < lp.size(); ++j) nll -= lp[j];
    n += static_cast<int64_t>(gen.size());
    pooled.insert(pooled.end(), gen.begin(), gen.end());
  }
  EXPECT_EQ(g.tokens, n);
  EXPECT_NEAR(g.gen_ppl, std::exp(nll / double(n)), 1e-9 * g.gen_ppl);
  EXPECT_NEAR(g.unigram_entropy, unigram_entropy(pooled), 1e-12);
  // Greedy samples are the model's most likely tokens: lower perplexity than a uniform guess.
  EXPECT_LT(g.gen_ppl, double(kVocab));
  const std::vector<int32_t> toks{1, 1, 2, 3};
  EXPECT_NEAR(unigram_entropy(toks), -(0.5 * std::log(0.5) + 2 * 0.25 * std::log(0.25)), 1e-12);
}

TEST(DlmEval, BadPromptsAreSkippedWithReasonsAndTheRestEvaluated) {
  const model::Qwen3Model m = tiny_model(25);
  const std::vector<io::PromptRecord> recs = {
      rec("good1", "the cat", "x"), rec("empty", "", "x"), rec("long", std::string(60, 'a'), "x"),
      rec("utf8", "bad \xff byte", "x"), rec("extra", "an <|extra|> id", "x"), rec("good2", "wheat", "x")};
  for (EvalMode mode : {EvalMode::ar, EvalMode::diffusion}) {
    const EvalOptions o = options(mode, m);
    const TaskResult r = eval_task(m, tok(), dataset(recs), "bad", o);
    EXPECT_EQ(r.records, 6);
    EXPECT_EQ(r.n, 2);
    EXPECT_EQ(r.skipped, 4);
    EXPECT_EQ(r.skipped_by_status.at("empty_prompt"), 1);
    EXPECT_EQ(r.skipped_by_status.at("prompt_too_long"), 1);
    EXPECT_EQ(r.skipped_by_status.at("invalid_text"), 1);
    EXPECT_EQ(r.skipped_by_status.at("bad_token_id"), 1);
    EXPECT_EQ(r.items[3].status, ItemStatus::invalid_text);
    EXPECT_NE(r.items[3].error.find("UTF-8"), std::string::npos) << r.items[3].error;
    EXPECT_NE(r.items[4].error.find("300"), std::string::npos) << r.items[4].error;
    EXPECT_NE(r.items[2].error.find("48"), std::string::npos) << r.items[2].error;
    // The good records decode as they do alone.
    const TaskResult alone = eval_task(m, tok(), dataset({recs[0], recs[5]}), "good", o);
    EXPECT_EQ(alone.items[0].response, r.items[0].response);
    EXPECT_EQ(alone.items[1].response, r.items[5].response);
    EXPECT_EQ(item_to_json("bad", r.items[1])["status"], "empty_prompt");
    EXPECT_EQ(item_to_json("bad", r.items[1])["reason"], "empty prompt");
  }
}

TEST(DlmEval, ResultJsonHoldsTheHashesAndKnobs) {
  test::TempDir dir;
  const std::string mp = dir / "student.h5", tp = dir / "teacher.h5", task = dir / "task.jsonl", text = dir / "text.jsonl";
  io::save_model(mp, tiny_weights(26));
  io::save_model(tp, tiny_weights(27));
  io::write_prompt_jsonl(task, dataset({rec("a", "the cat", " sat", {" ran"}), rec("b", "", "x"), rec("c", "wheat", "y")}));
  io::write_prompt_jsonl(text, dataset({rec("t0", "Gen 1:1", ""), rec("t1", "3+4=", "")}));
  const model::Qwen3Model student = model::Qwen3Model::teacher(io::load_model(mp));
  const model::Qwen3Model teacher = model::Qwen3Model::teacher(io::load_model(tp));
  EvalOptions o = options(EvalMode::diffusion, student);
  o.decode.seed = 3;
  EvalInputs in;
  in.model = &student;
  in.model_path = mp;
  in.teacher = &teacher;
  in.teacher_path = tp;
  in.tok = &tok();
  in.task_paths = {task};
  in.gen_ppl_path = text;
  const nlohmann::ordered_json j = report_to_json(evaluate(in, o));
  EXPECT_EQ(j["mode"], "diffusion");
  EXPECT_EQ(j["model"]["sha256"], io::sha256_file_hex(mp));
  EXPECT_EQ(j["model"]["path"], mp);
  EXPECT_EQ(j["teacher"]["sha256"], io::sha256_file_hex(tp));
  EXPECT_EQ(nlohmann::json::parse(j["decoding"].dump()), diffusion::sampler_options_to_json(o.decode));
  EXPECT_EQ(j["decoding"]["strategy"], "low_confidence_static");
  EXPECT_EQ(j["multiple_choice"]["samples"], 3);
  const auto& t = j["tasks"][0];
  EXPECT_EQ(t["sha256"], io::sha256_file_hex(task));
  EXPECT_EQ(t["records"], 3);
  EXPECT_EQ(t["n"], 2);
  EXPECT_EQ(t["skipped"], 1);
  EXPECT_EQ(t["skipped_items"][0]["id"], "b");
  EXPECT_EQ(t["skipped_items"][0]["status"], "empty_prompt");
  EXPECT_EQ(t["mc_n"], 1);
  for (const char* k : {"exact_match", "token_accuracy", "mc_accuracy", "tokens_per_forward", "forwards", "tokens_per_s"})
    EXPECT_TRUE(t.contains(k)) << k;
  EXPECT_EQ(j["gen_ppl"]["sha256"], io::sha256_file_hex(text));
  EXPECT_EQ(j["gen_ppl"]["n"], 2);
  EXPECT_GT(j["gen_ppl"]["gen_ppl"].get<double>(), 1.0);
  EXPECT_GT(j["gen_ppl"]["unigram_entropy"].get<double>(), 0.0);
  EXPECT_EQ(j["gen_ppl"]["sampling"]["temperature"], 1.0);
  EXPECT_EQ(j["state_kl"]["rows"], 2);
  EXPECT_GT(j["state_kl"]["own"].get<double>(), 0.0);
  EXPECT_GT(j["state_kl"]["random"].get<double>(), 0.0);
  EXPECT_GE(j["wall_seconds"].get<double>(), 0.0);
  // Without a teacher the state KL and a DLM's gen-PPL are skipped with a note, not an error.
  in.teacher = nullptr;
  in.teacher_path.clear();
  const nlohmann::ordered_json k = report_to_json(evaluate(in, o));
  EXPECT_TRUE(k["teacher"].is_null());
  EXPECT_NE(k["state_kl"]["note"].get<std::string>().find("no --teacher"), std::string::npos);
  EXPECT_FALSE(k["gen_ppl"].contains("gen_ppl"));
}
