// The evaluation harness for the AR teacher and the block-diffusion (DLM) student through one code
// path (docs/eval.md): exact match / token accuracy of decoded answers with tokens per forward and
// tokens/s, multiple choice by likelihood (AR: summed log-probs; DLM: a fixed-mask ELBO estimate),
// generative perplexity under the teacher with unigram entropy, KL(teacher || student) on the
// student's own decoding states and on random-mask states, and the result JSON. Bad prompts are
// reported per sample and skipped, never thrown.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/sampling.hpp"

namespace opdlm::eval {

enum class EvalMode : uint8_t { ar, diffusion };
const char* eval_mode_name(EvalMode m);
EvalMode parse_eval_mode(const std::string& s, const std::string& field = "mode");

struct EvalOptions {
  EvalMode mode = EvalMode::ar;
  int64_t batch_size = 16;
  int64_t limit = 0;  // records per task file (0: all)
  // Every decoding knob. The AR path reads max_new_tokens, sampling, seed, eos_id, pad_id; the DLM
  // path all of it (mask_id required). Defaults are the evaluation settings of algorithm.md A 5:
  // b = 4, s = 4, low_confidence_static, greedy.
  diffusion::SamplerOptions decode = default_decode();
  // Multiple choice, DLM: ELBO samples per candidate (fixed masks, see mc_nll_dlm).
  int64_t mc_samples = 8;
  // Gen-PPL decoding: `decode` with this sampling (default: temperature 1, no top-k / top-p) and
  // seed `decode.seed`.
  ops::SamplingParams gen_ppl_sampling{1.0, 0, 1.0};

  static diffusion::SamplerOptions default_decode();
  void validate(int64_t vocab) const;  // Error naming the field
};

// Fills decode.eos_id and decode.pad_id from the model config (pad: pad_token_id, else
// max(eos, 0), as the AR path always did) and decode.mask_id from mask_token_id when it is < 0.
void fill_model_ids(EvalOptions& o, const model::Qwen3Config& c);

// Why a record (or a gen-PPL sample) was not scored: ok, the sampler's statuses, the tokenizer's
// refusal (invalid UTF-8 and the like), and for gen-PPL an empty response or a prompt ⊕ response
// longer than the teacher's context.
enum class ItemStatus : uint8_t {
  ok, empty_prompt, prompt_too_long, bad_token_id, invalid_text, empty_response, sequence_too_long
};
const char* item_status_name(ItemStatus s);

struct ItemResult {
  std::string id, prompt, gold, answer;
  ItemStatus status = ItemStatus::ok;
  std::string error;  // the reason, when status != ok
  uint32_t sample_id = 0;  // the record's index in its file: keys its draws and ELBO masks
  bool correct = false;
  double token_accuracy = 0;
  std::vector<int32_t> prompt_ids, response;  // response: as decoded (EOS included when reached)
  std::vector<int32_t> step_map;              // DLM only
  int64_t forwards = 0;                       // AR: decoding forwards; DLM: denoising forwards
  int64_t commit_forwards = 0;                // DLM only
  // Multiple choice (records with distractors). scores[0] is the gold, then the distractors in
  // file order: summed log-prob (AR) or minus the ELBO NLL bound (DLM); higher is better.
  bool has_mc = false;
  std::string mc_status;  // "ok", or why the record's multiple choice was skipped
  std::vector<double> mc_scores;
  int64_t mc_choice = -1;
  bool mc_correct = false;
  bool ok() const { return status == ItemStatus::ok; }
};

struct TaskResult {
  std::string task;  // the path (or name) given
  std::string sha256;
  int64_t records = 0;  // records in the file
  int64_t n = 0;        // records scored (status ok)
  int64_t skipped = 0;
  std::map<std::string, int64_t> skipped_by_status;
  double exact_match = 0, token_accuracy = 0;
  int64_t mc_n = 0;  // records whose multiple choice was scored
  int64_t mc_skipped = 0;
  double mc_accuracy = 0;
  int64_t generated_tokens = 0, forwards = 0, commit_forwards = 0;
  double tokens_per_forward = 0;  // AR: 1; DLM: generated tokens / denoising forwards
  double decode_seconds = 0, tokens_per_s = 0;
  std::vector<ItemResult> items;
};

// Exact match, token accuracy, TPF and (for records with distractors) multiple choice of one task.
// `task` names the dataset in errors and results. A record without gold is an Error naming it.
TaskResult eval_task(const model::Qwen3Model& model, const io::Tokenizer& tok, const io::PromptDataset& ds,
                     const std::string& task, const EvalOptions& o);

// ---- multiple choice -------------------------------------------------------------------------------
// AR: sum over the candidate's tokens of log p(c_j | prompt ⊕ c_<j) (model::token_logprobs).
double mc_logprob_ar(const model::Qwen3Model& model, std::span<const int32_t> prompt, std::span<const int32_t> cand);
// DLM: the NLL upper bound (1/t-weighted masked cross-entropy, train::row_loss_eval with masked_ce,
// inverse_t, eos_id = -1) averaged over `samples` states; state s is
// train::random_states(|cand|, b, {seed, random_mask, step = s, sample_id, 0}), so every candidate of
// the same length sees the same masks and t. Returns the mean of sum_{masked j} w_k CE_j.
double mc_nll_dlm(const model::Qwen3Model& model, std::span<const int32_t> prompt, std::span<const int32_t> cand,
                  uint32_t sample_id, const EvalOptions& o);

// ---- generative perplexity --------------------------------------------------------------------------
struct GenPplResult {
  std::string task, sha256;
  int64_t records = 0, n = 0, skipped = 0;
  std::map<std::string, int64_t> skipped_by_status;
  int64_t tokens = 0;            // generated tokens scored (EOS included when generated)
  double mean_nll = 0;           // token mean over all generated tokens (nats)
  double gen_ppl = 0;            // exp(mean_nll)
  double mean_sample_ppl = 0;    // mean over samples of exp(sample token-mean NLL)
  double unigram_entropy = 0;    // nats, of the pooled generated tokens
  double mean_sample_entropy = 0;  // mean over samples of each sample's unigram entropy
  struct Sample {
    std::string id;
    ItemStatus status = ItemStatus::ok;
    std::string error;
    std::vector<int32_t> response;
    double nll = 0;  // summed over the response
    double entropy = 0;
  };
  std::vector<Sample> samples;
};
// Decodes every prompt with `model` (o.decode with o.gen_ppl_sampling) and scores the responses
// under `teacher` causally given the prompt. Samples whose prompt is bad, whose response is empty
// or whose prompt ⊕ response exceeds the teacher's context are skipped with a reason.
GenPplResult gen_ppl(const model::Qwen3Model& model, const model::Qwen3Model& teacher, const io::Tokenizer& tok,
                     const io::PromptDataset& ds, const std::string& task, const EvalOptions& o);

// Unigram entropy (nats) of a token multiset: -sum_v p_v log p_v, p_v = count_v / n.
double unigram_entropy(std::span<const int32_t> tokens);

// ---- whole evaluation --------------------------------------------------------------------------------
struct EvalInputs {
  const model::Qwen3Model* model = nullptr;
  std::string model_path;                      // hashed (sha256) when non-empty
  const model::Qwen3Model* teacher = nullptr;  // optional
  std::string teacher_path;
  const io::Tokenizer* tok = nullptr;
  std::string tokenizer_path;
  std::vector<std::string> task_paths;
  std::string gen_ppl_path;  // optional
};

struct EvalReport {
  EvalOptions options;
  std::string model_path, model_sha256, teacher_path, teacher_sha256, tokenizer_path, tokenizer_sha256;
  std::vector<TaskResult> tasks;
  std::optional<GenPplResult> gen_ppl;
  std::string gen_ppl_note;  // why gen-PPL was not computed, or which model scored it
  std::optional<nlohmann::json> state_kl;
  std::string state_kl_note;
  double wall_seconds = 0;
};

// Runs every task, gen-PPL (teacher: `teacher`, else the model itself in AR mode, else skipped with
// a note) and the state KL (DLM with a teacher; otherwise skipped with a note).
EvalReport evaluate(const EvalInputs& in, const EvalOptions& o);

// The result JSON (docs/eval.md "Result JSON").
nlohmann::ordered_json report_to_json(const EvalReport& r);
// One JSON object per item: task, id, prompt, gold, answer, correct, then status, reason, metrics.
nlohmann::ordered_json item_to_json(const std::string& task, const ItemResult& it);

}  // namespace opdlm::eval
