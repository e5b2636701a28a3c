// Qwen3Weights: allocation under Hugging Face names, lookup, and keyed random initialisation.
#include "opdlm/model/qwen3_weights.hpp"

#include <cstring>

#include "opdlm/base/rng.hpp"

namespace opdlm::model {

std::vector<std::pair<std::string, Shape>> Qwen3Weights::expected_shapes(const Qwen3Config& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
  std::vector<std::pair<std::string, Shape>> s;
  s.push_back({"model.embed_tokens.weight", {c.vocab_size, H}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", {H}});
    s.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), H}});
    s.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), H}});
    s.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), H}});
    s.push_back({p + "self_attn.o_proj.weight", {H, c.q_dim()}});
    s.push_back({p + "self_attn.q_norm.weight", {hd}});
    s.push_back({p + "self_attn.k_norm.weight", {hd}});
    s.push_back({p + "post_attention_layernorm.weight", {H}});
    s.push_back({p + "mlp.gate_proj.weight", {I, H}});
    s.push_back({p + "mlp.up_proj.weight", {I, H}});
    s.push_back({p + "mlp.down_proj.weight", {H, I}});
  }
  s.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) s.push_back({"lm_head.weight", {c.vocab_size, H}});
  return s;
}

Qwen3Weights::Qwen3Weights(const Qwen3Config& config, DType dtype) : config_(config), dtype_(dtype) {
  config_.validate("Qwen3Weights config");
  for (auto& [name, shape] : expected_shapes(config_)) tensors_.push_back({name, Tensor(shape, dtype)});
}

bool Qwen3Weights::has(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return true;
  return false;
}

int64_t Qwen3Weights::index(const std::string& name) const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (tensors_[i].name == name) return static_cast<int64_t>(i);
  OPDLM_FAIL("model has no tensor '", name, "'");
}

Qwen3TensorIndex Qwen3Weights::tensor_index() const {
  Qwen3TensorIndex ix;
  ix.embed = index("model.embed_tokens.weight");
  ix.norm = index("model.norm.weight");
  ix.head = config_.tie_word_embeddings ? ix.embed : index("lm_head.weight");
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto at = [&](const char* s) { return index(p + s); };
    ix.layers.push_back({at("input_layernorm.weight"), at("self_attn.q_proj.weight"), at("self_attn.k_proj.weight"),
                         at("self_attn.v_proj.weight"), at("self_attn.o_proj.weight"), at("self_attn.q_norm.weight"),
                         at("self_attn.k_norm.weight"), at("post_attention_layernorm.weight"),
                         at("mlp.gate_proj.weight"), at("mlp.up_proj.weight"), at("mlp.down_proj.weight")});
  }
  return ix;
}

Tensor& Qwen3Weights::get(const std::string& name) { return tensors_[size_t(index(name))].value; }

const Tensor& Qwen3Weights::get(const std::string& name) const {
  return const_cast<Qwen3Weights*>(this)->get(name);
}

Qwen3LayerWeights Qwen3Weights::layer(int64_t i) {
  if (i < 0 || i >= config_.num_hidden_layers) OPDLM_FAIL("layer ", i, " out of range");
  const std::string p = "model.layers." + std::to_string(i) + ".";
  return {get(p + "input_layernorm.weight"), get(p + "self_attn.q_proj.weight"),
          get(p + "self_attn.k_proj.weight"), get(p + "self_attn.v_proj.weight"),
          get(p + "self_attn.o_proj.weight"), get(p + "self_attn.q_norm.weight"),
          get(p + "self_attn.k_norm.weight"), get(p + "post_attention_layernorm.weight"),
          get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"), get(p + "mlp.down_proj.weight")};
}

void Qwen3Weights::init_random(uint32_t seed, double std) {
  for (size_t t = 0; t < tensors_.size(); ++t) {
    Tensor& x = tensors_[t].value;
    const bool is_norm = x.ndim() == 1;
    CounterRng rng({seed, RngPurpose::param_init, 0, static_cast<uint32_t>(t), 0});
    Tensor f = Tensor::empty(x.shape(), DType::f64);
    double* p = f.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) p[i] = is_norm ? 1.0 : std * rng.normal(static_cast<uint32_t>(i));
    Tensor converted = f.to(dtype_);  // copy in place: handles from layer() stay valid
    std::memcpy(x.raw_data(), converted.raw_data(), x.nbytes());
  }
}

Qwen3Weights Qwen3Weights::zeros_like() const {
  Qwen3Weights w;
  w.config_ = config_;
  w.dtype_ = dtype_;
  for (const auto& t : tensors_) w.tensors_.push_back({t.name, Tensor(t.value.shape(), t.value.dtype())});
  return w;
}

Qwen3Weights Qwen3Weights::clone() const {
  Qwen3Weights w;
  w.config_ = config_;
  w.dtype_ = dtype_;
  for (const auto& t : tensors_) w.tensors_.push_back({t.name, t.value.clone()});
  return w;
}

int64_t Qwen3Weights::numel() const {
  int64_t n = 0;
  for (const auto& t : tensors_) n += t.value.numel();
  return n;
}

}  // namespace opdlm::model
