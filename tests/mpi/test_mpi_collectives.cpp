// The MPI backend of Communicator and the ProcessGrid split, run by ctest under
// `mpiexec -n {1,2,4}` and as a singleton without mpiexec: collectives give the analytic results on
// every rank, the TP/DP communicators hold the ranks grid_coord says, and every call is recorded.
#include <gtest/gtest.h>
#include <mpi.h>

#include <numeric>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"

namespace {

using namespace opdlm::parallel;

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
  if (rank != 0) delete ::testing::UnitTest::GetInstance()->listeners().Release(
      ::testing::UnitTest::GetInstance()->listeners().default_result_printer());
  int rc = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);  // a failure on any rank fails the test
  return any;
}
