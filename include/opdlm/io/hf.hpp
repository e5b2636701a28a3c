// Hugging Face model directories <-> Qwen3Weights: config.json plus model.safetensors, or shards
// model-0000i-of-0000n.safetensors with model.safetensors.index.json.
//
// Import rules: every tensor Qwen3Weights::expected_shapes names must be present with exactly that
// shape and a float dtype (F32, BF16 or F16; converted exactly). Tensors it does not name are an
// error, except (a) `*.rotary_emb.inv_freq` buffers some older exports contain (recomputed from
// rope_theta, ignored) and (b) `lm_head.weight` in a tied model when it is bitwise equal to the
// embedding (some exporters write the tied head out). A tied model whose lm_head differs from the
// embedding is an error: silently dropping a trained head would change the model; set
// "tie_word_embeddings": false in config.json to import it as untied. config.json's torch_dtype is
// informational (transformers casts on load), so it is not checked against the stored dtype.
//
// Export writes the whole directory atomically (built in a temporary sibling, then swapped in).
// Files already in the directory other than the model files (config.json, model*.safetensors,
// model.safetensors.index.json, pytorch_model*) - tokenizer files, generation_config.json - are
// carried over into the new directory.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "opdlm/io/safetensors.hpp"
#include "opdlm/model/qwen3_weights.hpp"

namespace opdlm::io {

// `dtype` is the dtype of the returned weights (f32, or bf16 to keep bf16 files as they are).
model::Qwen3Weights import_hf(const std::string& dir, DType dtype = DType::f32);

struct HfExportOptions {
  StoreDType dtype = StoreDType::f32;  // F32 or BF16 in the safetensors files
  // 0: one model.safetensors. Otherwise shards of at most this many bytes (a tensor larger than
  // the limit gets a shard of its own), named and indexed as transformers' save_pretrained does;
  // a model that fits one shard is still written as model.safetensors.
  int64_t shard_size_bytes = 0;
  // config.json fields to keep besides the ones Qwen3Config writes (which take precedence), e.g.
  // the original config.json of an imported model.
  nlohmann::json base_config = nullptr;
};

void export_hf(const model::Qwen3Weights& w, const std::string& dir, const HfExportOptions& opts = {});

}  // namespace opdlm::io
