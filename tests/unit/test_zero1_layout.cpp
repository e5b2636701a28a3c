// ZeRO-1's pure shard layout: units are the gradient-norm chunks of every tensor, the runs per rank
// partition them contiguously and are balanced to within one chunk; a one-rank ShardedAdamW (no
// MPI needed: test::LocalCommunicator) updates bit for bit like clip_grad_norm + adamw_step.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;
using namespace opdlm::parallel;

TEST(Zero1Layout, UnitsAreTheNormChunksOfEveryTensor) {
  const auto u = param_units({5, 0, 12, 4}, 4);
  const std::vector<ParamUnit> want = {{0, 0, 4}, {0, 4, 5}, {2, 0, 4}, {2, 4, 8}, {2, 8, 12}, {3, 0, 4}};
  EXPECT_EQ(u, want);
}

TEST(Zero1Layout, ShardsPartitionTheUnitsContiguouslyAndBalanced) {
  std::mt19937 gen(3);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> numels(1 + gen() % 12);
    for (auto& n : numels) n = gen() % 3 == 0 ? 0 : int64_t(gen() % 5000);
    const int64_t chunk = 1 + gen() % 700;
    const auto units = param_units(numels, chunk);
    int64_t total = 0;
    for (const auto& x : units) total += x.size();
    for (int dp = 1; dp <= 9; ++dp) {
      const auto first = shard_units(units, dp);
      ASSERT_EQ(first.size(), size_t(dp) + 1);
      ASSERT_EQ(first.front(), 0u);
      ASSERT_EQ(first.back(), units.size());
      for (int d = 0; d < dp; ++d) {
        ASSERT_LE(first[d], first[d + 1]);
        int64_t n = 0;
        for (size_t k = first[d]; k < first[d + 1]; ++k) n += units[k].size();
        // Balanced: no shard is more than one chunk above an even split.
        ASSERT_LE(n, (total + dp - 1) / dp + chunk) << "dp " << dp << " rank " << d;
      }
    }
  }
}

TEST(Zero1, OneRankMatchesClipAndAdamWBitForBit) {
  std::mt19937 gen(9);
  std::normal_distribution<float> nd(0.f, 1.f);
  const std::vector<Shape> shapes = {{70000}, {3, 5}, {40000, 1}, {17}};  // several norm chunks, small tensors
  std::vector<Tensor> p, q, g, m1, m2;
  for (const auto& s : shapes) {
    p.push_back(Tensor::zeros(s));
    g.push_back(Tensor::zeros(s));
    for (int64_t i = 0; i < p.back().numel(); ++i) p.back().data<float>()[i] = nd(gen);
    q.push_back(p.back().clone());
    m1.push_back(Tensor::zeros(s));
    m2.push_back(Tensor::zeros(s));
  }
  std::vector<Tensor*> pp;
  std::vector<bool> no_decay;
  for (auto& t : q) pp.push_back(&t), no_decay.push_back(t.ndim() < 2);
  test::LocalCommunicator comm;
  ShardedAdamW opt(pp, no_decay, comm);
  EXPECT_EQ(opt.shard_elements(), 70000 + 15 + 40000 + 17);
  ops::AdamWConfig cfg;
  cfg.lr = 1e-2;
  cfg.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    for (auto& t : g)
      for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(gen) * (step == 2 ? 100.f : 0.01f);  // step 2 clips
    std::vector<Tensor*> gp;
    for (auto& t : g) gp.push_back(&t);
    std::vector<const Tensor*> gc(gp.begin(), gp.end());
    const double got = opt.step(gc, step, cfg, 1.0);
    // The single-process reference on copies.
    std::vector<Tensor> gr;
    for (auto& t : g) gr.push_back(t.clone());
    std::vector<Tensor*> grp;
    for (auto& t : gr) grp.push_back(&t);
    const double want = ops::clip_grad_norm(grp, 1.0);
    EXPECT_EQ(got, want) << "step " << step;
    for (size_t i = 0; i < p.size(); ++i) {
      ops::AdamWConfig a = cfg;
      if (p[i].ndim() < 2) a.weight_decay = 0;
      ops::adamw_step(p[i], gr[i], m1[i], m2[i], step, a);
      ASSERT_EQ(std::memcmp(p[i].data<float>(), q[i].data<float>(), p[i].nbytes()), 0) << "tensor " << i << " step " << step;
    }
  }
}

}  // namespace
