// The evaluation harness: one code path for the AR teacher and the block-diffusion student (EM, token
// accuracy, TPF, tokens/s, multiple choice, gen-PPL, state KL) and the result JSON (docs/eval.md).
#include "opdlm/eval/harness.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "opdlm/base/error.hpp"
#include "opdlm/eval/completion.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/model/ar_generate.hpp"
#include "opdlm/train/opd_rows.hpp"

namespace opdlm::eval {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// The model's context: the sampler's max_context when set (DLM), else max_position_embeddings.
int64_t context_of(const model::Qwen3Model& m, const EvalOptions& o) {
  const int64_t mp = m.config().max_position_embeddings;
  return (o.mode == EvalMode::diffusion && o.decode.max_context > 0) ? std::min(o.decode.max_context, mp) : mp;
}

struct Encoded {
  ItemStatus status = ItemStatus::ok;
  std::string error;
  std::vector<int32_t> ids;
};

// Tokenizes one text and checks it against the model: the same rules (and status names) as the
// sampler's, plus the tokenizer's refusal, so AR and DLM skip the same records for the same reason.
// The tokenizer throws on invalid UTF-8; that is caught here, per record.
Encoded encode_checked(const io::Tokenizer& tok, const std::string& text, int64_t vocab, int64_t context,
                       bool is_prompt) {
  Encoded e;
  try {
    e.ids = tok.encode(text);
  } catch (const std::exception& ex) {
    e.status = ItemStatus::invalid_text;
    e.error = std::string("cannot tokenize: ") + ex.what();
    return e;
  }
  if (e.ids.empty()) {
    e.status = ItemStatus::empty_prompt;
    e.error = is_prompt ? "empty prompt" : "empty text";
    return e;
  }
  if (static_cast<int64_t>(e.ids.size()) >= context) {
    e.status = ItemStatus::prompt_too_long;
    e.error = std::to_string(e.ids.size()) + " tokens, the context holds " + std::to_string(context);
    return e;
  }
  for (size_t i = 0; i < e.ids.size(); ++i)
    if (e.ids[i] < 0 || e.ids[i] >= vocab) {
      e.status = ItemStatus::bad_token_id;
      e.error = "token " + std::to_string(i) + " id " + std::to_string(e.ids[i]) + " outside the vocabulary [0, " +
                std::to_string(vocab) + ")";
      return e;
    }
  return e;
}

ItemStatus from_rollout(diffusion::RolloutStatus s) {
  switch (s) {
    case diffusion::RolloutStatus::ok: return ItemStatus::ok;
    case diffusion::RolloutStatus::empty_prompt: return ItemStatus::empty_prompt;
    case diffusion::RolloutStatus::prompt_too_long: return ItemStatus::prompt_too_long;
    case diffusion::RolloutStatus::bad_token_id: return ItemStatus::bad_token_id;
  }
  return ItemStatus::bad_token_id;
}

// One decoded sequence, whichever the engine.
struct Decoded {
  ItemStatus status = ItemStatus::ok;
  std::string error;
  std::vector<int32_t> response, step_map;
  int64_t forwards = 0, commit_forwards = 0;
};

// Decodes a batch with the mode's engine: ar_generate (sampling `sp`) or bd_generate (o.decode with
// sampling `sp`). Sample ids key the draws, so a record decodes the same in any batch.
std::vector<Decoded> decode_batch(const model::Qwen3Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                  const std::vector<uint32_t>& ids, const EvalOptions& o, const ops::SamplingParams& sp) {
  std::vector<Decoded> out(prompts.size());
  if (prompts.empty()) return out;
  if (o.mode == EvalMode::ar) {
    model::ArGenerateOptions g;
    g.max_new_tokens = o.decode.max_new_tokens;
    g.sampling = sp;
    g.eos_id = o.decode.eos_id;
    g.pad_id = o.decode.pad_id;
    g.seed = o.decode.seed;
    g.step = o.decode.step;
    auto gens = model::ar_generate(m, prompts, ids, g);
    for (size_t i = 0; i < gens.size(); ++i) {
      out[i].response = std::move(gens[i].tokens);
      out[i].forwards = gens[i].forwards;
    }
  } else {
    diffusion::SamplerOptions so = o.decode;
    so.sampling = sp;
    auto rs = diffusion::bd_generate(m, prompts, ids, so);
    for (size_t i = 0; i < rs.size(); ++i) {
      out[i].status = from_rollout(rs[i].status);
      out[i].error = rs[i].error;
      out[i].response = std::move(rs[i].response);
      out[i].step_map = std::move(rs[i].step_map);
      out[i].forwards = rs[i].denoise_forwards;
      out[i].commit_forwards = rs[i].commit_forwards;
    }
  }
  return out;
}

// Records to evaluate (the first `limit`), each paired with its index in the file.
std::vector<size_t> selected(const io::PromptDataset& ds, int64_t limit) {
  std::vector<size_t> idx;
  for (size_t i = 0; i < ds.records.size(); ++i) {
    if (limit > 0 && static_cast<int64_t>(idx.size()) >= limit) break;
    idx.push_back(i);
  }
  return idx;
}

// Scores the multiple choice of one record in place. Candidates are the raw texts (gold first, then
// the distractors), tokenized alone and appended to the prompt ids: the data's convention is
// prompt + gold = the full text (KJV golds carry their leading space), and it matches decoding,
// which also continues the separately tokenized prompt.
void score_mc(const model::Qwen3Model& m, const io::Tokenizer& tok, const io::PromptRecord& rec, ItemResult& it,
              const EvalOptions& o) {
  it.has_mc = true;
  std::vector<std::string> texts{*rec.gold};
  texts.insert(texts.end(), rec.distractors.begin(), rec.distractors.end());
  const int64_t V = m.config().vocab_size, ctx = m.config().max_position_embeddings;
  std::vector<std::vector<int32_t>> cands;
  for (size_t c = 0; c < texts.size(); ++c) {
    // The whole prompt ⊕ candidate must fit the model's positions.
    Encoded e = encode_checked(tok, texts[c], V, ctx - static_cast<int64_t>(it.prompt_ids.size()) + 1, false);
    if (e.status != ItemStatus::ok) {
      it.mc_status = std::string(c == 0 ? "gold" : "distractor " + std::to_string(c - 1)) + ": " +
                     item_status_name(e.status) + ": " + e.error;
      return;
    }
    cands.push_back(std::move(e.ids));
  }
  for (const auto& c : cands)
    it.mc_scores.push_back(o.mode == EvalMode::ar ? mc_logprob_ar(m, it.prompt_ids, c)
                                                  : -mc_nll_dlm(m, it.prompt_ids, c, it.sample_id, o));
  // Ties go to the later candidate: the gold wins only when strictly more likely than every distractor.
  int64_t best = 0;
  for (size_t c = 1; c < it.mc_scores.size(); ++c)
    if (it.mc_scores[c] >= it.mc_scores[size_t(best)]) best = static_cast<int64_t>(c);
  it.mc_choice = best;
  it.mc_correct = best == 0;
  it.mc_status = "ok";
}

nlohmann::ordered_json sampling_json(const ops::SamplingParams& s) {
  return {{"temperature", s.temperature}, {"top_k", s.top_k}, {"top_p", s.top_p}};
}

nlohmann::ordered_json counts_json(const std::map<std::string, int64_t>& m) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [k, v] : m) j[k] = v;
  return j;
}

}  // namespace

const char* eval_mode_name(EvalMode m) { return m == EvalMode::ar ? "ar" : "diffusion"; }

EvalMode parse_eval_mode(const std::string& s, const std::string& field) {
  if (s == "ar") return EvalMode::ar;
  if (s == "diffusion") return EvalMode::diffusion;
  OPDLM_FAIL_AT("command line", field, "unknown mode '", s, "' (available: ar, diffusion)");
}

const char* item_status_name(ItemStatus s) {
  switch (s) {
    case ItemStatus::ok: return "ok";
    case ItemStatus::empty_prompt: return "empty_prompt";
    case ItemStatus::prompt_too_long: return "prompt_too_long";
    case ItemStatus::bad_token_id: return "bad_token_id";
    case ItemStatus::invalid_text: return "invalid_text";
    case ItemStatus::empty_response: return "empty_response";
    case ItemStatus::sequence_too_long: return "sequence_too_long";
  }
  return "unknown";
}

diffusion::SamplerOptions EvalOptions::default_decode() {
  diffusion::SamplerOptions s;
  s.block_size = 4;
  s.steps_per_block = 4;
  s.strategy = diffusion::Strategy::low_confidence_static;
  s.sampling = ops::SamplingParams{0.0, 0, 1.0};
  return s;
}

void EvalOptions::validate(int64_t vocab) const {
  if (batch_size < 1) OPDLM_FAIL_AT("eval options", "batch-size", "must be >= 1, got ", batch_size);
  if (limit < 0) OPDLM_FAIL_AT("eval options", "limit", "must be >= 0, got ", limit);
  if (mc_samples < 1) OPDLM_FAIL_AT("eval options", "mc-samples", "must be >= 1, got ", mc_samples);
  if (decode.max_new_tokens < 0) OPDLM_FAIL_AT("eval options", "max-new-tokens", "must be >= 0, got ", decode.max_new_tokens);
  decode.sampling.validate();
  gen_ppl_sampling.validate();
  if (mode == EvalMode::diffusion) decode.validate(vocab);
}

void fill_model_ids(EvalOptions& o, const model::Qwen3Config& c) {
  o.decode.eos_id = static_cast<int32_t>(c.eos_token_id);
  o.decode.pad_id = static_cast<int32_t>(c.pad_token_id >= 0 ? c.pad_token_id : std::max<int64_t>(c.eos_token_id, 0));
  if (o.decode.mask_id < 0) o.decode.mask_id = static_cast<int32_t>(c.mask_token_id);
}

// ---- multiple choice -------------------------------------------------------------------------------

double mc_logprob_ar(const model::Qwen3Model& m, std::span<const int32_t> prompt, std::span<const int32_t> cand) {
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  seq.insert(seq.end(), cand.begin(), cand.end());
  const auto lp = model::token_logprobs(m, seq);  // lp[t-1] = log p(seq[t] | seq[<t])
  double s = 0;
  for (size_t j = 0; j < cand.size(); ++j) s += lp[prompt.size() - 1 + j];
  return s;
}

double mc_nll_dlm(const model::Qwen3Model& m, std::span<const int32_t> prompt, std::span<const int32_t> cand,
                  uint32_t sample_id, const EvalOptions& o) {
  train::RowLossSpec spec;
  spec.objective = train::RowObjective::masked_ce;
  spec.ce_weighting = train::CeWeighting::inverse_t;
  spec.block_size = o.decode.block_size;
  spec.mask_id = o.decode.mask_id;
  spec.eos_id = -1;  // every candidate position is in the domain
  spec.pad_id = o.decode.pad_id;
  train::TrainingRow row;
  row.sample_id = sample_id;
  row.prompt.assign(prompt.begin(), prompt.end());
  row.x0.assign(cand.begin(), cand.end());
  double sum = 0;
  for (int64_t s = 0; s < o.mc_samples; ++s) {
    // The key holds no candidate information: every candidate of this length sees these masks and t.
    auto st = train::random_states(row.L1(), spec.block_size,
                                   RngKey{o.decode.seed, RngPurpose::random_mask, static_cast<uint32_t>(s), sample_id, 0});
    row.masked = std::move(st.masked);
    row.t_block = std::move(st.t);
    const train::RowLoss l = train::row_loss_eval(m, Tensor{}, row, spec);
    sum += l.loss * static_cast<double>(l.domain);  // row_loss_eval divides by |domain|
  }
  return sum / static_cast<double>(o.mc_samples);
}

// ---- tasks ---------------------------------------------------------------------------------------------

TaskResult eval_task(const model::Qwen3Model& m, const io::Tokenizer& tok, const io::PromptDataset& ds,
                     const std::string& task, const EvalOptions& o) {
  TaskResult r;
  r.task = task;
  r.records = static_cast<int64_t>(ds.records.size());
  const int64_t V = m.config().vocab_size, ctx = context_of(m, o);
  const auto idx = selected(ds, o.limit);
  for (size_t i : idx)
    if (!ds.records[i].gold) OPDLM_FAIL_AT(task, "gold", "record '", ds.records[i].id, "' has no gold answer");
  r.items.resize(idx.size());
  std::vector<size_t> good;  // positions in r.items
  for (size_t k = 0; k < idx.size(); ++k) {
    const io::PromptRecord& rec = ds.records[idx[k]];
    ItemResult& it = r.items[k];
    it.id = rec.id;
    it.prompt = rec.prompt;
    it.gold = trim(*rec.gold);
    it.sample_id = static_cast<uint32_t>(idx[k]);
    Encoded e = encode_checked(tok, rec.prompt, V, ctx, true);
    it.status = e.status;
    it.error = e.error;
    it.prompt_ids = std::move(e.ids);
    if (it.ok()) good.push_back(k);
  }
  for (size_t start = 0; start < good.size(); start += static_cast<size_t>(o.batch_size)) {
    const size_t end = std::min(good.size(), start + static_cast<size_t>(o.batch_size));
    std::vector<std::vector<int32_t>> prompts;
    std::vector<uint32_t> ids;
    for (size_t g = start; g < end; ++g) {
      prompts.push_back(r.items[good[g]].prompt_ids);
      ids.push_back(r.items[good[g]].sample_id);
    }
    const auto t0 = Clock::now();
    auto dec = decode_batch(m, prompts, ids, o, o.decode.sampling);
    r.decode_seconds += seconds_since(t0);
    for (size_t g = start; g < end; ++g) {
      ItemResult& it = r.items[good[g]];
      Decoded& d = dec[g - start];
      it.status = d.status;
      it.error = d.error;
      if (!it.ok()) continue;
      it.response = std::move(d.response);
      it.step_map = std::move(d.step_map);
      it.forwards = d.forwards;
      it.commit_forwards = d.commit_forwards;
      std::vector<int32_t> ids_no_eos = it.response;
      if (!ids_no_eos.empty() && ids_no_eos.back() == o.decode.eos_id) ids_no_eos.pop_back();
      it.answer = answer_text(tok.decode(ids_no_eos));
      it.correct = it.answer == it.gold;
      // The gold is valid UTF-8 (JSON) and the answer comes from decode (lossy, valid): both encode.
      const auto gold_ids = tok.encode(it.gold), ans_ids = tok.encode(it.answer);
      int64_t same = 0;
      for (size_t q = 0; q < std::min(gold_ids.size(), ans_ids.size()); ++q) same += gold_ids[q] == ans_ids[q];
      it.token_accuracy =
          gold_ids.empty() ? (ans_ids.empty() ? 1.0 : 0.0) : double(same) / double(gold_ids.size());
    }
  }
  double em = 0, tacc = 0;
  int64_t mc_right = 0;
  for (size_t k = 0; k < r.items.size(); ++k) {
    ItemResult& it = r.items[k];
    if (!it.ok()) {
      ++r.skipped;
      ++r.skipped_by_status[item_status_name(it.status)];
      continue;
    }
    ++r.n;
    em += it.correct;
    tacc += it.token_accuracy;
    r.generated_tokens += static_cast<int64_t>(it.response.size());
    r.forwards += it.forwards;
    r.commit_forwards += it.commit_forwards;
    const io::PromptRecord& rec = ds.records[idx[k]];
    if (!rec.distractors.empty()) {
      score_mc(m, tok, rec, it, o);
      if (it.mc_status == "ok") {
        ++r.mc_n;
        mc_right += it.mc_correct;
      } else {
        ++r.mc_skipped;
      }
    }
  }
  r.exact_match = r.n ? em / double(r.n) : 0;
  r.token_accuracy = r.n ? tacc / double(r.n) : 0;
  r.mc_accuracy = r.mc_n ? double(mc_right) / double(r.mc_n) : 0;
  if (o.mode == EvalMode::ar) r.tokens_per_forward = 1;  // one token per forward by construction
  else r.tokens_per_forward = r.forwards ? double(r.generated_tokens) / double(r.forwards) : 0;
  r.tokens_per_s = r.decode_seconds > 0 ? double(r.generated_tokens) / r.decode_seconds : 0;
  return r;
}

// ---- gen-PPL -------------------------------------------------------------------------------------------

double unigram_entropy(std::span<const int32_t> tokens) {
  if (tokens.empty()) return 0;
  std::unordered_map<int32_t, int64_t> count;
  for (int32_t t : tokens) ++count[t];
  const double n = static_cast<double>(tokens.size());
  double h = 0;
  for (const auto& [t, c] : count) {
    const double p = double(c) / n;
    h -= p * std::log(p);
  }
  return h;
}

GenPplResult gen_ppl(const model::Qwen3Model& m, const model::Qwen3Model& teacher, const io::Tokenizer& tok,
                     const io::PromptDataset& ds, const std::string& task, const EvalOptions& o) {
  GenPplResult r;
  r.task = task;
  r.records = static_cast<int64_t>(ds.records.size());
  const int64_t V = m.config().vocab_size, ctx = context_of(m, o);
  const int64_t TV = teacher.config().vocab_size, tctx = teacher.config().max_position_embeddings;
  const auto idx = selected(ds, o.limit);
  r.samples.resize(idx.size());
  std::vector<std::vector<int32_t>> prompt_ids(idx.size());
  std::vector<size_t> good;
  for (size_t k = 0; k < idx.size(); ++k) {
    auto& s = r.samples[k];
    s.id = ds.records[idx[k]].id;
    Encoded e = encode_checked(tok, ds.records[idx[k]].prompt, std::min(V, TV), ctx, true);
    s.status = e.status;
    s.error = e.error;
    prompt_ids[k] = std::move(e.ids);
    if (s.status == ItemStatus::ok) good.push_back(k);
  }
  for (size_t start = 0; start < good.size(); start += static_cast<size_t>(o.batch_size)) {
    const size_t end = std::min(good.size(), start + static_cast<size_t>(o.batch_size));
    std::vector<std::vector<int32_t>> prompts;
    std::vector<uint32_t> ids;
    for (size_t g = start; g < end; ++g) {
      prompts.push_back(prompt_ids[good[g]]);
      ids.push_back(static_cast<uint32_t>(idx[good[g]]));
    }
    auto dec = decode_batch(m, prompts, ids, o, o.gen_ppl_sampling);
    for (size_t g = start; g < end; ++g) {
      auto& s = r.samples[good[g]];
      Decoded& d = dec[g - start];
      s.status = d.status;
      s.error = d.error;
      if (s.status != ItemStatus::ok) continue;
      s.response = std::move(d.response);
      const auto& p = prompt_ids[good[g]];
      if (s.response.empty()) {
        s.status = ItemStatus::empty_response;
        s.error = "the model generated no token";
        continue;
      }
      if (static_cast<int64_t>(p.size() + s.response.size()) > tctx) {
        s.status = ItemStatus::sequence_too_long;
        s.error = "prompt + response is " + std::to_string(p.size() + s.response.size()) +
                  " tokens, the teacher's context " + std::to_string(tctx);
        continue;
      }
      // A student with a grown embedding may draw ids the teacher cannot score.
      if (auto bad = std::find_if(s.response.begin(), s.response.end(), [&](int32_t t) { return t >= TV; });
          bad != s.response.end()) {
        s.status = ItemStatus::bad_token_id;
        s.error = "generated id " + std::to_string(*bad) + " outside the teacher's vocabulary";
        continue;
      }
      s.nll = -mc_logprob_ar(teacher, p, s.response);
      s.entropy = unigram_entropy(s.response);
    }
  }
  std::vector<int32_t> pooled;
  double nll = 0, ppl_sum = 0, ent_sum = 0;
  for (const auto& s : r.samples) {
    if (s.status != ItemStatus::ok) {
      ++r.skipped;
      ++r.skipped_by_status[item_status_name(s.status)];
      continue;
    }
    ++r.n;
    nll += s.nll;
    pooled.insert(pooled.end(), s.response.begin(), s.response.end());
    ppl_sum += std::exp(s.nll / double(s.response.size()));
    ent_sum += s.entropy;
  }
  r.tokens = static_cast<int64_t>(pooled.size());
  r.mean_nll = r.tokens ? nll / double(r.tokens) : 0;
  r.gen_ppl = r.tokens ? std::exp(r.mean_nll) : 0;
  r.mean_sample_ppl = r.n ? ppl_sum / double(r.n) : 0;
  r.unigram_entropy = unigram_entropy(pooled);
  r.mean_sample_entropy = r.n ? ent_sum / double(r.n) : 0;
  return r;
}

// ---- whole evaluation ------------------------------------------------------------------------------------

EvalReport evaluate(const EvalInputs& in, const EvalOptions& o) {
  OPDLM_CHECK(in.model && in.tok, "evaluate: a model and a tokenizer are required");
  const auto t0 = Clock::now();
  EvalReport r;
  r.options = o;
  o.validate(in.model->config().vocab_size);
  r.model_path = in.model_path;
  if (!in.model_path.empty()) r.model_sha256 = io::sha256_file_hex(in.model_path);
  r.teacher_path = in.teacher_path;
  if (!in.teacher_path.empty()) r.teacher_sha256 = io::sha256_file_hex(in.teacher_path);
  r.tokenizer_path = in.tokenizer_path;
  if (!in.tokenizer_path.empty()) r.tokenizer_sha256 = io::sha256_file_hex(in.tokenizer_path);

  std::vector<std::string> task_hashes;
  for (const auto& path : in.task_paths) {
    const io::PromptDataset ds = io::load_prompt_jsonl(path);
    TaskResult t = eval_task(*in.model, *in.tok, ds, path, o);
    t.sha256 = io::sha256_file_hex(path);
    r.tasks.push_back(std::move(t));
  }

  if (!in.gen_ppl_path.empty()) {
    // The AR teacher's own samples scored by itself are the floor; a DLM needs a teacher.
    const model::Qwen3Model* scorer = in.teacher ? in.teacher : (o.mode == EvalMode::ar ? in.model : nullptr);
    if (!scorer) {
      r.gen_ppl_note = "skipped: no --teacher given (a diffusion model's samples are scored by the AR teacher)";
    } else {
      r.gen_ppl_note = in.teacher ? "scored by the teacher" : "no teacher given: the AR model scores its own samples (the floor)";
      GenPplResult g = gen_ppl(*in.model, *scorer, *in.tok, io::load_prompt_jsonl(in.gen_ppl_path), in.gen_ppl_path, o);
      g.sha256 = io::sha256_file_hex(in.gen_ppl_path);
      r.gen_ppl = std::move(g);
    }
  } else {
    r.gen_ppl_note = "skipped: no --gen-ppl-tasks given";
  }

  if (o.mode == EvalMode::ar) {
    r.state_kl_note = "not applicable: the AR model has no denoising states";
  } else if (!in.teacher) {
    r.state_kl_note = "skipped: no --teacher given";
  } else if (in.teacher->config().vocab_size != in.model->config().vocab_size) {
    r.state_kl_note = "skipped: the teacher's vocabulary (" + std::to_string(in.teacher->config().vocab_size) +
                      ") differs from the student's (" + std::to_string(in.model->config().vocab_size) + ")";
  } else {
    // The student's own states: the step maps of its evaluation decodes (every task's scored items).
    std::vector<train::RolloutView> views;
    for (const auto& t : r.tasks)
      for (const auto& it : t.items)
        if (it.ok() && !it.response.empty()) views.push_back({it.sample_id, it.prompt_ids, it.response, it.step_map});
    train::RowLossSpec spec;
    spec.block_size = o.decode.block_size;
    spec.mask_id = o.decode.mask_id;
    spec.eos_id = o.decode.eos_id;
    spec.pad_id = o.decode.pad_id;
    spec.exclude_eos = true;
    const train::StateKl k = train::state_kl(*in.teacher, *in.model, views, spec, o.decode.seed, o.decode.step);
    r.state_kl = nlohmann::json{{"own", k.own},
                                {"random", k.random},
                                {"gap", k.random - k.own},
                                {"rows", k.rows},
                                {"skipped", k.skipped},
                                {"own_positions", k.own_positions},
                                {"random_positions", k.random_positions}};
    r.state_kl_note = "forward KL(teacher || student), full vocabulary, token mean per row then mean over rows; "
                      "states from the evaluation decodes of every task (one state per block) and random_states "
                      "with the decoding seed";
  }
  r.wall_seconds = seconds_since(t0);
  return r;
}

nlohmann::ordered_json item_to_json(const std::string& task, const ItemResult& it) {
  // The first six keys are the AR harness's item format (scripts read them).
  nlohmann::ordered_json j{{"task", task},     {"id", it.id},           {"prompt", it.prompt},
                           {"gold", it.gold},  {"answer", it.answer},   {"correct", it.correct},
                           {"status", item_status_name(it.status)}};
  if (!it.ok()) {
    j["reason"] = it.error;
    return j;
  }
  j["token_accuracy"] = it.token_accuracy;
  j["response_ids"] = it.response;
  if (!it.step_map.empty()) j["step_map"] = it.step_map;
  j["forwards"] = it.forwards;
  if (it.commit_forwards) j["commit_forwards"] = it.commit_forwards;
  if (it.has_mc) {
    j["mc_status"] = it.mc_status;
    if (it.mc_status == "ok") {
      j["mc_scores"] = it.mc_scores;
      j["mc_choice"] = it.mc_choice;
      j["mc_correct"] = it.mc_correct;
    }
  }
  return j;
}

nlohmann::ordered_json report_to_json(const EvalReport& r) {
  const EvalOptions& o = r.options;
  nlohmann::ordered_json j;
  j["format"] = "opdlm-eval/1";
  j["mode"] = eval_mode_name(o.mode);
  j["model"] = {{"path", r.model_path}, {"sha256", r.model_sha256}};
  j["teacher"] = r.teacher_path.empty() ? nlohmann::ordered_json(nullptr)
                                        : nlohmann::ordered_json{{"path", r.teacher_path}, {"sha256", r.teacher_sha256}};
  j["tokenizer"] = {{"path", r.tokenizer_path}, {"sha256", r.tokenizer_sha256}};
  nlohmann::ordered_json dec;
  if (o.mode == EvalMode::diffusion) {
    dec = nlohmann::ordered_json::parse(diffusion::sampler_options_to_json(o.decode).dump());
  } else {
    dec = {{"max_new_tokens", o.decode.max_new_tokens}, {"sampling", sampling_json(o.decode.sampling)},
           {"eos_id", o.decode.eos_id}, {"pad_id", o.decode.pad_id}, {"seed", o.decode.seed}, {"step", o.decode.step}};
  }
  j["decoding"] = dec;
  j["batch_size"] = o.batch_size;
  j["limit"] = o.limit;
  j["multiple_choice"] = o.mode == EvalMode::ar
                             ? nlohmann::ordered_json{{"score", "sum of candidate token log-probs given the prompt"}}
                             : nlohmann::ordered_json{{"score", "minus the ELBO NLL bound (masked_ce, inverse_t)"},
                                                      {"samples", o.mc_samples},
                                                      {"seed", o.decode.seed},
                                                      {"block_size", o.decode.block_size}};
  nlohmann::ordered_json tasks = nlohmann::ordered_json::array();
  for (const auto& t : r.tasks) {
    nlohmann::ordered_json tj{{"task", t.task},
                              {"sha256", t.sha256},
                              {"records", t.records},
                              {"n", t.n},
                              {"skipped", t.skipped},
                              {"skipped_by_status", counts_json(t.skipped_by_status)},
                              {"exact_match", t.exact_match},
                              {"token_accuracy", t.token_accuracy}};
    if (t.mc_n + t.mc_skipped > 0) {
      tj["mc_accuracy"] = t.mc_accuracy;
      tj["mc_n"] = t.mc_n;
      tj["mc_skipped"] = t.mc_skipped;
    }
    tj["generated_tokens"] = t.generated_tokens;
    tj["forwards"] = t.forwards;
    if (o.mode == EvalMode::diffusion) tj["commit_forwards"] = t.commit_forwards;
    tj["tokens_per_forward"] = t.tokens_per_forward;
    tj["decode_seconds"] = t.decode_seconds;
    tj["tokens_per_s"] = t.tokens_per_s;
    nlohmann::ordered_json sk = nlohmann::ordered_json::array();
    for (const auto& it : t.items)
      if (!it.ok()) sk.push_back({{"id", it.id}, {"status", item_status_name(it.status)}, {"reason", it.error}});
    tj["skipped_items"] = sk;
    tasks.push_back(std::move(tj));
  }
  j["tasks"] = tasks;
  nlohmann::ordered_json gp{{"note", r.gen_ppl_note}};
  if (r.gen_ppl) {
    const GenPplResult& g = *r.gen_ppl;
    gp.update(nlohmann::ordered_json{{"task", g.task},
                                     {"sha256", g.sha256},
                                     {"records", g.records},
                                     {"n", g.n},
                                     {"skipped", g.skipped},
                                     {"skipped_by_status", counts_json(g.skipped_by_status)},
                                     {"sampling", sampling_json(o.gen_ppl_sampling)},
                                     {"seed", o.decode.seed},
                                     {"tokens", g.tokens},
                                     {"mean_nll", g.mean_nll},
                                     {"gen_ppl", g.gen_ppl},
                                     {"mean_sample_ppl", g.mean_sample_ppl},
                                     {"unigram_entropy", g.unigram_entropy},
                                     {"mean_sample_entropy", g.mean_sample_entropy}});
    nlohmann::ordered_json sk = nlohmann::ordered_json::array();
    for (const auto& s : g.samples)
      if (s.status != ItemStatus::ok) sk.push_back({{"id", s.id}, {"status", item_status_name(s.status)}, {"reason", s.error}});
    gp["skipped_items"] = sk;
  }
  j["gen_ppl"] = gp;
  nlohmann::ordered_json kl{{"note", r.state_kl_note}};
  if (r.state_kl) kl.update(nlohmann::ordered_json::parse(r.state_kl->dump()));
  j["state_kl"] = kl;
  j["wall_seconds"] = r.wall_seconds;
  return j;
}

}  // namespace opdlm::eval
