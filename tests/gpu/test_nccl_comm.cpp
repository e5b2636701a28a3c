// NcclCommunicator on one GPU (single(): a one-rank group): every collective on device buffers is the
// identity or a copy and the flight recorder counts each call; and the deterministic reduce-scatter's
// tree_combine kernel is bit for bit tree_combine_into for 1..9 parts of odd length.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../../src/parallel/cuda/tree_combine.hpp"
#include "gpu_test_util.hpp"
#include "opdlm/parallel/nccl_communicator.hpp"
#include "opdlm/parallel/tree_sum.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using parallel::CollectiveOp;
using parallel::ElemType;
using parallel::FlightRecorder;
using parallel::NcclCommunicator;
using parallel::ReduceOp;

template <class T>
DeviceBuffer to_device(const std::vector<T>& v) {
  DeviceBuffer b(v.size() * sizeof(T));
  if (!v.empty()) CUDA_CHECK(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return b;
}

template <class T>
std::vector<T> to_host(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  CUDA_CHECK(cudaDeviceSynchronize());
  if (n) CUDA_CHECK(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

template <class T>
std::vector<T> ramp(size_t n, double scale) {
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = T(std::sin(double(i) * 0.37) * scale);
  return v;
}

// ---- collectives on a one-rank group ------------------------------------------------------------------

void run_all_collectives(NcclCommunicator& c, cudaStream_t stream, bool synchronize) {
  const size_t n = 1001;
  auto sync = [&] {
    if (!synchronize) CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  const auto f = ramp<float>(n, 3.0);
  const auto d = ramp<double>(n, 1e10);
  std::vector<int64_t> ii(n);
  for (size_t i = 0; i < n; ++i) ii[i] = int64_t(i) * 1000003 - 7;
  std::vector<uint8_t> u(n);
  for (size_t i = 0; i < n; ++i) u[i] = uint8_t(i * 31);

  DeviceBuffer df = to_device(f), dd = to_device(d), di = to_device(ii), du = to_device(u);
  c.all_reduce(std::span<float>(df.as<float>(), n));
  c.all_reduce(std::span<float>(df.as<float>(), n), ReduceOp::max);
  c.all_reduce(std::span<double>(dd.as<double>(), n));
  c.all_reduce(std::span<int64_t>(di.as<int64_t>(), n), ReduceOp::max);
  sync();
  EXPECT_EQ(to_host<float>(df, n), f);
  EXPECT_EQ(to_host<double>(dd, n), d);
  EXPECT_EQ(to_host<int64_t>(di, n), ii);

  DeviceBuffer of(n * sizeof(float)), od(n * sizeof(double)), oi(n * sizeof(int64_t));
  c.reduce_scatter(std::span<const float>(df.as<float>(), n), std::span<float>(of.as<float>(), n));
  c.reduce_scatter(std::span<const double>(dd.as<double>(), n), std::span<double>(od.as<double>(), n));
  sync();
  EXPECT_EQ(to_host<float>(of, n), f);
  EXPECT_EQ(to_host<double>(od, n), d);

  of.zero(), od.zero();
  c.all_gather(std::span<const float>(df.as<float>(), n), std::span<float>(of.as<float>(), n));
  c.all_gather(std::span<const double>(dd.as<double>(), n), std::span<double>(od.as<double>(), n));
  c.all_gather(std::span<const int64_t>(di.as<int64_t>(), n), std::span<int64_t>(oi.as<int64_t>(), n));
  sync();
  EXPECT_EQ(to_host<float>(of, n), f);
  EXPECT_EQ(to_host<double>(od, n), d);
  EXPECT_EQ(to_host<int64_t>(oi, n), ii);

  c.broadcast(std::span<float>(df.as<float>(), n), 0);
  c.broadcast(std::span<double>(dd.as<double>(), n), 0);
  c.broadcast(std::span<int64_t>(di.as<int64_t>(), n), 0);
  c.broadcast(std::span<uint8_t>(du.as<uint8_t>(), n), 0);
  sync();
  EXPECT_EQ(to_host<float>(df, n), f);
  EXPECT_EQ(to_host<uint8_t>(du, n), u);

  c.barrier();
  c.all_reduce_tree(std::span<float>(df.as<float>(), n));  // one rank: the identity, no collective
  EXPECT_EQ(to_host<float>(df, n), f);
}

TEST(NcclComm, SingleRankCollectivesAreIdentityAndRecorded) {
  FlightRecorder rec(64);
  auto c = NcclCommunicator::single("tp", rec, nullptr);
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  run_all_collectives(*c, nullptr, true);
  // 4 all_reduce, 2 reduce_scatter, 3 all_gather, 4 broadcast, 1 barrier; all_reduce_tree on one rank
  // issues nothing.
  const auto recs = rec.snapshot();
  ASSERT_EQ(recs.size(), 14u);
  EXPECT_EQ(rec.total(), 14u);
  EXPECT_EQ(c->calls(), 14u);
  EXPECT_EQ(recs[0].op, CollectiveOp::all_reduce);
  EXPECT_EQ(recs[0].comm, "tp");
  EXPECT_EQ(recs[0].bytes, 1001 * sizeof(float));
  EXPECT_EQ(recs[4].op, CollectiveOp::reduce_scatter);
  EXPECT_EQ(recs[6].op, CollectiveOp::all_gather);
  EXPECT_EQ(recs[9].op, CollectiveOp::broadcast);
  EXPECT_EQ(recs[13].op, CollectiveOp::barrier);
  for (size_t i = 0; i < recs.size(); ++i) {
    EXPECT_EQ(recs[i].seq, i);
    EXPECT_GE(recs[i].end_s, recs[i].start_s) << "call " << i << " finished";
  }
  EXPECT_FALSE(rec.oldest_in_flight().has_value());
  // A root outside the group is refused.
  DeviceBuffer one(sizeof(float));
  EXPECT_THROW(c->broadcast(std::span<float>(one.as<float>(), 1), 1), Error);
}

TEST(NcclComm, SingleRankOnAStreamWithoutSynchronize) {
  FlightRecorder rec(64);
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreate(&s));
  {
    auto c = NcclCommunicator::single("dp", rec, s, false);
    EXPECT_EQ(c->stream(), s);
    run_all_collectives(*c, s, false);
  }
  CUDA_CHECK(cudaStreamDestroy(s));
}

// ---- the tree_combine kernel ----------------------------------------------------------------------------

// Parts whose sums depend on the order: magnitudes spread over many binades, signed zeros and ties.
template <class T>
std::vector<T> hard_parts(size_t n, size_t len, uint32_t seed) {
  Tensor r = test::random_tensor({int64_t(n * len)}, seed, -1.0, 1.0, DType::f64);
  const double* x = r.data<double>();
  std::vector<T> v(n * len);
  for (size_t i = 0; i < v.size(); ++i) {
    const double e = std::floor((x[i] + 1.0) * 20.0) - 20.0;  // exponents -20 .. 20
    v[i] = T(x[i] * std::ldexp(1.0, int(e)));
    if (i % 97 == 0) v[i] = T(-0.0);
    if (i % 89 == 0) v[i] = T(1.0);
  }
  return v;
}

template <class T>
void check_tree_combine(ElemType type) {
  for (size_t n = 1; n <= 9; ++n) {
    const size_t len = 1001 + 2 * n;  // odd, not a multiple of the block
    const auto parts = hard_parts<T>(n, len, uint32_t(300 + n));
    std::vector<T> want(len);
    parallel::tree_combine_into(parts.data(), n, len, want.data());
    DeviceBuffer dp = to_device(parts), dout(len * sizeof(T));
    parallel::cuda::tree_combine_device(dp.get(), n, len, dout.get(), type, nullptr);
    CUDA_CHECK(cudaGetLastError());
    const auto got = to_host<T>(dout, len);
    size_t diff = 0, first = len;
    for (size_t k = 0; k < len; ++k)
      if (std::memcmp(&got[k], &want[k], sizeof(T)) != 0) {
        ++diff;
        if (first == len) first = k;
      }
    EXPECT_EQ(diff, 0u) << n << " parts of " << len << ": " << diff << " elements differ, first at " << first
                        << " (got " << got[first < len ? first : 0] << ", want " << want[first < len ? first : 0]
                        << ")";
  }
}

TEST(NcclComm, TreeCombineKernelMatchesHostBitForBit) {
  check_tree_combine<float>(ElemType::f32);
  check_tree_combine<double>(ElemType::f64);
  // len 0 is a no-op; no parts and other types are errors.
  parallel::cuda::tree_combine_device(nullptr, 3, 0, nullptr, ElemType::f32, nullptr);
  EXPECT_THROW(parallel::cuda::tree_combine_device(nullptr, 0, 5, nullptr, ElemType::f32, nullptr), Error);
  EXPECT_THROW(parallel::cuda::tree_combine_device(nullptr, 2, 5, nullptr, ElemType::i64, nullptr), Error);
}

}  // namespace
}  // namespace opdlm
