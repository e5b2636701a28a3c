// bench_comm: the ZeRO-1 optimizer step (ShardedAdamW) on DP groups of 1, 2, 4, ... ranks carved from
// one mpiexec world: median step time with its ratio to DP = 1 measured in the same run, and the
// bytes per step that the flight recorder saw against the analytic count. The rest of the OPD step
// on the grid (rows, rollouts) is issue 5's next part; this is its communication core.
// Run: mpiexec -n 4 --allow-run-as-root --oversubscribe build/bench/opdlm_bench_comm [params ...]
//      (default params: 853376, the quickstart model, and 8000000)
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/zero1.hpp"

using namespace opdlm;
using namespace opdlm::parallel;

namespace {

struct Row {
  int dp;
  int64_t params;
  double median_ms;
  uint64_t recorded_bytes, analytic_bytes, wire_bytes;
};

// Tensors of a transformer-like mix: a few large matrices and many small gains.
std::vector<Tensor> make_params(int64_t n) {
  std::vector<Tensor> out;
  int64_t left = n;
  int k = 0;
  while (left > 0) {
    const int64_t size = (k % 3 == 2) ? std::min<int64_t>(left, 128) : std::min<int64_t>(left, n / 8 + 1);
    out.push_back(Tensor::zeros({size}));
    left -= size;
    ++k;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime::ensure_initialized();
  auto world = MpiCommunicator::world();
  const int n = world->size(), me = world->rank();
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {853376, 8000000};
  std::vector<Row> rows;
  for (int64_t N : sizes) {
    for (int dp = 1; dp <= n; dp *= 2) {
      auto group = world->split(me < dp ? 0 : 1, me, "dp");
      if (me < dp) {
        std::vector<Tensor> p = make_params(N), g;
        std::mt19937 gen(uint32_t(7 + me));
        std::normal_distribution<float> nd(0.f, 0.01f);
        std::vector<Tensor*> pp;
        std::vector<bool> no_decay;
        for (auto& t : p) {
          g.push_back(Tensor::zeros(t.shape()));
          for (int64_t i = 0; i < t.numel(); ++i) g.back().data<float>()[i] = nd(gen);
          pp.push_back(&t);
          no_decay.push_back(t.numel() <= 128);
        }
        std::vector<const Tensor*> gc;
        for (auto& t : g) gc.push_back(&t);
        ShardedAdamW opt(pp, no_decay, *group);
        ops::AdamWConfig cfg;
        cfg.lr = 1e-3;
        opt.step(gc, 1, cfg, 1.0);  // warm-up
        const int steps = 7;
        std::vector<double> ms;
        uint64_t bytes = 0;
        for (int s = 0; s < steps; ++s) {
          group->barrier();
          const uint64_t before = flight_recorder().total();
          const auto t0 = std::chrono::steady_clock::now();
          opt.step(gc, 2 + s, cfg, 1.0);
          ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          const auto recs = flight_recorder().snapshot();
          const uint64_t calls = flight_recorder().total() - before;  // the step's collectives
          for (size_t i = recs.size() - calls; i < recs.size(); ++i) bytes += recs[i].bytes;
        }
        std::sort(ms.begin(), ms.end());
        // Analytic payload per step per rank: reduce-scatter input dp * P floats, the norm
        // all-gather of U doubles, the parameter all-gather of P floats (P = padded shard, U = the
        // most norm chunks on a rank). Wire bytes received per rank: (dp - 1) of each piece.
        size_t U = 0;
        for (int r = 0; r < dp; ++r) U = std::max(U, opt.first_unit(r + 1) - opt.first_unit(r));
        const uint64_t P = uint64_t(opt.padded_shard());
        const uint64_t analytic = uint64_t(dp) * P * 4 + U * 8 + P * 4;
        const uint64_t wire = uint64_t(dp - 1) * (P * 4 + U * 8 + P * 4);
        if (me == 0) rows.push_back({dp, N, ms[ms.size() / 2], bytes / steps, analytic, wire});
      }
      world->barrier();
    }
  }
  if (me == 0) {
    std::printf("ZeRO-1 optimizer step on DP groups carved from %d ranks (rank 0's view)\n", n);
    std::printf("%10s %4s %10s %8s %16s %16s %6s %14s\n", "params", "dp", "step ms", "vs dp1", "recorded B/step",
                "analytic B/step", "ratio", "wire B recv");
    double base = 0;
    for (const auto& r : rows) {
      if (r.dp == 1) base = r.median_ms;
      std::printf("%10lld %4d %10.2f %8.2f %16llu %16llu %6.3f %14llu\n", (long long)r.params, r.dp, r.median_ms,
                  r.median_ms / base, (unsigned long long)r.recorded_bytes, (unsigned long long)r.analytic_bytes,
                  double(r.recorded_bytes) / double(r.analytic_bytes), (unsigned long long)r.wire_bytes);
    }
  }
  return 0;
}
