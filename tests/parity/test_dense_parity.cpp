// PyTorch parity of the dense CPU ops (golden group "dense", tests/golden/gen_dense.py): f32 forward
// and every gradient against float64 torch references, max abs err / max abs ref <= 1e-5.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "opdlm/ops/embedding.hpp"
#include "opdlm/ops/matmul.hpp"
#include "opdlm/ops/rmsnorm.hpp"
#include "opdlm/ops/rope.hpp"
#include "opdlm/ops/swiglu.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::ops;
using opdlm::test::golden_get;
using opdlm::test::load_golden;
using opdlm::test::max_rel_err;

namespace {

constexpr double kTol = 1e-5;

const opdlm::test::Golden& golden() {
  static const opdlm::test::Golden g = load_golden("dense");
  return g;
}
const Tensor& G(const std::string& name) { return golden_get(golden(), name); }

void expect_close(const Tensor& got, const std::string& ref_name) {
  const Tensor& ref = G(ref_name);
  ASSERT_EQ(got.shape(), ref.shape()) << ref_name;
  EXPECT_EQ(got.dtype(), DType::f32) << ref_name;
  const double e = max_rel_err(got, ref);
  std::printf("[parity] %-28s max_rel_err %.3g\n", ref_name.c_str(), e);
  EXPECT_LE(e, kTol) << ref_name;
}

}  // namespace

TEST(DenseParityLinear, ForwardBackward) {
  const Tensor &x = G("linear.x"), &w = G("linear.w"), &dy = G("linear.dy");
  expect_close(linear_forward(x, w), "linear.y");
  Tensor dx, dw;
  linear_backward(x, w, dy, &dx, &dw);
  expect_close(dx, "linear.dx");
  expect_close(dw, "linear.dw");
}

TEST(DenseParityMatmul, BatchedTransposedAndBroadcast) {
  const Tensor& a = G("matmul.a");
  expect_close(matmul(a, true, G("matmul.b3"), true), "matmul.c3");
  expect_close(matmul(a, true, G("matmul.b2"), true), "matmul.c2");
}

TEST(DenseParityEmbedding, ForwardBackwardRepeatedIds) {
  const Tensor &table = G("embedding.table"), &ids = G("embedding.ids");
  expect_close(embedding_forward(table, ids), "embedding.out");
  Tensor dtable = Tensor::zeros(table.shape(), DType::f32);
  embedding_backward(ids, G("embedding.dy"), dtable);
  expect_close(dtable, "embedding.dtable");
}

TEST(DenseParityRmsNorm, HiddenAndPerHead) {
  for (std::string c : {"hidden", "qnorm"}) {
    const std::string p = "rmsnorm." + c + ".";
    const Tensor &x = G(p + "x"), &w = G(p + "w");
    Tensor rstd;
    expect_close(rmsnorm_forward(x, w, G(p + "eps").item(0), &rstd), p + "y");
    expect_close(rstd, p + "rstd");
    Tensor dx, dw;
    rmsnorm_backward(x, w, rstd, G(p + "dy"), &dx, &dw);
    expect_close(dx, p + "dx");
    expect_close(dw, p + "dw");
  }
}

TEST(DenseParityRope, TrainingPositionsAndThetas) {
  for (std::string c : {"train_1e6", "train_1e4", "far_1e6"}) {
    const std::string p = "rope." + c + ".";
    const Tensor &x = G(p + "x"), &pos = G(p + "pos");
    const double theta = G(p + "theta").item(0);
    expect_close(rope_forward(x, pos, theta), p + "y");
    expect_close(rope_backward(G(p + "dy"), pos, theta), p + "dx");
  }
}

TEST(DenseParitySwiGLU, ForwardBackward) {
  const Tensor &g = G("swiglu.gate"), &u = G("swiglu.up");
  expect_close(swiglu_forward(g, u), "swiglu.h");
  Tensor dg, du;
  swiglu_backward(g, u, G("swiglu.dh"), &dg, &du);
  expect_close(dg, "swiglu.dgate");
  expect_close(du, "swiglu.dup");
}
