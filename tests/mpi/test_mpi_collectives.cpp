// The MPI backend of Communicator and the ProcessGrid split, run by ctest under
// `mpiexec -n {1,2,4}` and as a singleton without mpiexec: collectives give the analytic results on
// every rank, the TP/DP communicators hold the ranks grid_coord says, and every call is recorded.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/parallel/tree_sum.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "opdlm/diffusion/rollout_exchange.hpp"
#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/model/qwen3.hpp"
#include "test_util.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/grad_norm.hpp"

namespace {

using namespace opdlm::parallel;
using opdlm::Shape;
using opdlm::Tensor;

TEST(MpiCommunicator, CollectivesGiveTheAnalyticResultOnEveryRank) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const uint64_t calls0 = world->calls(), recorded0 = flight_recorder().total();

  std::vector<float> f = {float(r + 1), -float(r), 0.5f};
  world->all_reduce(std::span<float>(f));
  EXPECT_EQ(f[0], float(n * (n + 1) / 2));
  EXPECT_EQ(f[1], -float(n * (n - 1) / 2));
  EXPECT_EQ(f[2], 0.5f * n);

  std::vector<double> m = {double(r), -double(r)};
  world->all_reduce(std::span<double>(m), ReduceOp::max);
  EXPECT_EQ(m[0], n - 1);
  EXPECT_EQ(m[1], 0);

  std::vector<int64_t> big = {int64_t{1} << 40, r};
  world->all_reduce(std::span<int64_t>(big));
  EXPECT_EQ(big[0], (int64_t{1} << 40) * n);

  // reduce_scatter: rank q contributes q*100 + i at slot i; chunk c (2 elements) goes to rank c.
  std::vector<float> in(2 * n), out(2);
  for (int i = 0; i < 2 * n; ++i) in[i] = float(r * 100 + i);
  world->reduce_scatter(std::span<const float>(in), std::span<float>(out));
  const float rank_sum = float(100 * n * (n - 1) / 2);
  EXPECT_EQ(out[0], rank_sum + float(n * (2 * r)));
  EXPECT_EQ(out[1], rank_sum + float(n * (2 * r + 1)));

  std::vector<int64_t> mine = {r, 10 * r}, all(2 * n);
  world->all_gather(std::span<const int64_t>(mine), std::span<int64_t>(all));
  for (int q = 0; q < n; ++q) {
    EXPECT_EQ(all[2 * q], q);
    EXPECT_EQ(all[2 * q + 1], 10 * q);
  }

  std::vector<uint8_t> bytes = {uint8_t(r), 7};
  world->broadcast(std::span<uint8_t>(bytes), n - 1);
  EXPECT_EQ(bytes[0], n - 1);
  world->barrier();

  // Seven calls, each recorded with this communicator's sequence numbers and its payload.
  EXPECT_EQ(world->calls() - calls0, 7u);
  const auto snap = flight_recorder().snapshot();
  ASSERT_GE(flight_recorder().total() - recorded0, 7u);
  const auto& last = snap.back();
  EXPECT_EQ(last.op, CollectiveOp::barrier);
  EXPECT_EQ(last.comm, "world");
  EXPECT_EQ(last.seq, world->calls() - 1);
  EXPECT_GE(last.end_s, last.start_s);
  const auto& first = snap[snap.size() - 7];
  EXPECT_EQ(first.op, CollectiveOp::all_reduce);
  EXPECT_EQ(first.bytes, 3 * sizeof(float));
  EXPECT_EQ(snap[snap.size() - 4].op, CollectiveOp::reduce_scatter);
  EXPECT_EQ(snap[snap.size() - 4].bytes, 2 * n * sizeof(float));
}

TEST(MpiCommunicator, MismatchedBuffersAreRefusedBeforeAnyCommunication) {
  auto world = MpiCommunicator::world();
  std::vector<float> in(3 * world->size() + 1), out(3);
  EXPECT_THROW(world->reduce_scatter(std::span<const float>(in), std::span<float>(out)), opdlm::Error);
  std::vector<float> small(3), gathered(3 * world->size() + 2);
  EXPECT_THROW(world->all_gather(std::span<const float>(small), std::span<float>(gathered)), opdlm::Error);
  std::vector<float> b(2);
  EXPECT_THROW(world->broadcast(std::span<float>(b), world->size()), opdlm::Error);
  world->barrier();  // every rank threw locally, so the world is still in step
}

TEST(MpiCommunicator, ReduceScatterSumsInTheFixedTreeOverRanks) {
  // Every rank can rebuild every rank's input, so each checks its chunk against the serial tree.
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const size_t chunk = 1000;
  auto input_of = [&](int q) {
    std::vector<float> v(chunk * n);
    for (size_t i = 0; i < v.size(); ++i)  // magnitudes over 6 decades: the sum depends on the order
      v[i] = std::ldexp(float((q * 7919 + i * 104729) % 2001) - 1000.f, int((q * 31 + i) % 40) - 20);
    return v;
  };
  const auto mine = input_of(r);
  std::vector<float> out(chunk);
  world->reduce_scatter(std::span<const float>(mine), std::span<float>(out));
  std::vector<float> parts;
  for (int q = 0; q < n; ++q) {
    const auto v = input_of(q);
    parts.insert(parts.end(), v.begin() + r * chunk, v.begin() + (r + 1) * chunk);
  }
  std::vector<float> want(chunk);
  tree_combine_into(parts.data(), size_t(n), chunk, want.data());
  EXPECT_EQ(std::memcmp(out.data(), want.data(), chunk * sizeof(float)), 0);
}

// ZeRO-1 on the real DP group: the same parameters, bit for bit, as one process that sums the
// ranks' gradient parts by the same tree, clips and runs AdamW; the state is split, not copied.
// Under TP x DP the global gradient norm adds every TP rank's shard of the sharded tensors and the
// replicated ones once, after the DP sum. Gradients are multiples of 1/64 so every float sum is exact
// and the norm is compared with the analytic one to 1e-12; replicated parameters stay bitwise equal
// across the TP group after the step.
TEST(ShardedAdamW, TheNormCountsShardsOfEveryTpRankAndReplicasOnce) {
  auto world = MpiCommunicator::world();
  const int n = world->size();
  for (int tp = 2; tp <= n; tp *= 2) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    ProcessGrid grid(world, {n, tp});
    const int tr = grid.coord().tp_rank, dr = grid.coord().dp_rank, dp = n / tp;
    const std::vector<int64_t> sizes = {1000, 40000, 20000};  // sharded, replicated (3 chunks), sharded
    const std::vector<bool> replicated = {false, true, false};
    // Rank (t, d)'s gradient of tensor i element e: a multiple of 1/64; replicated ones do not depend on t.
    auto grad = [&](int t, int d, size_t i, int64_t e) {
      const int64_t k = (replicated[i] ? 0 : 7 * t) + 3 * d + int64_t(i) + e;
      return float((k % 13) - 6) / 64.0f;
    };
    std::vector<Tensor> p, g;
    std::vector<Tensor*> pp;
    std::vector<const Tensor*> gp;
    for (size_t i = 0; i < sizes.size(); ++i) {
      p.push_back(Tensor::zeros({sizes[i]}));
      g.push_back(Tensor::zeros({sizes[i]}));
      for (int64_t e = 0; e < sizes[i]; ++e) g.back().data<float>()[e] = grad(tr, dr, i, e);
    }
    for (size_t i = 0; i < sizes.size(); ++i) pp.push_back(&p[i]), gp.push_back(&g[i]);
    double want = 0;
    for (size_t i = 0; i < sizes.size(); ++i)
      for (int t = 0; t < (replicated[i] ? 1 : tp); ++t)
        for (int64_t e = 0; e < sizes[i]; ++e) {
          double s = 0;
          for (int d = 0; d < dp; ++d) s += grad(t, d, i, e);
          want += s * s;
        }
    ShardedAdamW opt(pp, {false, true, false}, grid.dp());
    opt.set_tensor_parallel(&grid.tp(), replicated);
    opdlm::ops::AdamWConfig cfg;
    cfg.lr = 1e-2;
    const double norm = opt.step(gp, 1, cfg, 1.0);
    EXPECT_NEAR(norm, std::sqrt(want), 1e-12 * std::sqrt(want));
    std::vector<float> mine = p[1].to_f32_vector(), all(mine.size() * size_t(tp));
    grid.tp().all_gather(std::span<const float>(mine), std::span<float>(all));
    for (int t = 0; t < tp; ++t)
      EXPECT_TRUE(std::equal(mine.begin(), mine.end(), all.begin() + long(t) * long(mine.size()))) << "replica " << t;
  }
}

TEST(ShardedAdamW, EveryDpSizeUpdatesLikeOneProcess) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const std::vector<Shape> shapes = {{50000}, {64, 48}, {33}, {20000, 2}};
  auto part_of = [&](int q, int64_t step, size_t t, int64_t numel) {  // rank q's gradient part
    std::vector<float> v(static_cast<size_t>(numel));
    std::mt19937 gen(uint32_t(1000 * q + 10 * step + t));
    std::normal_distribution<float> nd(0.f, step == 2 ? 50.f : 0.02f);  // step 2 clips
    for (auto& x : v) x = nd(gen);
    return v;
  };
  std::vector<Tensor> mine, ref, m1, m2;
  std::mt19937 init(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const auto& s : shapes) {
    mine.push_back(Tensor::zeros(s));
    for (int64_t i = 0; i < mine.back().numel(); ++i) mine.back().data<float>()[i] = nd(init);
    ref.push_back(mine.back().clone());
    m1.push_back(Tensor::zeros(s));
    m2.push_back(Tensor::zeros(s));
  }
  std::vector<Tensor*> pp;
  std::vector<bool> no_decay;
  int64_t total = 0;
  for (auto& t : mine) pp.push_back(&t), no_decay.push_back(t.ndim() < 2), total += t.numel();
  ShardedAdamW opt(pp, no_decay, *world);
  // The optimizer state is sharded: about 1/n of the moments per rank (within a norm chunk).
  EXPECT_LE(opt.shard_elements(), total / n + opdlm::ops::kGradNormChunk);
  int64_t shards = opt.shard_elements();
  std::vector<int64_t> s1 = {shards};
  world->all_reduce(std::span<int64_t>(s1));
  EXPECT_EQ(s1[0], total);
  opdlm::ops::AdamWConfig cfg;
  cfg.lr = 3e-3;
  cfg.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<Tensor> g, gsum;
    for (size_t t = 0; t < shapes.size(); ++t) {
      g.push_back(Tensor::zeros(shapes[t]));
      gsum.push_back(Tensor::zeros(shapes[t]));
      const auto v = part_of(r, step, t, g.back().numel());
      std::memcpy(g.back().data<float>(), v.data(), v.size() * sizeof(float));
      std::vector<float> parts;
      for (int q = 0; q < n; ++q) {
        const auto w = part_of(q, step, t, g.back().numel());
        parts.insert(parts.end(), w.begin(), w.end());
      }
      tree_combine_into(parts.data(), size_t(n), size_t(g.back().numel()), gsum.back().data<float>());
    }
    std::vector<const Tensor*> gc;
    for (auto& t : g) gc.push_back(&t);
    const double got = opt.step(gc, step, cfg, 1.0);
    std::vector<Tensor*> gp;
    for (auto& t : gsum) gp.push_back(&t);
    const double want = opdlm::ops::clip_grad_norm(gp, 1.0);
    EXPECT_EQ(got, want) << "step " << step;
    for (size_t t = 0; t < ref.size(); ++t) {
      opdlm::ops::AdamWConfig a = cfg;
      if (ref[t].ndim() < 2) a.weight_decay = 0;
      opdlm::ops::adamw_step(ref[t], gsum[t], m1[t], m2[t], step, a);
      ASSERT_EQ(std::memcmp(ref[t].data<float>(), mine[t].data<float>(), ref[t].nbytes()), 0)
          << "tensor " << t << " step " << step << " rank " << r;
    }
  }
}

// DP rollouts: each rank decodes its share of the prompts (sample id = global index, so the share
// changes with the world size), and the gathered rollouts equal one process decoding all of them in
// one batch, bit for bit, bad prompts (with their error text) included.
TEST(RolloutExchange, SharedDecodingEqualsOneProcessDecodingEverything) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  constexpr int64_t kVocab = 24;
  opdlm::model::Qwen3Config c = opdlm::test::tiny_qwen3_config(kVocab, 16, 32, 2, 1, 8);
  c.mask_token_id = kVocab - 1;
  opdlm::model::Qwen3Weights w(c);
  w.init_random(11, 0.3);
  const auto model = opdlm::model::Qwen3Model::student(std::move(w));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<uint32_t> ids;
  for (int i = 0; i < 9; ++i) {
    std::vector<int32_t> p;
    for (int t = 0; t < (i == 4 ? 0 : 1 + (5 * i) % 7); ++t) p.push_back(static_cast<int32_t>((7 * i + 5 * t + 3) % (kVocab - 1)));
    prompts.push_back(p);  // prompt 4 is empty: a failed rollout that must travel too
    ids.push_back(static_cast<uint32_t>(1000 + i));
  }
  opdlm::diffusion::SamplerOptions o;
  o.block_size = 4;
  o.steps_per_block = 4;
  o.max_new_tokens = 10;
  o.strategy = opdlm::diffusion::Strategy::low_confidence_static;
  o.sampling.temperature = 1.0;
  o.mask_id = int32_t(kVocab - 1);
  o.eos_id = 2;
  o.pad_id = 0;
  o.seed = 5;
  o.step = 3;
  const auto whole = opdlm::diffusion::bd_generate(model, prompts, ids, o);
  std::vector<std::vector<int32_t>> my_prompts;
  std::vector<uint32_t> my_ids;
  for (size_t i = 0; i < prompts.size(); ++i)
    if (int(i) % n == r) my_prompts.push_back(prompts[i]), my_ids.push_back(ids[i]);
  const auto mine = opdlm::diffusion::bd_generate(model, my_prompts, my_ids, o);
  const auto all = opdlm::diffusion::all_gather_rollouts(mine, *world);
  ASSERT_EQ(all.size(), whole.size());
  for (size_t i = 0; i < all.size(); ++i) EXPECT_TRUE(all[i] == whole[i]) << "sample " << whole[i].sample_id;
  EXPECT_FALSE(all[4].ok());
  EXPECT_FALSE(all[4].error.empty());
}

TEST(ProcessGrid, TpAndDpCommunicatorsHoldTheRanksOfTheLayout) {
  auto world = MpiCommunicator::world();
  const int n = world->size();
  for (int tp = 1; tp <= n; ++tp) {
    if (n % tp) continue;
    SCOPED_TRACE("tp " + std::to_string(tp));
    ProcessGrid grid(world, {n, tp});
    const GridCoord c = grid_coord(world->rank(), {n, tp});
    EXPECT_EQ(grid.coord(), c);
    EXPECT_EQ(grid.tp().size(), tp);
    EXPECT_EQ(grid.dp().size(), n / tp);
    EXPECT_EQ(grid.tp().rank(), c.tp_rank);
    EXPECT_EQ(grid.dp().rank(), c.dp_rank);
    // Summing world ranks over each communicator gives the sum of the group the layout names.
    std::vector<int64_t> v = {world->rank()};
    grid.tp().all_reduce(std::span<int64_t>(v));
    const auto tg = tp_group_ranks(c.dp_rank, {n, tp});
    EXPECT_EQ(v[0], std::accumulate(tg.begin(), tg.end(), int64_t{0}));
    v = {world->rank()};
    grid.dp().all_reduce(std::span<int64_t>(v));
    const auto dg = dp_group_ranks(c.tp_rank, {n, tp});
    EXPECT_EQ(v[0], std::accumulate(dg.begin(), dg.end(), int64_t{0}));
    // And gathering world ranks over TP lists the group in tp_rank order.
    std::vector<int64_t> me = {world->rank()}, members(tp);
    grid.tp().all_gather(std::span<const int64_t>(me), std::span<int64_t>(members));
    for (int t = 0; t < tp; ++t) EXPECT_EQ(members[t], tg[t]);
  }
  EXPECT_THROW(ProcessGrid(world, {n + 1, 1}), opdlm::Error);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  opdlm::parallel::MpiRuntime::ensure_initialized();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  opdlm::LogOptions lo;  // the training runs of test_mpi_opd.cpp log every step on every rank otherwise
  lo.rank = rank;
  lo.min_severity = opdlm::Severity::warning;
  opdlm::init_logging(lo);
  if (rank != 0) delete ::testing::UnitTest::GetInstance()->listeners().Release(
      ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  int rc = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);  // a failure on any rank fails the test
  return any;
}
