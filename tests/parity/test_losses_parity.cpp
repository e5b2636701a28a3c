// PyTorch parity for the loss and optimizer ops (goldens from tests/golden/gen_losses.py): f32 inputs
// through the f32 kernels against float64 torch references, relative error <= 1e-5; the same inputs
// widened to f64 must agree to <= 1e-10.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/ops/softmax.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::ops;
using opdlm::test::golden_get;
using opdlm::test::load_golden;
using opdlm::test::max_rel_err;

namespace {

constexpr double kTolF32 = 1e-5;
constexpr double kTolF64 = 1e-10;

const opdlm::test::Golden& goldens() {
  static const opdlm::test::Golden g = load_golden("losses");
  return g;
}
const Tensor& G(const std::string& name) { return golden_get(goldens(), name); }

double tol(DType t) { return t == DType::f32 ? kTolF32 : kTolF64; }

// Rel error of `got` against the f64 reference, printed for the report.
double err(const Tensor& got, const Tensor& ref, const std::string& what) {
  const double e = max_rel_err(got, ref);
  std::printf("[parity] %-34s %s max_rel_err %.3g\n", what.c_str(), dtype_name(got.dtype()), e);
  return e;
}

const DType kTypes[] = {DType::f32, DType::f64};

}  // namespace

TEST(SoftmaxParity, LogSoftmaxForwardBackward) {
  for (DType dt : kTypes) {
    Tensor x = G("softmax.x").to(dt), dy = G("softmax.dy").to(dt);
    Tensor y = log_softmax_forward(x);
    EXPECT_LE(err(y, G("softmax.y"), "log_softmax y"), tol(dt));
    EXPECT_LE(err(log_softmax_backward(y, dy), G("softmax.dx"), "log_softmax dx"), tol(dt));
  }
}

TEST(CrossEntropyParity, WeightedWithIgnore) {
  for (DType dt : kTypes) {
    Tensor z = G("ce.logits").to(dt), w = G("ce.weight").to(dt), dl = G("ce.dloss").to(dt);
    const Tensor& t = G("ce.targets");
    Tensor lse;
    Tensor loss = cross_entropy_forward(z, t, w, &lse);
    EXPECT_LE(err(loss, G("ce.loss"), "cross_entropy loss"), tol(dt));
    EXPECT_LE(err(cross_entropy_backward(z, t, w, lse, dl), G("ce.dlogits"), "cross_entropy dlogits"), tol(dt));
  }
}

TEST(DivergenceParity, MatchesOpdRef) {
  struct Case {
    const char* name;
    DivergenceSpec spec;
  };
  auto mk = [](Divergence k, double w, double a, int64_t K) {
    DivergenceSpec s;
    s.kind = k;
    s.reverse_weight = w;
    s.jsd_alpha = a;
    s.topk = K;
    return s;
  };
  const std::vector<Case> cases = {
      {"fkl", mk(Divergence::forward_kl, 0, 0.5, 16)},
      {"rkl", mk(Divergence::reverse_kl, 0, 0.5, 16)},
      {"rkl_holes", mk(Divergence::reverse_kl, 0, 0.5, 16)},
      {"mix03", mk(Divergence::mixture, 0.3, 0.5, 16)},
      {"mix03_holes", mk(Divergence::mixture, 0.3, 0.5, 16)},
      {"jsd05", mk(Divergence::jsd, 0, 0.5, 16)},
      {"jsd02", mk(Divergence::jsd, 0, 0.2, 16)},
      {"topk1", mk(Divergence::topk_forward_kl, 0, 0.5, 1)},
      {"topk5", mk(Divergence::topk_forward_kl, 0, 0.5, 5)},
      {"topkV", mk(Divergence::topk_forward_kl, 0, 0.5, 50)},
      {"topk16_v300", mk(Divergence::topk_forward_kl, 0, 0.5, 16)},
  };
  for (const Case& c : cases)
    for (DType dt : kTypes) {
      const std::string p = std::string("kl.") + c.name + ".";
      Tensor t = G(p + "teacher").to(dt), s = G(p + "student").to(dt), dl = G(p + "dloss").to(dt);
      Tensor lse;
      Tensor D = divergence_forward(t, s, c.spec, &lse);
      EXPECT_LE(err(D, G(p + "D"), p + "D"), tol(dt));
      EXPECT_LE(err(divergence_backward(t, s, lse, dl, c.spec), G(p + "dstudent"), p + "dstudent"), tol(dt));
    }
}

TEST(AdamWParity, FiveStepsLikeTorch) {
  AdamWConfig cfg;
  cfg.lr = 1e-3;
  cfg.weight_decay = 0.1;
  const Tensor& grads = G("adamw.grads");
  for (DType dt : kTypes) {
    Tensor p = G("adamw.param0").to(dt);
    Tensor m(p.shape(), dt), v(p.shape(), dt);
    for (int64_t k = 0; k < 5; ++k) {
      Tensor g = grads.slice(k, k + 1).view(p.shape()).to(dt);
      adamw_step(p, g, m, v, k + 1, cfg);
      const std::string step = "adamw.param" + std::to_string(k + 1);
      EXPECT_LE(err(p, G(step), step), tol(dt));
    }
    EXPECT_LE(err(m, G("adamw.m"), "adamw.m"), tol(dt));
    EXPECT_LE(err(v, G("adamw.v"), "adamw.v"), tol(dt));
    // The update itself (not only the weights, which barely move) must match too.
    Tensor du = Tensor::empty(p.shape(), DType::f64), dr = Tensor::empty(p.shape(), DType::f64);
    for (int64_t i = 0; i < p.numel(); ++i) {
      du.data<double>()[i] = p.item(i) - G("adamw.param0").item(i);
      dr.data<double>()[i] = G("adamw.param5").item(i) - G("adamw.param0").item(i);
    }
    EXPECT_LE(err(du, dr, std::string("adamw update, 5 steps, ") + dtype_name(dt) + " run"), dt == DType::f32 ? 1e-3 : kTolF64);
  }
}

TEST(GradNormParity, ClipLikeTorch) {
  for (DType dt : kTypes) {
    std::vector<Tensor> gs;
    for (int i = 0; i < 3; ++i) gs.push_back(G("clip.grad" + std::to_string(i)).to(dt));
    std::vector<Tensor*> ptrs = {&gs[0], &gs[1], &gs[2]};
    const double norm = clip_grad_norm(ptrs, 1.0);
    const double ref = G("clip.norm").item(0);
    std::printf("[parity] %-34s %s rel_err %.3g\n", "clip norm", dtype_name(dt), std::fabs(norm - ref) / ref);
    EXPECT_LE(std::fabs(norm - ref) / ref, tol(dt));
    for (int i = 0; i < 3; ++i)
      EXPECT_LE(err(gs[i], G("clip.out" + std::to_string(i)), "clip out" + std::to_string(i)), tol(dt));
  }
}
