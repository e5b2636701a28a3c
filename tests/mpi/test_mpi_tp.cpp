// The tensor-parallel Qwen3 model (Megatron layout, model/tp_layout.hpp) under mpiexec: TP groups of
// 1, 2 and 4 consecutive ranks each hold one shard of a model whose vocabulary TP does not divide,
// and the forward (full-sequence and KV-cache), the logit columns and every parameter gradient
// match the whole model on one rank within 1e-6 relative; the replicated pieces (norm gains and
// their gradients, the residual stream) are bit for bit the same on every rank of a group. In the
// deterministic-reduction mode every layout gives the same bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "opdlm/model/qwen3.hpp"
#include "opdlm/model/tp_layout.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;
using parallel::MpiCommunicator;

model::Qwen3Config tp_test_config() {
  return test::tiny_qwen3_config(66, 32, 64, 4, 4, 8);  // vocabulary 66 = 4 * 17 - 2: padded at TP 4
}


// max |a - b| / max |b| over the elements (b the reference).
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num = std::max(num, std::abs(a[i] - b[i])), den = std::max(den, std::abs(b[i]));
  return den > 0 ? num / den : num;
}

// Columns [c0, c0 + nc) of the 2-D tensor t.
std::vector<double> columns(const Tensor& t, int64_t c0, int64_t nc) {
  std::vector<double> out;
  for (int64_t i = 0; i < t.size(0); ++i)
    for (int64_t j = 0; j < nc; ++j) out.push_back(t.item(i * t.size(1) + c0 + j));
  return out;
}

// In f64 the shards must reproduce the whole model to rounding (1e-12: the algebra is exact); in f32
// the logits within 1e-6, and the gradients are reported (norm-gain gradients sum thousands of
// products, so their f32 rounding is ~1e-6 on either side).
void check_tensor_parallel_model(DType dtype, double logit_tol, double grad_tol) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const model::Qwen3Config c = tp_test_config();
  model::Qwen3Weights full_w(c, dtype);
  full_w.init_random(21, 0.3);
  model::Qwen3Model full(full_w.clone(), true);

  // Two sequences of 7 tokens, causal; logits at 5 rows.
  const int64_t B = 2, T = 7;
  const Tensor ids = test::random_ids({B, T}, 4, int32_t(c.vocab_size));
  std::vector<int32_t> pos(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
  const Tensor positions = Tensor::from_vector(pos, {B, T});
  const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
  const Tensor rows = Tensor::from_vector(std::vector<int32_t>{0, 3, 6, 9, 13}, {5});
  model::Qwen3Activations full_acts;
  const Tensor full_logits = full.forward(ids, positions, std::span(&causal, 1), rows, &full_acts);
  const Tensor dlogits = test::random_tensor({5, c.vocab_size}, 8, -1, 1, dtype);
  full.backward(full_acts, dlogits);

  for (int tp = 1; tp <= n; tp *= 2) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    auto group = world->split(r / tp, r, "tp");
    const int tr = group->rank();
    const parallel::TpPlan plan = model::tp_plan(c, tp);
    const model::VocabRange vr = model::vocab_range(c, plan, tr);
    model::Qwen3Model shard(model::shard_weights(full_w, plan, tr), true, {group.get(), c, vr.begin, vr.real});
    ASSERT_EQ(shard.logit_columns(), vr.real);

    // Forward: this rank's logit columns.
    model::Qwen3Activations acts;
    const Tensor logits = shard.forward(ids, positions, std::span(&causal, 1), rows, &acts);
    ASSERT_EQ(logits.size(1), vr.real);
    const double fe = rel_err(columns(logits, 0, vr.real), columns(full_logits, vr.begin, vr.real));
    EXPECT_LT(fe, logit_tol) << "forward logits";

    // Backward with this rank's columns of the same dlogits.
    std::vector<double> cols = columns(dlogits, vr.begin, vr.real);
    const Tensor dl = Tensor::from_vector(cols, {5, vr.real}).to(dtype);
    shard.backward(acts, dl);
    const model::Qwen3Weights want = model::shard_weights(full.grads(), plan, tr);
    double worst = 0;
    std::string worst_name;
    for (size_t i = 0; i < want.tensors().size(); ++i) {
      const auto& name = want.tensors()[i].name;
      const double e = rel_err(shard.grads().get(name).to_f64_vector(), want.tensors()[i].value.to_f64_vector());
      if (e > worst) worst = e, worst_name = name;
    }
    EXPECT_LT(worst, grad_tol) << "worst gradient " << worst_name;
    if (r == 0)
      std::printf("[tp %d %s] logits rel err %.3g, worst gradient rel err %.3g (%s)\n", tp, dtype_name(dtype), fe, worst,
                  worst_name.c_str());

    // Replicated values agree bit for bit across the group: every norm gain's gradient.
    for (const auto& t : shard.grads().tensors()) {
      if (t.value.ndim() != 1) continue;
      std::vector<double> mine = t.value.to_f64_vector(), all(mine.size() * size_t(tp));
      group->all_gather(std::span<const double>(mine), std::span<double>(all));
      for (int q = 0; q < tp; ++q)
        EXPECT_TRUE(std::equal(mine.begin(), mine.end(), all.begin() + long(q) * long(mine.size()))) << t.name;
    }

    // KV-cache forward: prefill 4 tokens, then 3 more; the last rows' logits match the full model's.
    model::KVCache cache(shard.config(), B, T, dtype);
    model::KVCache full_cache(c, B, T, dtype);
    auto part = [&](int64_t t0, int64_t t1) {
      std::vector<int32_t> pi, pp;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = t0; t < t1; ++t) pi.push_back(ids.data<int32_t>()[b * T + t]), pp.push_back(int32_t(t));
      return std::pair{Tensor::from_vector(pi, {B, t1 - t0}), Tensor::from_vector(pp, {B, t1 - t0})};
    };
    for (auto [t0, t1] : {std::pair<int64_t, int64_t>{0, 4}, {4, 7}}) {
      auto [pi, pp] = part(t0, t1);
      const ops::MaskDescriptor m = ops::MaskDescriptor::causal(0, t0);
      const Tensor a = shard.forward_cached(pi, pp, std::span(&m, 1), cache, true, model::Qwen3Model::last_rows(B, t1 - t0));
      const Tensor b = full.forward_cached(pi, pp, std::span(&m, 1), full_cache, true, model::Qwen3Model::last_rows(B, t1 - t0));
      EXPECT_LT(rel_err(columns(a, 0, vr.real), columns(b, vr.begin, vr.real)), logit_tol) << "cached forward at " << t0;
    }
  }
}

// The deterministic-reduction mode (4 virtual shards, TpPlan::pieces): TP 1 (one rank holding the 4
// pieces), 2 and 4 give the same bits for the logit columns, the KV-cache logits and every parameter
// gradient. The vocabulary (66) is padded to 68 for the 4 virtual shards.
TEST(TensorParallelModel, DeterministicModeGivesTheSameBitsOnEveryTp) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const model::Qwen3Config c = tp_test_config();
  model::Qwen3Weights full_w(c, DType::f32);
  full_w.init_random(21, 0.3);
  const int64_t B = 2, T = 7;
  const Tensor ids = test::random_ids({B, T}, 5, static_cast<int32_t>(c.vocab_size));
  std::vector<int32_t> pos(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) pos[size_t(i)] = int32_t(i % T);
  const Tensor positions = Tensor::from_vector(pos, {B, T});
  const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
  const Tensor rows = Tensor::from_vector(std::vector<int32_t>{0, 3, 6, 9, 13}, {5});
  const Tensor dlogits = test::random_tensor({5, c.vocab_size}, 8, -1, 1, DType::f32);

  struct Result {
    Tensor logits, cached;
    model::Qwen3Weights grads;  // the whole model's (unsharded)
  };
  auto run = [&](parallel::Communicator& group) {
    const int tp = group.size(), tr = group.rank();
    const parallel::TpPlan plan = model::tp_plan(c, tp, 4);
    EXPECT_EQ(plan.pieces, 4 / tp);
    const model::VocabRange vr = model::vocab_range(c, plan, tr);
    model::Qwen3Model m(model::shard_weights(full_w, plan, tr), true, {&group, c, vr.begin, vr.real, plan.pieces});
    model::Qwen3Activations acts;
    Result res;
    const Tensor mine = m.forward(ids, positions, std::span(&causal, 1), rows, &acts);
    m.backward(acts, dlogits.columns(vr.begin, vr.begin + vr.real));
    model::KVCache cache(m.config(), B, T, DType::f32);
    const Tensor cached = m.forward_cached(ids, positions, std::span(&causal, 1), cache, true, model::Qwen3Model::last_rows(B, T));
    // The whole logits and gradients, gathered from the group.
    auto gather_cols = [&](const Tensor& t) {
      Tensor pad = Tensor::zeros({t.size(0), plan.vocab_per_rank}, DType::f32);
      for (int64_t i = 0; i < t.size(0); ++i)
        std::copy_n(t.data<float>() + i * t.size(1), t.size(1), pad.data<float>() + i * plan.vocab_per_rank);
      std::vector<float> all(size_t(pad.numel()) * size_t(tp));
      group.all_gather(std::span<const float>(pad.data<float>(), size_t(pad.numel())), std::span<float>(all));
      Tensor out = Tensor::empty({t.size(0), c.vocab_size}, DType::f32);
      for (int64_t i = 0; i < t.size(0); ++i)
        for (int64_t v = 0; v < c.vocab_size; ++v) {
          const int64_t q = v / plan.vocab_per_rank, col = v % plan.vocab_per_rank;
          out.data<float>()[i * c.vocab_size + v] = all[size_t((q * t.size(0) + i) * plan.vocab_per_rank + col)];
        }
      return out;
    };
    res.logits = gather_cols(mine);
    res.cached = gather_cols(cached);
    std::vector<model::Qwen3Weights> shards;
    for (int q = 0; q < tp; ++q) shards.push_back(m.grads().zeros_like());
    for (size_t i = 0; i < m.grads().tensors().size(); ++i) {
      const Tensor& g = m.grads().tensors()[i].value;
      std::vector<float> all(size_t(g.numel()) * size_t(tp));
      group.all_gather(std::span<const float>(g.data<float>(), size_t(g.numel())), std::span<float>(all));
      for (int q = 0; q < tp; ++q)
        std::copy_n(all.data() + q * g.numel(), g.numel(), shards[size_t(q)].tensors()[i].value.data<float>());
    }
    std::vector<const model::Qwen3Weights*> ptrs;
    for (const auto& sh : shards) ptrs.push_back(&sh);
    res.grads = model::unshard_weights(ptrs, c, plan);
    return res;
  };
  auto same = [](const Tensor& a, const Tensor& b) {
    return a.numel() == b.numel() && std::memcmp(a.raw_data(), b.raw_data(), size_t(a.nbytes())) == 0;
  };
  parallel::LocalCommunicator one;
  const Result ref = run(one);
  // The mode is on: the bits differ from the plain one-process model's (another summation order).
  model::Qwen3Model plain(full_w.clone(), true);
  EXPECT_FALSE(same(plain.forward(ids, positions, std::span(&causal, 1), rows), ref.logits));
  for (int tp = 2; tp <= n; tp *= 2) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    auto group = world->split(r / tp, r, "tp");
    const Result got = run(*group);
    EXPECT_TRUE(same(got.logits, ref.logits)) << "logits";
    EXPECT_TRUE(same(got.cached, ref.cached)) << "KV-cache logits";
    for (size_t i = 0; i < ref.grads.tensors().size(); ++i)
      EXPECT_TRUE(same(got.grads.tensors()[i].value, ref.grads.tensors()[i].value)) << ref.grads.tensors()[i].name;
  }
}

TEST(TensorParallelModel, F64ShardsComputeTheWholeModelToRounding) { check_tensor_parallel_model(DType::f64, 1e-12, 1e-12); }

TEST(TensorParallelModel, F32ShardsComputeTheWholeModelWithin1e6) { check_tensor_parallel_model(DType::f32, 1e-6, 1e-5); }

// The OPD row on TP shards: teacher targets (vp log-softmax), the row loss of every objective
// (forward KL, top-K forward KL, rm-ce's weighted CE) and the student's gradients equal the whole
// models' within 1e-12 (f64); FLOPs are the whole model's on every layout.
TEST(TensorParallelModel, OpdRowsOnShardsEqualTheWholeModel) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  model::Qwen3Config c = tp_test_config();
  c.mask_token_id = 65;
  c.eos_token_id = 64;
  model::Qwen3Weights tw(c, DType::f64), sw(c, DType::f64);
  tw.init_random(31, 0.3);
  sw.init_random(32, 0.3);
  const model::Qwen3Model teacher(tw.clone(), false);
  model::Qwen3Model student(sw.clone(), true);

  train::TrainingRow row;
  row.sample_id = 3;
  row.prompt = {5, 17, 33, 2};
  row.x0 = {40, 12, 7, 50, 21, 64};
  row.masked = {1, 0, 1, 1, 0, 1};
  row.t_block = {0.5, 0.75};
  train::RowLossSpec spec;
  spec.block_size = 4;
  spec.mask_id = 65;
  spec.eos_id = 64;
  spec.pad_id = 64;
  spec.exclude_eos = false;
  const auto js = train::loss_positions(row, spec);
  ASSERT_GE(js.size(), 3u);

  for (int tp = 1; tp <= n; tp *= 2) {
    auto group = world->split(r / tp, r, "tp");
    const parallel::TpPlan plan = model::tp_plan(c, tp);
    const model::VocabRange vr = model::vocab_range(c, plan, group->rank());
    const model::TensorParallel ctx{group.get(), c, vr.begin, vr.real};
    const model::Qwen3Model tshard(model::shard_weights(tw, plan, group->rank()), false, ctx);
    model::Qwen3Model sshard(model::shard_weights(sw, plan, group->rank()), true, ctx);
    const Tensor tl_full = train::teacher_logprobs(teacher, row.prompt, row.x0, js);
    const Tensor tl = train::teacher_logprobs(tshard, row.prompt, row.x0, js);
    for (int obj = 0; obj < 3; ++obj) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " objective " + std::to_string(obj));
      spec.objective = obj == 2 ? train::RowObjective::masked_ce : train::RowObjective::teacher_kl;
      spec.divergence.kind = obj == 1 ? ops::Divergence::topk_forward_kl : ops::Divergence::forward_kl;
      spec.divergence.topk = 7;
      model::Qwen3Activations a1, a2;
      student.zero_grads();
      sshard.zero_grads();
      const train::RowLoss want = train::row_loss(student, tl_full, row, spec, 0.5, a1);
      const train::RowLoss got = train::row_loss(sshard, tl, row, spec, 0.5, a2);
      EXPECT_NEAR(got.loss, want.loss, 1e-12 * std::abs(want.loss));
      EXPECT_EQ(got.student_forward_flops, want.student_forward_flops);
      EXPECT_EQ(got.loss_positions, want.loss_positions);
      const model::Qwen3Weights g = model::shard_weights(student.grads(), plan, group->rank());
      double worst = 0;
      for (const auto& t : g.tensors())
        worst = std::max(worst, rel_err(sshard.grads().get(t.name).to_f64_vector(), t.value.to_f64_vector()));
      EXPECT_LT(worst, 1e-12);
    }
  }
}

}  // namespace
