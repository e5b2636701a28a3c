// Qwen3Config <-> Hugging Face config.json, with field-level validation.
#include "opdlm/model/qwen3_config.hpp"

#include <fstream>
#include <nlohmann/json.hpp>

#include "opdlm/base/error.hpp"

namespace opdlm::model {
namespace {

int64_t get_int(const nlohmann::json& j, const char* key, const std::string& src, bool required, int64_t dflt) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) OPDLM_FAIL_AT(src, key, "required field is missing");
    return dflt;
  }
  const auto& v = j[key];
  if (v.is_array()) {  // some configs list several eos ids: opdlm stops on the first
    if (v.empty() || !v[0].is_number_integer()) OPDLM_FAIL_AT(src, key, "expected an integer or a list of integers");
    return v[0].get<int64_t>();
  }
  if (!v.is_number_integer()) OPDLM_FAIL_AT(src, key, "expected an integer, got ", v.dump());
  return v.get<int64_t>();
}

double get_num(const nlohmann::json& j, const char* key, const std::string& src, double dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) OPDLM_FAIL_AT(src, key, "expected a number, got ", j[key].dump());
  return j[key].get<double>();
}

}  // namespace

Qwen3Config Qwen3Config::from_json(const nlohmann::json& j, const std::string& src) {
  if (!j.is_object()) OPDLM_FAIL_AT(src, "", "config must be a JSON object");
  if (j.contains("model_type") && j["model_type"].is_string()) {
    const std::string mt = j["model_type"].get<std::string>();
    if (mt != "qwen3" && mt != "a2d-qwen3")
      OPDLM_FAIL_AT(src, "model_type", "unsupported model_type '", mt, "' (expected qwen3)");
  }
  if (j.contains("attention_bias") && j["attention_bias"].is_boolean() && j["attention_bias"].get<bool>())
    OPDLM_FAIL_AT(src, "attention_bias", "attention biases are not supported (Qwen3 has none)");
  Qwen3Config c;
  c.vocab_size = get_int(j, "vocab_size", src, true, 0);
  c.hidden_size = get_int(j, "hidden_size", src, true, 0);
  c.intermediate_size = get_int(j, "intermediate_size", src, true, 0);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", src, true, 0);
  c.num_attention_heads = get_int(j, "num_attention_heads", src, true, 0);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", src, false, c.num_attention_heads);
  c.head_dim = get_int(j, "head_dim", src, false,
                       c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", src, 1e-6);
  c.rope_theta = get_num(j, "rope_theta", src, 1e6);
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean()) OPDLM_FAIL_AT(src, "tie_word_embeddings", "expected true or false");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    OPDLM_FAIL_AT(src, "rope_scaling", "RoPE scaling is not supported");
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, false, 40960);
  c.bos_token_id = get_int(j, "bos_token_id", src, false, -1);
  c.eos_token_id = get_int(j, "eos_token_id", src, false, -1);
  c.pad_token_id = get_int(j, "pad_token_id", src, false, -1);
  c.mask_token_id = get_int(j, "mask_token_id", src, false, -1);
  c.validate(src);
  return c;
}

Qwen3Config Qwen3Config::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open config file");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    OPDLM_FAIL_AT(path, "", "invalid JSON: ", e.what());
  }
  return from_json(j, path);
}

nlohmann::json Qwen3Config::to_json() const {
  nlohmann::json j = {{"architectures", {"Qwen3ForCausalLM"}},
                      {"model_type", "qwen3"},
                      {"vocab_size", vocab_size},
                      {"hidden_size", hidden_size},
                      {"intermediate_size", intermediate_size},
                      {"num_hidden_layers", num_hidden_layers},
                      {"num_attention_heads", num_attention_heads},
                      {"num_key_value_heads", num_key_value_heads},
                      {"head_dim", head_dim},
                      {"rms_norm_eps", rms_norm_eps},
                      {"rope_theta", rope_theta},
                      {"rope_scaling", nullptr},
                      {"attention_bias", false},
                      {"hidden_act", "silu"},
                      {"tie_word_embeddings", tie_word_embeddings},
                      {"max_position_embeddings", max_position_embeddings},
                      {"torch_dtype", "float32"}};
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  if (pad_token_id >= 0) j["pad_token_id"] = pad_token_id;
  if (mask_token_id >= 0) j["mask_token_id"] = mask_token_id;
  return j;
}

void Qwen3Config::save(const std::string& path) const {
  std::ofstream out(path);
  if (!out) OPDLM_FAIL_AT(path, "", "cannot write config file");
  out << to_json().dump(2) << "\n";
  if (!out) OPDLM_FAIL_AT(path, "", "write failed");
}

void Qwen3Config::validate(const std::string& src) const {
  using L = Qwen3ConfigLimits;
  auto positive = [&](int64_t v, const char* f, int64_t max) {
    if (v <= 0) OPDLM_FAIL_AT(src, f, "must be positive, got ", v);
    if (v > max) OPDLM_FAIL_AT(src, f, v, " exceeds the limit ", max, " (a corrupt or hostile config?)");
  };
  positive(vocab_size, "vocab_size", L::kMaxVocab);
  positive(hidden_size, "hidden_size", L::kMaxHidden);
  positive(intermediate_size, "intermediate_size", L::kMaxIntermediate);
  positive(num_hidden_layers, "num_hidden_layers", L::kMaxLayers);
  positive(num_attention_heads, "num_attention_heads", L::kMaxHeads);
  positive(num_key_value_heads, "num_key_value_heads", L::kMaxHeads);
  positive(head_dim, "head_dim", L::kMaxHeadDim);
  positive(max_position_embeddings, "max_position_embeddings", L::kMaxPositions);
  if (num_attention_heads % num_key_value_heads != 0)
    OPDLM_FAIL_AT(src, "num_key_value_heads", "num_attention_heads (", num_attention_heads,
                  ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  if (head_dim % 2 != 0) OPDLM_FAIL_AT(src, "head_dim", "RoPE needs an even head_dim, got ", head_dim);
  if (!(rms_norm_eps > 0)) OPDLM_FAIL_AT(src, "rms_norm_eps", "must be > 0, got ", rms_norm_eps);
  if (!(rope_theta > 0)) OPDLM_FAIL_AT(src, "rope_theta", "must be > 0, got ", rope_theta);
  auto id_ok = [&](int64_t v, const char* f) {
    if (v < -1 || v >= vocab_size)
      OPDLM_FAIL_AT(src, f, "token id ", v, " is outside the vocabulary [0, ", vocab_size, ")");
  };
  id_ok(bos_token_id, "bos_token_id");
  id_ok(eos_token_id, "eos_token_id");
  id_ok(pad_token_id, "pad_token_id");
  id_ok(mask_token_id, "mask_token_id");
}

int64_t Qwen3Config::num_params() const {
  const int64_t H = hidden_size;
  const int64_t per_layer = 2 * H + H * q_dim() + 2 * H * kv_dim() + q_dim() * H + 2 * head_dim +
                            3 * H * intermediate_size;
  return vocab_size * H * (tie_word_embeddings ? 1 : 2) + num_hidden_layers * per_layer + H;
}

}  // namespace opdlm::model
