// ProcessGrid's pure parts: the rank layout, exhaustively for every world size up to 64 and every TP
// that divides it, and the sharding preflight (errors name the file and field), plus the flight
// recorder ring. The MPI side is tests/mpi/.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <sstream>

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/parallel/tree_sum.hpp"
#include "opdlm/train/opd_trainer.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm::parallel;

TEST(ProcessGridLayout, EveryWorldUpTo64IsABijectionWithTpFastest) {
  int layouts = 0;
  for (int world = 1; world <= 64; ++world) {
    for (int tp = 1; tp <= world; ++tp) {
      if (world % tp) continue;
      ++layouts;
      const GridShape s{world, tp};
      SCOPED_TRACE("world " + std::to_string(world) + " tp " + std::to_string(tp));
      ASSERT_EQ(s.dp() * tp, world);
      std::set<std::pair<int, int>> seen;
      for (int r = 0; r < world; ++r) {
        const GridCoord c = grid_coord(r, s);
        ASSERT_GE(c.tp_rank, 0);
        ASSERT_LT(c.tp_rank, tp);
        ASSERT_GE(c.dp_rank, 0);
        ASSERT_LT(c.dp_rank, s.dp());
        ASSERT_TRUE(seen.insert({c.tp_rank, c.dp_rank}).second) << "two ranks share a coordinate";
        ASSERT_EQ(grid_world_rank(c, s), r);  // the inverse
        // TP varies fastest: the next rank is the next shard of the same TP group, unless it wraps.
        if (r + 1 < world) {
          const GridCoord n = grid_coord(r + 1, s);
          if (c.tp_rank + 1 < tp)
            ASSERT_EQ(n, (GridCoord{c.tp_rank + 1, c.dp_rank}));
          else
            ASSERT_EQ(n, (GridCoord{0, c.dp_rank + 1}));
        }
      }
      ASSERT_EQ(static_cast<int>(seen.size()), world);
      // The groups partition the world: TP groups are runs of consecutive ranks (node-local with
      // block placement), DP groups take every tp-th rank.
      std::vector<int> tp_cover, dp_cover;
      for (int d = 0; d < s.dp(); ++d) {
        const auto g = tp_group_ranks(d, s);
        ASSERT_EQ(static_cast<int>(g.size()), tp);
        for (int t = 0; t < tp; ++t) {
          ASSERT_EQ(g[t], d * tp + t);
          ASSERT_EQ(grid_coord(g[t], s), (GridCoord{t, d}));
        }
        tp_cover.insert(tp_cover.end(), g.begin(), g.end());
      }
      for (int t = 0; t < tp; ++t) {
        const auto g = dp_group_ranks(t, s);
        ASSERT_EQ(static_cast<int>(g.size()), s.dp());
        for (int d = 0; d < s.dp(); ++d) ASSERT_EQ(grid_coord(g[d], s), (GridCoord{t, d}));
        dp_cover.insert(dp_cover.end(), g.begin(), g.end());
      }
      std::sort(dp_cover.begin(), dp_cover.end());
      for (int r = 0; r < world; ++r) {
        ASSERT_EQ(tp_cover[r], r);
        ASSERT_EQ(dp_cover[r], r);
      }
    }
  }
  EXPECT_EQ(layouts, 280);  // the number of divisors of 1..64, summed
}

TEST(ProcessGridLayout, BadShapesAndRanksAreRefused) {
  for (auto [world, tp] : {std::pair{4, 3}, {6, 4}, {4, 0}, {4, -2}, {0, 1}, {5, 10}}) {
    try {
      validate_grid_shape({world, tp}, "configs/x.ini");
      ADD_FAILURE() << "world " << world << " tp " << tp << " accepted";
    } catch (const opdlm::Error& e) {
      EXPECT_EQ(e.context().file, "configs/x.ini");
      EXPECT_NE(std::string(e.what()).find(world < 1 ? "world size" : "parallel.tp"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(grid_coord(4, {4, 2}), opdlm::Error);
  EXPECT_THROW(grid_coord(-1, {4, 2}), opdlm::Error);
  EXPECT_THROW(grid_world_rank({2, 0}, {4, 2}), opdlm::Error);
  EXPECT_THROW(grid_world_rank({0, 2}, {4, 2}), opdlm::Error);
}

// ---- preflight ------------------------------------------------------------------------------------------

PreflightInput qwen3_0p6b(int world, int tp) {  // Qwen3-0.6B: 16 heads, 8 KV heads, FFN 3072, vocab 151936
  PreflightInput in;
  in.shape = {world, tp};
  in.config_file = "configs/opd/x.ini";
  in.model_file = "model.h5";
  in.num_heads = 16;
  in.num_kv_heads = 8;
  in.intermediate_size = 3072;
  in.vocab_size = 151936;
  return in;
}

void expect_error(const PreflightInput& in, const std::string& file, const std::string& field) {
  try {
    preflight(in);
    ADD_FAILURE() << "accepted; expected an error on " << field;
  } catch (const opdlm::Error& e) {
    EXPECT_EQ(e.context().file, file) << e.what();
    EXPECT_EQ(e.context().field, field) << e.what();
  }
}

TEST(Preflight, ShardsHeadsFfnAndVocab) {
  const TpPlan p = preflight(qwen3_0p6b(8, 4));
  EXPECT_EQ(p.heads_per_rank, 4);
  EXPECT_EQ(p.kv_heads_per_rank, 2);
  EXPECT_EQ(p.kv_replication, 1);
  EXPECT_EQ(p.ffn_per_rank, 768);
  EXPECT_EQ(p.padded_vocab, 151936);
  EXPECT_EQ(p.vocab_per_rank, 37984);
  EXPECT_TRUE(p.notes.empty());
}

TEST(Preflight, ReplicatesKvHeadsAndPadsTheVocabWithANote) {
  PreflightInput in = qwen3_0p6b(16, 16);
  in.vocab_size = 151669;  // not a multiple of 16
  const TpPlan p = preflight(in);
  EXPECT_EQ(p.heads_per_rank, 1);
  EXPECT_EQ(p.kv_replication, 2);  // 8 KV heads over 16 ranks
  EXPECT_EQ(p.kv_heads_per_rank, 1);
  EXPECT_EQ(p.padded_vocab, 151680);
  EXPECT_EQ(p.padded_vocab % 16, 0);
  EXPECT_EQ(p.vocab_per_rank * 16, p.padded_vocab);
  ASSERT_EQ(p.notes.size(), 2u);
  EXPECT_NE(p.notes[0].find("replicated on 2 ranks"), std::string::npos);
  EXPECT_NE(p.notes[1].find("padded to 151680"), std::string::npos);
}

TEST(Preflight, RefusesWhatCannotBeShardedNamingTheField) {
  expect_error(qwen3_0p6b(6, 4), "configs/opd/x.ini", "parallel.tp");  // 4 does not divide 6
  PreflightInput in = qwen3_0p6b(3, 3);                                // 16 heads over 3 ranks
  expect_error(in, "model.h5", "num_attention_heads");
  in = qwen3_0p6b(4, 4);
  in.num_kv_heads = 3;
  in.num_heads = 12;
  expect_error(in, "model.h5", "num_key_value_heads");  // 3 KV heads, tp 4: neither divides
  in = qwen3_0p6b(4, 4);
  in.intermediate_size = 3070;
  expect_error(in, "model.h5", "intermediate_size");
}

TEST(Preflight, DeterministicShardsCutEveryDimensionAndPadTheVocabToThem) {
  PreflightInput in = qwen3_0p6b(4, 2);
  in.vocab_size = 151669;
  in.deterministic_shards = 8;  // 8 virtual shards on a TP group of 2: 4 pieces per rank
  const TpPlan p = preflight(in);
  EXPECT_EQ(p.pieces, 4);
  EXPECT_EQ(p.padded_vocab, 151672);  // a multiple of 8, not just of tp = 2
  EXPECT_EQ(p.vocab_per_rank, 151672 / 2);
  EXPECT_EQ(p.vocab_per_rank % p.pieces, 0);
  in.deterministic_shards = 0;
  EXPECT_EQ(preflight(in).pieces, 0);
  EXPECT_EQ(preflight(in).padded_vocab, 151670);  // off: padded for tp only
  in.deterministic_shards = 3;  // not a multiple of tp
  expect_error(in, "configs/opd/x.ini", "parallel.deterministic_shards");
  in.deterministic_shards = 16;  // 16 heads, 8 KV heads: the KV heads do not cut into 16
  expect_error(in, "configs/opd/x.ini", "parallel.deterministic_shards");
  in.deterministic_shards = -2;
  expect_error(in, "configs/opd/x.ini", "parallel.deterministic_shards");
}

TEST(Preflight, RefusesAWorldThatDisagreesWithSlurmNtasks) {
  PreflightInput in = qwen3_0p6b(1, 1);
  in.slurm_ntasks = 4;  // srun without --mpi=pmix: four singleton worlds of one rank each
  expect_error(in, "environment", "SLURM_NTASKS");
  try {
    preflight(in);
  } catch (const opdlm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("singleton"), std::string::npos) << e.what();
  }
  in.check_slurm_ntasks = false;  // opted out
  EXPECT_NO_THROW(preflight(in));
  in = qwen3_0p6b(4, 2);
  in.slurm_ntasks = 4;
  EXPECT_NO_THROW(preflight(in));
  in.slurm_ntasks = 8;
  expect_error(in, "environment", "SLURM_NTASKS");
}

// ---- flight recorder -------------------------------------------------------------------------------------

TEST(FlightRecorder, KeepsTheNewestCallsAndMarksTheOneInFlight) {
  FlightRecorder rec(3);
  const auto a = rec.start("tp", 0, CollectiveOp::all_reduce, 64);
  rec.finish(a);
  const auto b = rec.start("dp", 0, CollectiveOp::reduce_scatter, 128);
  rec.finish(b);
  const auto c = rec.start("tp", 1, CollectiveOp::all_gather, 32);
  rec.finish(c);
  const auto d = rec.start("world", 0, CollectiveOp::barrier, 0);  // never finished: the hang
  rec.finish(a);  // a stale token (overwritten) changes nothing
  const auto snap = rec.snapshot();
  ASSERT_EQ(snap.size(), 3u);
  EXPECT_EQ(rec.total(), 4u);
  EXPECT_EQ(snap[0].comm, "dp");
  EXPECT_EQ(snap[0].op, CollectiveOp::reduce_scatter);
  EXPECT_EQ(snap[0].bytes, 128u);
  EXPECT_EQ(snap[1].comm, "tp");
  EXPECT_EQ(snap[1].seq, 1u);
  EXPECT_GE(snap[1].end_s, snap[1].start_s);
  EXPECT_EQ(snap[2].op, CollectiveOp::barrier);
  EXPECT_LT(snap[2].end_s, 0);
  (void)d;
  std::ostringstream os;
  rec.dump(os);
  const std::string text = os.str();
  EXPECT_NE(text.find("0 world barrier 0"), std::string::npos) << text;
  EXPECT_NE(text.find("IN-FLIGHT"), std::string::npos) << text;
  EXPECT_EQ(text.find("all_reduce"), std::string::npos) << "the oldest call should have left the ring:\n" << text;
}

}  // namespace

// ---- the DP split of an update's rows (train/opd_trainer.hpp) ----

TEST(VirtualShardSum, OneRankHoldingEveryPieceSumsThemByTheFixedTree) {
  LocalCommunicator one;
  // Values whose sum depends on the order: the tree ((a + b) + (c + d)) is not the left fold.
  // 4 pieces of 2 values; element 0 over the pieces is 1e8, 1, -1e8, 1.
  const std::vector<float> parts = {1e8f, 3.0f, 1.0f, 2.0f, -1e8f, 0.5f, 1.0f, -7.0f};
  std::vector<float> out(2), want(2);
  virtual_shard_sum(one, 4, std::span<const float>(parts), std::span<float>(out));
  tree_combine_into(parts.data(), 4, 2, want.data());
  EXPECT_EQ(out, want);
  EXPECT_EQ(out[0], 0.0f);  // (1e8 + 1) + (-1e8 + 1): each 1 is lost to rounding
  EXPECT_EQ(out[1], (3.0f + 2.0f) + (0.5f + -7.0f));
  float fold = 0;
  for (int j = 0; j < 4; ++j) fold += parts[size_t(2 * j)];
  EXPECT_NE(fold, out[0]) << "this case must separate the tree from a left fold";
  EXPECT_ERROR_HAS(virtual_shard_sum(one, 3, std::span<const float>(parts), std::span<float>(out)), "pieces");
}

TEST(DpRowsPerRank, PowersOfTwoDividingTheTreeWidthAreAcceptedAndTheRestRefused) {
  EXPECT_EQ(opdlm::train::dp_rows_per_rank(1, 8, "x.ini"), 8);
  EXPECT_EQ(opdlm::train::dp_rows_per_rank(2, 8, "x.ini"), 4);
  EXPECT_EQ(opdlm::train::dp_rows_per_rank(8, 8, "x.ini"), 1);
  EXPECT_EQ(opdlm::train::dp_rows_per_rank(4, 3, "x.ini"), 1);  // width 4: one slot each, the last absent
  EXPECT_EQ(opdlm::train::dp_rows_per_rank(2, 5, "x.ini"), 4);  // width 8
  EXPECT_ERROR_HAS(opdlm::train::dp_rows_per_rank(3, 8, "x.ini"), "x.ini", "parallel.tp", "power of two");
  EXPECT_ERROR_HAS(opdlm::train::dp_rows_per_rank(16, 8, "x.ini"), "dividing 8", "data.rows_per_update");
  EXPECT_ERROR_HAS(opdlm::train::dp_rows_per_rank(6, 8, "x.ini"), "parallel.tp");
}

TEST(LocalCommunicator, OneRankCopiesAndMoreRanksRefuseCollectives) {
  opdlm::parallel::LocalCommunicator one;
  std::vector<float> in = {1.f, 2.f}, out(2);
  one.all_gather(std::span<const float>(in), std::span<float>(out));
  EXPECT_EQ(out, in);
  std::vector<double> d = {3.0};
  one.all_reduce(std::span<double>(d));
  EXPECT_EQ(d[0], 3.0);
  opdlm::parallel::LocalCommunicator shard(1, 4);
  EXPECT_EQ(shard.rank(), 1);
  EXPECT_ERROR_HAS(shard.all_reduce(std::span<double>(d)), "size 4", "all_reduce");
  EXPECT_THROW(opdlm::parallel::LocalCommunicator(4, 4), opdlm::Error);
}
