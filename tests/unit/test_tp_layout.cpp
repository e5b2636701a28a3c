// The TP layout and the memory-per-rank formula against what the code allocates: at TP = 1 the
// shard shapes are Qwen3Weights' and the weight bytes are those of a real allocation; at TP > 1 the
// shards add up to the whole (padded) model; the ZeRO-1 AdamW bytes are ShardedAdamW's, per rank.
#include <gtest/gtest.h>

#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/model/tp_layout.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;


int64_t numel_of(const std::vector<std::pair<std::string, Shape>>& shapes) {
  int64_t n = 0;
  for (const auto& [name, s] : shapes) n += shape_numel(s);
  return n;
}

std::vector<model::Qwen3Config> configs() {
  model::Qwen3Config a = test::tiny_qwen3_config(1001, 32, 96, 8, 4, 8);  // GQA, vocab not a multiple of 8
  model::Qwen3Config b = a;
  b.tie_word_embeddings = false;
  model::Qwen3Config c = test::tiny_qwen3_config(512, 64, 192, 4, 2, 16);
  return {a, b, c};
}

TEST(TpLayout, AtTp1TheShardsAreTheModelAndTheFormulaIsTheAllocation) {
  for (const auto& c : configs()) {
    const auto plan = model::tp_plan(c, 1);
    EXPECT_EQ(model::tp_shard_shapes(c, plan), model::Qwen3Weights::expected_shapes(c));
    const model::Qwen3Weights w(c);
    int64_t bytes = 0;
    for (const auto& t : w.tensors()) bytes += int64_t(t.value.nbytes());
    const auto m = model::memory_per_rank(c, plan, 1);
    EXPECT_EQ(m.params, c.num_params());
    EXPECT_EQ(m.student_bytes, bytes);
    EXPECT_EQ(m.teacher_bytes, bytes);
    int64_t grad_bytes = 0;
    const model::Qwen3Weights g = w.zeros_like();  // the gradient buffers a trainer allocates
    for (const auto& t : g.tensors()) grad_bytes += int64_t(t.value.nbytes());
    EXPECT_EQ(m.grad_bytes, grad_bytes);
  }
}

TEST(TpLayout, ShardsAddUpToTheWholePaddedModel) {
  for (const auto& c : configs()) {
    for (int tp : {2, 4, 8}) {
      if (c.num_attention_heads % tp || c.intermediate_size % tp) continue;
      SCOPED_TRACE("tp " + std::to_string(tp));
      const auto plan = model::tp_plan(c, tp);
      const auto shapes = model::tp_shard_shapes(c, plan);
      const auto m = model::memory_per_rank(c, plan, 1);
      EXPECT_EQ(m.params, numel_of(shapes));  // the closed form counts what the shard shapes hold
      model::Qwen3Config padded = c;
      padded.vocab_size = plan.padded_vocab;
      const int64_t H = c.hidden_size, hd = c.head_dim, L = c.num_hidden_layers;
      const int64_t replicated = L * (2 * H + 2 * hd) + H;  // norms: on every rank
      const int64_t kv_extra = L * 2 * H * hd * (plan.kv_heads_per_rank * tp - c.num_key_value_heads);
      EXPECT_EQ(int64_t(tp) * m.params - (tp - 1) * replicated, padded.num_params() + kv_extra);
      EXPECT_EQ(plan.kv_replication > 1, kv_extra > 0);
    }
  }
}

TEST(TpLayout, Zero1AdamBytesAreWhatShardedAdamWHolds) {
  model::Qwen3Config c = test::tiny_qwen3_config(1000, 64, 192, 4, 2, 16);  // ~0.26M parameters: many norm chunks
  model::Qwen3Weights w(c);
  std::vector<Tensor*> params;
  std::vector<bool> no_decay;
  for (auto& t : w.tensors()) params.push_back(&t.value), no_decay.push_back(t.value.ndim() < 2);
  const auto plan = model::tp_plan(c, 1);
  for (int dp : {1, 2, 3, 4, 8}) {
    const auto m = model::memory_per_rank(c, plan, dp);
    int64_t sum = 0;
    for (int r = 0; r < dp; ++r) {
      test::LocalCommunicator comm(r, dp);  // the constructor only lays out shards
      parallel::ShardedAdamW opt(params, no_decay, comm);
      sum += opt.state_bytes();
      // Balanced to within one norm chunk of the formula's even split.
      EXPECT_LE(opt.state_bytes(), m.adam_bytes + 8 * ops::kGradNormChunk) << "dp " << dp << " rank " << r;
      EXPECT_LE(4 * (2 * dp + 2) * opt.padded_shard(), m.zero1_step_bytes + 4 * (2 * dp + 2) * ops::kGradNormChunk);
    }
    EXPECT_EQ(sum, 8 * m.params) << "dp " << dp;  // every moment held exactly once
  }
}

}  // namespace

// Real shards (shard_weights, what the TP model is built from): the shapes tp_shard_shapes names, an
// allocation equal to memory_per_rank's parameter count, zero pad rows, and unshard_weights gives
// the original bits back. A plan that replicates KV heads is refused by name.
TEST(TpLayout, RealShardsHaveTheLayoutAndUnshardIsTheInverse) {
  const model::Qwen3Config c = test::tiny_qwen3_config(66, 32, 64, 4, 4, 8);  // 66: padded at TP 4
  model::Qwen3Weights full(c);
  full.init_random(9, 0.3);
  for (int tp : {1, 2, 4}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    const parallel::TpPlan plan = model::tp_plan(c, tp);
    std::vector<model::Qwen3Weights> shards;
    int64_t real_rows = 0;
    for (int r = 0; r < tp; ++r) {
      shards.push_back(model::shard_weights(full, plan, r));
      const auto want = model::tp_shard_shapes(c, plan);
      const auto& got = shards.back().tensors();
      ASSERT_EQ(got.size(), want.size());
      int64_t numel = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].name, want[i].first);
        EXPECT_EQ(got[i].value.shape(), want[i].second) << got[i].name;
        numel += got[i].value.numel();
      }
      EXPECT_EQ(numel, model::memory_per_rank(c, plan, 1).params);
      const model::VocabRange vr = model::vocab_range(c, plan, r);
      real_rows += vr.real;
      const Tensor& emb = shards.back().get("model.embed_tokens.weight");
      for (int64_t i = vr.real * c.hidden_size; i < emb.numel(); ++i) ASSERT_EQ(emb.item(i), 0.0) << "pad row element " << i;
    }
    EXPECT_EQ(real_rows, c.vocab_size);
    std::vector<const model::Qwen3Weights*> ptrs;
    for (const auto& s : shards) ptrs.push_back(&s);
    const model::Qwen3Weights back = model::unshard_weights(ptrs, c, plan);
    for (size_t i = 0; i < full.tensors().size(); ++i) {
      const Tensor& a = full.tensors()[i].value;
      const Tensor& b = back.tensors()[i].value;
      ASSERT_EQ(a.shape(), b.shape());
      EXPECT_EQ(a.to_f32_vector(), b.to_f32_vector()) << full.tensors()[i].name;
    }
  }
  const model::Qwen3Config narrow = test::tiny_qwen3_config(64, 32, 64, 4, 2, 8);
  model::Qwen3Weights w(narrow);
  EXPECT_ERROR_HAS(model::shard_weights(w, model::tp_plan(narrow, 4), 0), "num_key_value_heads", "replicated");
}
