// Qwen3Config: the Hugging Face `config.json` fields opdlm uses, read and written as JSON and
// validated with errors that name the file and the field.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace opdlm::model {

// Upper bounds on the sizes a config.json may ask for, checked before anything is allocated: a
// hostile or corrupt file must be an error, not a 100 GB allocation or an integer overflow. They are
// far above any Qwen3 (151,936 ids, hidden 5,120, 64 layers, 64 heads, head_dim 128, FFN 25,600).
struct Qwen3ConfigLimits {
  static constexpr int64_t kMaxVocab = int64_t{1} << 24;
  static constexpr int64_t kMaxHidden = int64_t{1} << 16;
  static constexpr int64_t kMaxIntermediate = int64_t{1} << 20;
  static constexpr int64_t kMaxLayers = int64_t{1} << 10;
  static constexpr int64_t kMaxHeads = int64_t{1} << 10;
  static constexpr int64_t kMaxHeadDim = int64_t{1} << 12;
  static constexpr int64_t kMaxPositions = int64_t{1} << 24;
};

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
  // Positive sizes within Qwen3ConfigLimits, heads divisible by KV heads, even head_dim, ids inside the
  // vocabulary, eps > 0.
  void validate(const std::string& source) const;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // Parameters of the weights (tied head counted once).
  int64_t num_params() const;
  bool operator==(const Qwen3Config&) const = default;
};

}  // namespace opdlm::model
