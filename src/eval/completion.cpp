// Exact-match completion evaluation with AR decoding.
#include "opdlm/eval/completion.hpp"

#include <algorithm>

#include "opdlm/base/error.hpp"

namespace opdlm::eval {

namespace {
std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}
}  // namespace

std::string answer_text(const std::string& generated) {
  return trim(generated.substr(0, std::min(generated.find('\n'), generated.size())));
}

CompletionResult eval_completion_ar(const model::Qwen3Model& model, const io::Tokenizer& tok,
                                    const io::PromptDataset& ds, const std::string& task,
                                    const CompletionOptions& o) {
  CompletionResult r;
  r.task = task;
  const auto& cfg = model.config();
  std::vector<const io::PromptRecord*> recs;
  for (const auto& rec : ds.records) {
    if (!rec.gold) OPDLM_FAIL_AT(task, "gold", "record '", rec.id, "' has no gold answer");
    recs.push_back(&rec);
    if (o.limit > 0 && static_cast<int64_t>(recs.size()) >= o.limit) break;
  }
  model::ArGenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.sampling = o.sampling;
  g.eos_id = static_cast<int32_t>(cfg.eos_token_id);
  g.pad_id = static_cast<int32_t>(cfg.pad_token_id >= 0 ? cfg.pad_token_id : std::max<int64_t>(cfg.eos_token_id, 0));
  g.seed = o.seed;
  double em = 0, tacc = 0;
  for (size_t start = 0; start < recs.size(); start += static_cast<size_t>(o.batch_size)) {
    const size_t end = std::min(recs.size(), start + static_cast<size_t>(o.batch_size));
    std::vector<std::vector<int32_t>> prompts;
    std::vector<uint32_t> sample_ids;
    for (size_t i = start; i < end; ++i) {
      prompts.push_back(tok.encode(recs[i]->prompt));
      sample_ids.push_back(static_cast<uint32_t>(i));
    }
    auto gens = model::ar_generate(model, prompts, sample_ids, g);
    for (size_t i = start; i < end; ++i) {
      std::vector<int32_t> ids = gens[i - start].tokens;
      if (!ids.empty() && ids.back() == g.eos_id) ids.pop_back();
      CompletionItem it;
      it.id = recs[i]->id;
      it.prompt = recs[i]->prompt;
      it.gold = trim(*recs[i]->gold);
      it.answer = answer_text(tok.decode(ids));
      it.correct = it.answer == it.gold;
      const auto gold_ids = tok.encode(it.gold), ans_ids = tok.encode(it.answer);
      int64_t same = 0;
      for (size_t k = 0; k < std::min(gold_ids.size(), ans_ids.size()); ++k) same += gold_ids[k] == ans_ids[k];
      it.token_accuracy = gold_ids.empty() ? (ans_ids.empty() ? 1.0 : 0.0) : double(same) / double(gold_ids.size());
      em += it.correct;
      tacc += it.token_accuracy;
      r.items.push_back(std::move(it));
    }
  }
  r.n = static_cast<int64_t>(r.items.size());
  r.exact_match = r.n ? em / double(r.n) : 0;
  r.token_accuracy = r.n ? tacc / double(r.n) : 0;
  return r;
}

}  // namespace opdlm::eval
