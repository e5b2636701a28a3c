// Qwen3Config: the Hugging Face `config.json` fields opdlm uses, read and written as JSON and
// validated with errors that name the file and the field.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace opdlm::model {

struct Qwen3Config {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // Qwen3 allows head_dim != hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 1e6;
  bool tie_word_embeddings = true;
  int64_t max_position_embeddings = 40960;
  int64_t bos_token_id = -1;   // -1: none
  int64_t eos_token_id = -1;
  int64_t pad_token_id = -1;   // opdlm extension when absent from config.json
  int64_t mask_token_id = -1;  // opdlm extension: the block-diffusion [MASK] id (algorithm.md A 8)

  // `source` names the file in errors. Unknown fields are ignored (HF configs carry many);
  // fields opdlm needs are required unless they have a Qwen3 default above.
  static Qwen3Config from_json(const nlohmann::json& j, const std::string& source);
  static Qwen3Config load(const std::string& path);  // a config.json
  nlohmann::json to_json() const;                     // HF field names, model_type "qwen3"
  void save(const std::string& path) const;
  // Positive sizes, heads divisible by KV heads, even head_dim, ids inside the vocabulary, eps > 0.
  void validate(const std::string& source) const;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // Parameters of the weights (tied head counted once).
  int64_t num_params() const;
  bool operator==(const Qwen3Config&) const = default;
};

}  // namespace opdlm::model
