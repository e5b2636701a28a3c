// Completion tasks scored by exact match: each JSONL record's prompt is decoded by the model and
// the answer (text before the first newline or EOS, trimmed) is compared with the trimmed gold.
// answer_text is shared with eval/harness.hpp, which evaluates AR and block-diffusion models alike
// (`opdlm eval`); eval_completion_ar is the original AR-only loop, kept for library callers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "opdlm/model/ar_generate.hpp"

namespace opdlm::eval {

struct CompletionOptions {
  int64_t max_new_tokens = 64;
  int64_t batch_size = 16;
  int64_t limit = 0;  // 0: every record
  uint32_t seed = 0;
  ops::SamplingParams sampling{0.0, 0, 1.0};  // greedy
};

struct CompletionItem {
  std::string id, prompt, gold, answer;
  bool correct = false;
  double token_accuracy = 0;  // matching tokens at equal positions / gold tokens
};

struct CompletionResult {
  std::string task;
  int64_t n = 0;
  double exact_match = 0;
  double token_accuracy = 0;
  double tokens_per_forward = 1;  // AR: always 1
  std::vector<CompletionItem> items;
};

// The part of `generated` a task scores: up to the first newline, whitespace-trimmed.
std::string answer_text(const std::string& generated);

CompletionResult eval_completion_ar(const model::Qwen3Model& model, const io::Tokenizer& tok,
                                    const io::PromptDataset& ds, const std::string& task,
                                    const CompletionOptions& opts);

}  // namespace opdlm::eval
