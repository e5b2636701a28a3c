// opdlm model files (HDF5): a Qwen3 model's weights, its config and provenance in one
// self-describing file that `h5ls`/`h5dump` can inspect, with a sha256 per tensor verified on load.
//
// Layout (format_version 1):
//   /                     attributes: format = "opdlm-model", format_version = 1 (int64),
//                         config = Qwen3Config as config.json text, dtype = "f32" | "bf16",
//                         extra = JSON text of the caller's extra attributes ("{}" when none)
//   /tensors/<HF name>    one contiguous dataset per tensor, named exactly as in Hugging Face
//                         (HF names contain '.' but never '/', so they are plain link names), in
//                         Qwen3Weights order; f32 as IEEE f32 LE, bf16 as uint16 LE bit patterns;
//                         attributes dtype = "f32" | "bf16", sha256 = hex digest of the stored
//                         little-endian bytes
// Files are written atomically (temp sibling + fsync + rename): a failing save leaves any
// previous file untouched.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "opdlm/model/qwen3_weights.hpp"

namespace opdlm::io {

inline constexpr int64_t kModelFormatVersion = 1;

// Writes every tensor of `w` (CPU, f32 or bf16, shapes as Qwen3Weights::expected_shapes) plus the
// config and `extra_attrs` (any JSON; e.g. {"source": ..., "hf_config": ...}).
void save_model(const std::string& path, const model::Qwen3Weights& w, const nlohmann::json& extra_attrs = {});

// Reads and verifies a model file: format and version, config, every expected tensor present with
// the right dtype, shape and sha256, no unexpected ones. Errors name the file and the dataset.
model::Qwen3Weights load_model(const std::string& path);

// The root attributes alone (no tensor data read).
struct ModelFileInfo {
  int64_t format_version = 0;
  model::Qwen3Config config;
  DType dtype = DType::f32;
  nlohmann::json extra;
};
ModelFileInfo read_model_info(const std::string& path);

}  // namespace opdlm::io
