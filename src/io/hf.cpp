// Hugging Face directory import/export (rules in hf.hpp): name/shape/dtype checks against
// config.json with errors naming the file and the tensor; sharded or single-file safetensors.
#include "opdlm/io/hf.hpp"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/io/file_util.hpp"

namespace fs = std::filesystem;

namespace opdlm::io {
namespace {

constexpr const char* kSingle = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::string shape_of(const StEntry& e) { return shape_str(e.shape); }

std::string config_summary(const model::Qwen3Config& c) {
  return detail::concat("vocab_size=", c.vocab_size, ", hidden_size=", c.hidden_size,
                        ", intermediate_size=", c.intermediate_size, ", num_attention_heads=", c.num_attention_heads,
                        ", num_key_value_heads=", c.num_key_value_heads, ", head_dim=", c.head_dim);
}

// The safetensors files of a directory and which file holds each tensor.
struct Sources {
  std::vector<SafetensorsFile> files;
  std::map<std::string, size_t> where;  // tensor name -> index into files
  std::string listing;                  // the file that lists the tensors (for "missing" errors)
};

Sources open_sources(const fs::path& dir) {
  Sources s;
  const fs::path single = dir / kSingle, index = dir / kIndex;
  std::error_code ec;
  if (fs::exists(single, ec)) {  // transformers prefers the single file too
    s.listing = single.string();
    s.files.emplace_back(single.string());
    for (const auto& e : s.files[0].entries()) s.where[e.name] = 0;
    return s;
  }
  if (!fs::exists(index, ec))
    OPDLM_FAIL_AT(dir.string(), "", "no ", kSingle, " or ", kIndex, " in this directory");
  const std::string ipath = index.string();
  s.listing = ipath;
  nlohmann::json j;
  {
    std::ifstream in(ipath);
    if (!in) OPDLM_FAIL_AT(ipath, "", "cannot open the shard index");
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      OPDLM_FAIL_AT(ipath, "", "invalid JSON: ", e.what());
    }
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    OPDLM_FAIL_AT(ipath, "weight_map", "the index must be an object with a weight_map object");
  std::map<std::string, size_t> file_idx;
  std::map<std::string, std::string> listed;  // tensor -> shard file name
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      OPDLM_FAIL_AT(ipath, "weight_map." + it.key(), "tensor '", it.key(), "': shard must be a file name string");
    const std::string f = it.value().get<std::string>();
    // Shards live beside the index: a path could point anywhere.
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos)
      OPDLM_FAIL_AT(ipath, "weight_map." + it.key(), "tensor '", it.key(), "': shard '", f,
                    "' must be a plain file name in the same directory");
    listed[it.key()] = f;
    file_idx.emplace(f, 0);
  }
  for (auto& [f, idx] : file_idx) {
    idx = s.files.size();
    s.files.emplace_back((dir / f).string());
  }
  for (const auto& [name, f] : listed) {
    const SafetensorsFile& sf = s.files[file_idx[f]];
    if (!sf.has(name))
      OPDLM_FAIL_AT(sf.path(), name, "tensor '", name, "' is listed in ", kIndex, " but missing from this shard");
    s.where[name] = file_idx[f];
  }
  for (const auto& sf : s.files)
    for (const auto& e : sf.entries()) {
      auto it = listed.find(e.name);
      if (it == listed.end() || s.files[file_idx[it->second]].path() != sf.path())
        OPDLM_FAIL_AT(sf.path(), e.name, "tensor '", e.name, "' is in this shard but ", kIndex,
                      it == listed.end() ? std::string(" does not list it") : " maps it to " + it->second);
    }
  return s;
}

// Files of an HF directory that an export replaces; everything else is carried over.
bool is_model_file(const std::string& name) {
  return name == "config.json" || name == kSingle || name == kIndex ||
         (starts_with(name, "model-") && ends_with(name, ".safetensors")) || starts_with(name, "pytorch_model");
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

model::Qwen3Weights import_hf(const std::string& dir_str, DType dtype) {
  if (dtype != DType::f32 && dtype != DType::bf16)
    OPDLM_FAIL_AT(dir_str, "", "import_hf returns f32 or bf16 weights, not ", dtype_name(dtype));
  const fs::path dir(dir_str);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) OPDLM_FAIL_AT(dir_str, "", "not a directory");
  const model::Qwen3Config cfg = model::Qwen3Config::load((dir / "config.json").string());
  Sources src = open_sources(dir);
  const auto expected = model::Qwen3Weights::expected_shapes(cfg);

  // Names, dtypes and shapes first: a bad directory fails before any data is converted.
  std::set<std::string> expected_names;
  for (const auto& [name, shape] : expected) {
    expected_names.insert(name);
    auto it = src.where.find(name);
    if (it == src.where.end())
      OPDLM_FAIL_AT(src.listing, name, "tensor '", name, "' required by config.json (",
                    cfg.num_hidden_layers, " layers, tie_word_embeddings=", cfg.tie_word_embeddings ? "true" : "false",
                    ") is missing");
    const SafetensorsFile& f = src.files[it->second];
    const StEntry& e = f.entry(name);
    if (!st_dtype_is_float(e.dtype))
      OPDLM_FAIL_AT(f.path(), name, "tensor '", name, "' has dtype ", st_dtype_name(e.dtype),
                    ", expected F32, BF16 or F16");
    if (e.shape != shape)
      OPDLM_FAIL_AT(f.path(), name, "tensor '", name, "' has shape ", shape_of(e), " but config.json (",
                    config_summary(cfg), ") implies ", shape_str(shape));
  }
  for (const auto& [name, idx] : src.where) {
    if (expected_names.count(name)) continue;
    const SafetensorsFile& f = src.files[idx];
    if (ends_with(name, ".rotary_emb.inv_freq")) {
      OPDLM_LOG(debug) << "import-hf: ignoring " << name << " in " << f.path() << " (recomputed from rope_theta)";
      continue;
    }
    if (name == "lm_head.weight" && cfg.tie_word_embeddings) {
      const std::string embed = "model.embed_tokens.weight";
      const StEntry& e = f.entry(name);
      bool same = st_dtype_is_float(e.dtype) && e.shape == src.files[src.where[embed]].entry(embed).shape;
      if (same) {
        Tensor h = f.read_f32(name), m = src.files[src.where[embed]].read_f32(embed);
        same = std::memcmp(h.raw_data(), m.raw_data(), h.nbytes()) == 0;
      }
      if (!same)
        OPDLM_FAIL_AT(f.path(), name, "config.json ties the word embeddings but tensor '", name,
                      "' differs from ", embed, "; set \"tie_word_embeddings\": false in config.json to import "
                      "it as a separate head");
      OPDLM_LOG(info) << "import-hf: " << name << " in " << f.path() << " equals the tied embedding; ignored";
      continue;
    }
    OPDLM_FAIL_AT(f.path(), name, "unexpected tensor '", name, "': not part of a Qwen3 model with this config.json (",
                  cfg.num_hidden_layers, " layers, tie_word_embeddings=", cfg.tie_word_embeddings ? "true" : "false", ")");
  }

  model::Qwen3Weights w(cfg, dtype);
  for (auto& [name, t] : w.tensors()) {
    src.files[src.where.at(name)].read_into(name, t);  // into place: layer() handles stay valid
  }
  return w;
}

void export_hf(const model::Qwen3Weights& w, const std::string& dir_str, const HfExportOptions& opts) {
  const model::Qwen3Config& cfg = w.config();
  cfg.validate(dir_str);
  if (opts.shard_size_bytes < 0) OPDLM_FAIL_AT(dir_str, "shard_size", "shard size must be >= 0");
  const auto expected = model::Qwen3Weights::expected_shapes(cfg);
  const auto& tensors = w.tensors();
  if (tensors.size() != expected.size())
    OPDLM_FAIL_AT(dir_str, "", "weights hold ", tensors.size(), " tensors, the config implies ", expected.size());

  // Shards: greedy in canonical order, as transformers' save_pretrained splits.
  const uint64_t esize = opts.dtype == StoreDType::f32 ? 4 : 2;
  std::vector<std::vector<model::NamedTensor>> shards(1);
  uint64_t cur = 0, total = 0;
  for (const auto& t : tensors) {
    const uint64_t b = static_cast<uint64_t>(t.value.numel()) * esize;
    if (opts.shard_size_bytes > 0 && !shards.back().empty() && cur + b > static_cast<uint64_t>(opts.shard_size_bytes)) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(t);
    cur += b;
    total += b;
  }

  nlohmann::json config = opts.base_config.is_object() ? opts.base_config : nlohmann::json::object();
  const nlohmann::json ours = cfg.to_json();  // a named object: items() must not outlive it
  for (const auto& [k, v] : ours.items()) {
    // A base list of ids (e.g. several eos ids) whose first entry is ours says more: keep it.
    if (config.contains(k) && config[k].is_array() && !config[k].empty() && config[k][0] == v) continue;
    config[k] = v;
  }
  config["torch_dtype"] = opts.dtype == StoreDType::f32 ? "float32" : "bfloat16";

  fs::path dir = fs::path(dir_str).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();  // "out/" -> "out"
  std::error_code ec;
  if (dir.has_parent_path()) fs::create_directories(dir.parent_path(), ec);

  atomic_write_dir(dir.string(), [&](const std::string& tmp_str) {
    const fs::path tmp(tmp_str);
    if (fs::is_directory(dir, ec))
      for (const auto& e : fs::directory_iterator(dir)) {
        const std::string name = e.path().filename().string();
        if (is_model_file(name)) continue;
        fs::copy(e.path(), tmp / name, fs::copy_options::recursive | fs::copy_options::copy_symlinks, ec);
        if (ec) OPDLM_FAIL_AT(e.path().string(), "", "cannot carry over into the new directory: ", ec.message());
      }
    atomic_write_bytes((tmp / "config.json").string(), config.dump(2) + "\n");
    nlohmann::json weight_map = nlohmann::json::object();
    size_t index = 0;
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string fname = shards.size() == 1 ? std::string(kSingle) : shard_name(s, shards.size());
      // Each tensor is checked against the config as its shard is written (an inconsistent
      // Qwen3Weights fails here, inside the temporary directory).
      for (const auto& t : shards[s]) {
        const auto& [ename, eshape] = expected[index++];
        if (t.name != ename || t.value.shape() != eshape)
          OPDLM_FAIL_AT((dir / fname).string(), t.name, "tensor '", t.name, "' ",
                        t.value.defined() ? t.value.describe() : std::string("undefined"), " does not match '", ename,
                        "' ", shape_str(eshape), " implied by the config");
        weight_map[t.name] = fname;
      }
      write_safetensors((tmp / fname).string(), shards[s], opts.dtype);
    }
    if (shards.size() > 1) {
      nlohmann::json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
      atomic_write_bytes((tmp / kIndex).string(), idx.dump(2) + "\n");
    }
  });
}

}  // namespace opdlm::io
