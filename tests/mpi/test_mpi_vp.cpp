// Vocab-parallel losses (parallel/vocab_parallel.hpp) under mpiexec: for TP groups of 1, 2 and 4 ranks
// holding column slices of a 66-token vocabulary (uneven at TP 4), log-softmax, every divergence of
// the OPD family (top-K with ties across a slice boundary and -inf teacher entries included) and the
// weighted cross-entropy give the values and gradients of the whole-vocabulary ops: within 1e-12
// relative in f64, 1e-6 in f32. The sampler's Gumbel-max draw picks the tokens one process picks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/ops/sampling.hpp"
#include "opdlm/ops/softmax.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/vocab_parallel.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;
using parallel::MpiCommunicator;

constexpr int64_t kV = 66, kRows = 6;

// Columns [c0, c0 + nc) of a 2-D tensor, same dtype.
Tensor cols(const Tensor& t, int64_t c0, int64_t nc) {
  std::vector<double> v;
  for (int64_t i = 0; i < t.size(0); ++i)
    for (int64_t j = 0; j < nc; ++j) v.push_back(t.item(i * t.size(1) + c0 + j));
  return Tensor::from_vector(v, {t.size(0), nc}).to(t.dtype());
}

double rel_err(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.item(i), y = b.item(i);
    if (std::isinf(y) && x == y) continue;
    num = std::max(num, std::abs(x - y));
    den = std::max(den, std::abs(y));
  }
  return den > 0 ? num / den : num;
}

void check_vocab_parallel(DType dtype, double tol) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const Tensor student = test::random_tensor({kRows, kV}, 3, -3, 3, dtype);
  Tensor tlogits = test::random_tensor({kRows, kV}, 4, -3, 3, DType::f64);
  for (int64_t v = 0; v < kV; ++v) tlogits.data<double>()[v] = 0.5;  // row 0: all tied (top-K by token id)
  Tensor teacher = ops::log_softmax_forward(tlogits).to(dtype);
  for (int64_t v = 10; v < 40; ++v)  // row 1: tokens the teacher excludes
    if (dtype == DType::f64) teacher.data<double>()[kV + v] = -std::numeric_limits<double>::infinity();
    else teacher.data<float>()[kV + v] = -std::numeric_limits<float>::infinity();
  const Tensor dloss = test::random_tensor({kRows}, 5, 0.5, 1.5, dtype);

  for (int tp = 1; tp <= n; tp *= 2) {
    SCOPED_TRACE("tp " + std::to_string(tp) + " " + dtype_name(dtype));
    auto group = world->split(r / tp, r, "tp");
    const int64_t per = (kV + tp - 1) / tp, begin = group->rank() * per, real = std::clamp<int64_t>(kV - begin, 0, per);
    const parallel::VocabSlice slice{begin, kV};
    const Tensor s = cols(student, begin, real), t = cols(teacher, begin, real);

    EXPECT_LT(rel_err(parallel::vp_log_softmax(s, *group), cols(ops::log_softmax_forward(student), begin, real)), tol);

    for (int kind = 0; kind < 6; ++kind) {
      ops::DivergenceSpec spec;
      spec.kind = kind == 0 ? ops::Divergence::forward_kl : kind == 1 ? ops::Divergence::reverse_kl
                : kind == 2 ? ops::Divergence::mixture : kind == 3 ? ops::Divergence::jsd : ops::Divergence::topk_forward_kl;
      spec.reverse_weight = 0.3;
      spec.topk = kind == 4 ? 5 : 20;
      SCOPED_TRACE(std::string(ops::divergence_name(spec.kind)) + " K " + std::to_string(spec.topk));
      Tensor lse_full, lse_vp;
      const Tensor D_full = ops::divergence_forward(teacher, student, spec, &lse_full);
      const Tensor D_vp = parallel::vp_divergence_forward(t, s, spec, &lse_vp, *group, slice);
      EXPECT_LT(rel_err(D_vp, D_full), tol) << "D";
      EXPECT_LT(rel_err(lse_vp, lse_full), tol) << "lse";
      const Tensor g_full = ops::divergence_backward(teacher, student, lse_full, dloss, spec);
      const Tensor g_vp = parallel::vp_divergence_backward(t, s, lse_vp, dloss, spec, *group, slice);
      EXPECT_LT(rel_err(g_vp, cols(g_full, begin, real)), tol) << "dstudent";
    }

    // Weighted cross-entropy; row 2 ignored, targets on every slice.
    const Tensor targets = Tensor::from_vector(std::vector<int32_t>{0, 17, ops::kIgnoreIndex, 33, 50, 65}, {kRows});
    const Tensor w = test::random_tensor({kRows}, 6, 0.5, 2.0, dtype);
    Tensor lf, lv;
    const Tensor ce_full = ops::cross_entropy_forward(student, targets, w, &lf);
    const Tensor ce_vp = parallel::vp_cross_entropy_forward(s, targets, w, &lv, *group, slice);
    EXPECT_LT(rel_err(ce_vp, ce_full), tol) << "cross-entropy";
    const Tensor dce_full = ops::cross_entropy_backward(student, targets, w, lf, dloss);
    const Tensor dce_vp = parallel::vp_cross_entropy_backward(s, targets, w, lv, dloss, *group, slice);
    EXPECT_LT(rel_err(dce_vp, cols(dce_full, begin, real)), tol) << "cross-entropy backward";
    const Tensor bad = Tensor::from_vector(std::vector<int32_t>{0, 0, 0, 0, 0, 66}, {kRows});
    EXPECT_ERROR_HAS(parallel::vp_cross_entropy_forward(s, bad, w, nullptr, *group, slice), "targets", "66");
  }
}

// The sampler's draw: the same tokens as ops::sample_token on the whole row, for every rank layout,
// with ties made on purpose (logits on a 0.5 grid) for greedy and top-k; confidences within 1e-6.
TEST(VocabParallel, DrawsGiveTheTokensOfOneProcess) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const int64_t rows = 300;
  Tensor logits = test::random_tensor({rows, kV}, 12, -4, 4, DType::f32);
  for (int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = std::round(logits.data<float>()[i] * 2.0f) / 2.0f;
  std::vector<CounterRng> keys;
  for (int64_t i = 0; i < rows; ++i) keys.emplace_back(RngKey{7, RngPurpose::rollout_token, 3, uint32_t(i), 5});
  const ops::SamplingParams cases[] = {{1.0, 0, 1.0}, {0.7, 0, 1.0}, {0.0, 0, 1.0}, {1.0, 5, 1.0}, {0.9, 1, 1.0}};
  for (int tp = 1; tp <= n; tp *= 2) {
    auto group = world->split(r / tp, r, "tp");
    const int64_t per = (kV + tp - 1) / tp, begin = group->rank() * per, real = std::clamp<int64_t>(kV - begin, 0, per);
    const Tensor mine = cols(logits, begin, real);
    for (const auto& p : cases) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " temperature " + std::to_string(p.temperature) + " top_k " +
                   std::to_string(p.top_k));
      const auto got = parallel::vp_sample_tokens(mine, keys, p, *group, {begin, kV});
      std::vector<float> scratch(static_cast<size_t>(kV));
      int differ = 0;
      double conf_err = 0;
      for (int64_t i = 0; i < rows; ++i) {
        const ops::TokenDraw want = ops::sample_token(logits.data<float>() + i * kV, kV, p, keys[size_t(i)], scratch.data());
        differ += got[size_t(i)].token != want.token;
        conf_err = std::max(conf_err, std::abs(double(got[size_t(i)].confidence) - want.confidence) / want.confidence);
      }
      EXPECT_EQ(differ, 0);
      EXPECT_LT(conf_err, 1e-6);
    }
    EXPECT_ERROR_HAS(parallel::vp_sample_tokens(mine, keys, {1.0, 0, 0.9}, *group, {begin, kV}), "top_p");
  }
}

TEST(VocabParallel, F64LossesEqualTheWholeVocabularyOps) { check_vocab_parallel(DType::f64, 1e-12); }
TEST(VocabParallel, F32LossesEqualTheWholeVocabularyOps) { check_vocab_parallel(DType::f32, 1e-6); }

}  // namespace
