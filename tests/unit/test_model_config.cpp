// Tests for Qwen3Config (config.json round trip, field-named validation errors) and Qwen3Weights
// (HF names and shapes, keyed initialisation, lookup errors).
#include <gtest/gtest.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/model/qwen3_weights.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::model;

namespace {
nlohmann::json qwen3_06b() {
  // Field values of Qwen/Qwen3-0.6B's config.json.
  return nlohmann::json::parse(R"({
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
    "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})");
}
}  // namespace

TEST(Qwen3Config, ReadsHuggingFaceConfigAndCountsParams) {
  Qwen3Config c = Qwen3Config::from_json(qwen3_06b(), "config.json");
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 2048);  // head_dim * heads != hidden_size in Qwen3-0.6B
  EXPECT_EQ(c.eos_token_id, 151645);
  EXPECT_TRUE(c.tie_word_embeddings);
  // 0.6B: 596,049,920 parameters with the tied embedding counted once (HF reports 0.6B).
  EXPECT_EQ(c.num_params(), 596049920);
  Qwen3Config back = Qwen3Config::from_json(c.to_json(), "roundtrip");
  EXPECT_EQ(back, c);
}

TEST(Qwen3Config, ErrorsNameTheField) {
  auto j = qwen3_06b();
  j.erase("hidden_size");
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "cfg.json", "hidden_size", "missing");
  j = qwen3_06b();
  j["num_key_value_heads"] = 5;
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "num_key_value_heads", "multiple");
  j = qwen3_06b();
  j["head_dim"] = 127;
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "head_dim", "even");
  j = qwen3_06b();
  j["eos_token_id"] = 999999;
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "eos_token_id", "outside the vocabulary");
  j = qwen3_06b();
  j["hidden_size"] = "big";
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "hidden_size", "expected an integer");
  j = qwen3_06b();
  j["model_type"] = "llama";
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "model_type", "llama");
  j = qwen3_06b();
  j["rope_scaling"] = {{"type", "yarn"}};
  EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "rope_scaling");
  EXPECT_ERROR_HAS(Qwen3Config::load("/nonexistent/config.json"), "/nonexistent/config.json");
}

// Sizes from a file are bounded before anything is allocated or multiplied (num_params would
// overflow int64 on a hostile config).
TEST(Qwen3Config, SizesAboveTheLimitsAreRefused) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "head_dim", "max_position_embeddings"}) {
    auto j = qwen3_06b();
    j[key] = int64_t{1} << 40;
    EXPECT_ERROR_HAS(Qwen3Config::from_json(j, "cfg.json"), "cfg.json", key, "exceeds the limit");
  }
  auto j = qwen3_06b();
  j["vocab_size"] = Qwen3ConfigLimits::kMaxVocab;  // the limit itself is allowed
  EXPECT_EQ(Qwen3Config::from_json(j, "cfg.json").vocab_size, Qwen3ConfigLimits::kMaxVocab);
}

TEST(Qwen3Config, SaveAndLoadFile) {
  Qwen3Config c = Qwen3Config::from_json(qwen3_06b(), "x");
  c.mask_token_id = 151669;
  const std::string path = ::testing::TempDir() + "/opdlm_cfg.json";
  c.save(path);
  EXPECT_EQ(Qwen3Config::load(path), c);
  std::remove(path.c_str());
}

TEST(Qwen3Weights, NamesShapesAndKeyedInit) {
  Qwen3Config c;
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 3;
  c.num_key_value_heads = 1;
  c.head_dim = 6;
  c.tie_word_embeddings = false;
  Qwen3Weights w(c);
  EXPECT_EQ(static_cast<int64_t>(w.tensors().size()), 1 + 2 * 11 + 1 + 1);
  EXPECT_EQ(w.numel(), c.num_params());
  EXPECT_EQ(w.get("model.layers.1.self_attn.q_proj.weight").shape(), (Shape{18, 8}));
  EXPECT_EQ(w.lm_head().shape(), (Shape{11, 8}));
  EXPECT_ERROR_HAS(w.get("model.layers.2.mlp.up_proj.weight"), "model.layers.2.mlp.up_proj.weight");
  Tensor handle = w.layer(0).q_norm;
  w.init_random(7);
  EXPECT_EQ(handle.item(0), 1.0);  // norm gains are one, and handles see the initialised values
  Qwen3Weights w2(c);
  w2.init_random(7);
  EXPECT_EQ(test::max_abs_err(w.embed(), w2.embed()), 0.0);  // same seed, same weights
  double sum2 = 0;
  for (int64_t i = 0; i < w.embed().numel(); ++i) sum2 += w.embed().item(i) * w.embed().item(i);
  EXPECT_NEAR(std::sqrt(sum2 / w.embed().numel()), 0.02, 0.006);
  c.tie_word_embeddings = true;
  Qwen3Weights tied(c);
  EXPECT_FALSE(tied.has("lm_head.weight"));
  EXPECT_EQ(tied.lm_head().raw_data(), tied.embed().raw_data());
}
