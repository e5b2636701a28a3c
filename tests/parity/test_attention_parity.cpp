// Attention parity with PyTorch (tests/golden/gen_attention.py): mask descriptors pair by pair against
// opd_ref.build_training_mask / torch_qwen3_ref.build_mask, and forward + backward against float64 autograd.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "opdlm/ops/attention.hpp"
#include "test_util.hpp"

using namespace opdlm;
using ops::MaskDescriptor;

namespace {

// Case prefixes: every "<name>.q" entry.
std::vector<std::string> case_names(const test::Golden& g) {
  std::vector<std::string> names;
  for (const auto& [key, t] : g)
    if (key.size() > 2 && key.compare(key.size() - 2, 2, ".q") == 0) names.push_back(key.substr(0, key.size() - 2));
  return names;
}

}  // namespace

TEST(MaskParity, DescriptorsMatchPyTorchMasksEveryPair) {
  const test::Golden g = test::load_golden("attention");
  const std::vector<std::string> names = case_names(g);
  ASSERT_EQ(static_cast<int64_t>(names.size()), test::golden_get(g, "num_cases").item(0));
  for (const std::string& name : names) {
    const std::vector<MaskDescriptor> masks = test::mask_descriptors_from_golden(test::golden_get(g, name + ".masks"));
    const Tensor& allowed = test::golden_get(g, name + ".allowed");  // [B, Tq, Tk]
    const int64_t B = allowed.size(0), Tq = allowed.size(1), Tk = allowed.size(2);
    for (int64_t b = 0; b < B; ++b) {
      const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
      ASSERT_NO_THROW(m.validate(Tq, Tk, name));
      for (int64_t i = 0; i < Tq; ++i)
        for (int64_t j = 0; j < Tk; ++j)
          ASSERT_EQ(m.allowed(i, j, Tk), allowed.item((b * Tq + i) * Tk + j) != 0)
              << name << " " << m.describe() << " batch " << b << " query " << i << " key " << j;
    }
  }
}

TEST(AttentionParity, ForwardBackwardMatchPyTorch) {
  const test::Golden g = test::load_golden("attention");
  for (const std::string& name : case_names(g)) {
    const std::vector<MaskDescriptor> masks = test::mask_descriptors_from_golden(test::golden_get(g, name + ".masks"));
    const double scale = test::golden_get(g, name + ".scale").item(0);
    auto in = [&](const char* k) { return test::golden_get(g, name + "." + k); };
    // f32 as required (1e-5), and f64 on the same inputs as a check of the algorithm itself.
    for (DType dt : {DType::f32, DType::f64}) {
      const Tensor q = in("q").to(dt), k = in("k").to(dt), v = in("v").to(dt), dout = in("dout").to(dt);
      Tensor lse, dq, dk, dv;
      const Tensor o = ops::attention_forward(q, k, v, masks, scale, &lse);
      ops::attention_backward(q, k, v, o, lse, dout, masks, scale, dq, dk, dv);
      const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
      double worst = 0;
      const std::pair<const Tensor*, const char*> outs[] = {
          {&o, "o"}, {&lse, "lse"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}};
      for (auto [got, key] : outs) {
        const double e = test::max_rel_err(*got, in(key));
        EXPECT_LE(e, tol) << name << " " << key << " " << dtype_name(dt);
        worst = std::max(worst, e);
      }
      test::record_error(name + "_" + dtype_name(dt) + "_max_rel_err", worst);
    }
  }
}
