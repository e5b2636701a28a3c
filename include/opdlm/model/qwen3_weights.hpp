// Qwen3Weights: every parameter tensor of a Qwen3 model under its Hugging Face name, in a fixed
// order (the order of checkpoints, optimizer state and gradient buckets), with typed accessors.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::model {

struct NamedTensor {
  std::string name;
  Tensor value;
};

// Handles (shared storage) to one decoder layer's tensors.
struct Qwen3LayerWeights {
  Tensor input_norm;   // model.layers.i.input_layernorm.weight           [H]
  Tensor q_proj;       // model.layers.i.self_attn.q_proj.weight           [Hq*hd, H]
  Tensor k_proj;       // model.layers.i.self_attn.k_proj.weight           [Hkv*hd, H]
  Tensor v_proj;       // model.layers.i.self_attn.v_proj.weight           [Hkv*hd, H]
  Tensor o_proj;       // model.layers.i.self_attn.o_proj.weight           [H, Hq*hd]
  Tensor q_norm;       // model.layers.i.self_attn.q_norm.weight           [hd]
  Tensor k_norm;       // model.layers.i.self_attn.k_norm.weight           [hd]
  Tensor post_norm;    // model.layers.i.post_attention_layernorm.weight  [H]
  Tensor gate_proj;    // model.layers.i.mlp.gate_proj.weight              [I, H]
  Tensor up_proj;      // model.layers.i.mlp.up_proj.weight                [I, H]
  Tensor down_proj;    // model.layers.i.mlp.down_proj.weight              [H, I]
};

// Where every tensor the model reads sits in Qwen3Weights::tensors(): indices, not handles, so a
// tensor replaced by a loader is seen by the next call. Shared by the CPU and the GPU model.
struct Qwen3TensorIndex {
  struct Layer {
    int64_t input_norm, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, post_norm, gate_proj, up_proj, down_proj;
  };
  int64_t embed = 0, norm = 0, head = 0;  // head == embed when the embeddings are tied
  std::vector<Layer> layers;
};

class Qwen3Weights {
 public:
  Qwen3Weights() = default;
  // Allocates every tensor (zeros) with the shapes `config` implies; norms are not set to one.
  explicit Qwen3Weights(const Qwen3Config& config, DType dtype = DType::f32);

  // (name, shape) of every tensor in canonical order; lm_head.weight only when untied.
  static std::vector<std::pair<std::string, Shape>> expected_shapes(const Qwen3Config& config);

  const Qwen3Config& config() const { return config_; }
  DType dtype() const { return dtype_; }
  std::vector<NamedTensor>& tensors() { return tensors_; }
  const std::vector<NamedTensor>& tensors() const { return tensors_; }
  bool has(const std::string& name) const;
  // Position of `name` in tensors(); Error naming the tensor when absent.
  int64_t index(const std::string& name) const;
  // The index of every tensor the model reads (Error naming the first one absent).
  Qwen3TensorIndex tensor_index() const;
  Tensor& get(const std::string& name);  // Error naming the tensor when absent
  const Tensor& get(const std::string& name) const;

  Tensor& embed() { return get("model.embed_tokens.weight"); }
  Tensor& final_norm() { return get("model.norm.weight"); }
  // The LM head: the embedding when tied.
  Tensor& lm_head() { return config_.tie_word_embeddings ? embed() : get("lm_head.weight"); }
  Qwen3LayerWeights layer(int64_t i);

  // Normal(0, std) matrices and unit norm gains, keyed by (seed, param_init, tensor index):
  // identical on any layout.
  void init_random(uint32_t seed, double std = 0.02);
  // Zeros of the same names and shapes (gradient buffers, optimizer moments).
  Qwen3Weights zeros_like() const;
  // Copies of every tensor (same names), e.g. a frozen teacher from a student.
  Qwen3Weights clone() const;
  int64_t numel() const;

 private:
  Qwen3Config config_;
  DType dtype_ = DType::f32;
  std::vector<NamedTensor> tensors_;
};

}  // namespace opdlm::model
