// Qwen3Model parity with PyTorch (tests/golden/gen_model.py): logits and every parameter gradient
// against torch_qwen3_ref.Qwen3 in float64, for causal, block, training and mixed-batch masks.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "opdlm/model/qwen3.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::model;
using ops::MaskDescriptor;

namespace {

std::vector<std::string> case_names(const test::Golden& g) {
  std::vector<std::string> names;
  const std::string suffix = ".config_i";
  for (const auto& [key, t] : g)
    if (key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0)
      names.push_back(key.substr(0, key.size() - suffix.size()));
  return names;
}

Qwen3Config config_of(const test::Golden& g, const std::string& name) {
  const Tensor& ci = test::golden_get(g, name + ".config_i");
  const Tensor& cf = test::golden_get(g, name + ".config_f");
  auto i = [&](int k) { return static_cast<int64_t>(ci.item(k)); };
  Qwen3Config c;
  c.vocab_size = i(0);
  c.hidden_size = i(1);
  c.intermediate_size = i(2);
  c.num_hidden_layers = i(3);
  c.num_attention_heads = i(4);
  c.num_key_value_heads = i(5);
  c.head_dim = i(6);
  c.tie_word_embeddings = i(7) != 0;
  c.rms_norm_eps = cf.item(0);
  c.rope_theta = cf.item(1);
  return c;
}

}  // namespace

TEST(ModelParity, LogitsAndEveryGradientMatchPyTorch) {
  const test::Golden g = test::load_golden("model");
  const std::vector<std::string> names = case_names(g);
  ASSERT_EQ(static_cast<int64_t>(names.size()), test::golden_get(g, "num_cases").item(0));
  for (const std::string& name : names) {
    const Qwen3Config c = config_of(g, name);
    const std::vector<MaskDescriptor> masks = test::mask_descriptors_from_golden(test::golden_get(g, name + ".masks"));
    const Tensor& ids = test::golden_get(g, name + ".ids");
    const Tensor& positions = test::golden_get(g, name + ".positions");
    const Tensor& rows = test::golden_get(g, name + ".rows");
    // f32 as required (1e-4), and f64 on the same inputs as a check of the algorithm itself.
    for (DType dt : {DType::f32, DType::f64}) {
      const double tol = dt == DType::f32 ? 1e-4 : 1e-9;
      const std::string tag = name + (dt == DType::f32 ? " f32" : " f64");
      Qwen3Weights w(c, dt);
      for (auto& [wn, t] : w.tensors()) t = test::golden_get(g, name + ".w." + wn).to(dt);
      Qwen3Model model = Qwen3Model::student(std::move(w));
      Qwen3Activations acts;
      const Tensor logits = model.forward(ids, positions, masks, rows, &acts);
      const double el = test::max_rel_err(logits, test::golden_get(g, name + ".logits"));
      EXPECT_LE(el, tol) << tag << " logits";
      test::record_error(tag + " logits", el);
      model.backward(acts, test::golden_get(g, name + ".dlogits").to(dt));
      double worst = 0;
      for (const auto& [wn, t] : model.grads().tensors()) {
        const double e = test::max_rel_err(t, test::golden_get(g, name + ".g." + wn));
        EXPECT_LE(e, tol) << tag << " gradient of " << wn;
        worst = std::max(worst, e);
      }
      test::record_error(tag + " grads", worst);
      std::printf("[model parity] %-24s logits %.2e  worst gradient %.2e\n", tag.c_str(), el, worst);
    }
  }
}
