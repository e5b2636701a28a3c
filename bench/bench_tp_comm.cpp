// bench_tp_comm: the tensor-parallel traffic of one training step of the student (forward with saved
// activations, the vocab-parallel forward-KL loss and its gradient, backward) at TP 1, 2 and 4, in the
// default mode and in the deterministic-reduction mode (4 virtual shards). Per layout: seconds per
// step with the ratio to the default TP 1 step measured in the same run, and the TP calls and bytes
// the flight recorder saw against the analytic count (bytes per collective times the calls: every
// sum of the model and of the loss written out below). Model: 4 layers, hidden 256, FFN 768, 8 heads,
// 4 KV heads, vocabulary 2002 (padded for the shards); a step of 8 x 48 tokens with 192 logit rows.
// Run: mpiexec -n 4 --allow-run-as-root --oversubscribe --bind-to none env OMP_NUM_THREADS=1 \
//        build/bench/opdlm_bench_tp_comm [steps]
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/model/tp_layout.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/vocab_parallel.hpp"

using namespace opdlm;
using namespace opdlm::parallel;

namespace {

// ---- the analytic count -------------------------------------------------------------------------------

struct Traffic {
  uint64_t calls = 0, bytes = 0;
};

// One sum of `len` elements of `elem` bytes over a group of `tp` ranks, as the recorder counts it:
// all_reduce_tree = reduce_scatter (the padded buffer) + all_gather (one chunk), nothing on one rank;
// the deterministic mode's virtual_shard_sum = one all_gather of this rank's `pieces` partials.
void add_sum(Traffic& t, uint64_t len, uint64_t elem, int tp, int pieces) {
  if (pieces > 0) {
    t.calls += 1, t.bytes += uint64_t(pieces) * len * elem;
  } else if (tp > 1) {
    const uint64_t chunk = (len + uint64_t(tp) - 1) / uint64_t(tp);
    t.calls += 2, t.bytes += chunk * uint64_t(tp) * elem + chunk * elem;
  }
}

// One training step: n token rows, r logit rows.
Traffic analytic_step(const model::Qwen3Config& c, uint64_t n, uint64_t r, int tp, int pieces) {
  Traffic t;
  const uint64_t H = uint64_t(c.hidden_size), hd = uint64_t(c.head_dim), L = uint64_t(c.num_hidden_layers);
  add_sum(t, n * H, 4, tp, 0);  // the vocab-parallel embedding: exact (one row is non-zero), a tree sum in every mode
  for (uint64_t l = 0; l < L; ++l) add_sum(t, n * H, 4, tp, pieces), add_sum(t, n * H, 4, tp, pieces);  // o, down
  // vp_divergence_forward: row max (MPI max of r doubles), then z and s (2r), then D (r); backward: G (r).
  t.calls += 1, t.bytes += r * 8;
  add_sum(t, 2 * r, 8, tp, pieces);
  add_sum(t, r, 8, tp, pieces);
  add_sum(t, r, 8, tp, pieces);
  add_sum(t, r * H, 4, tp, pieces);  // the LM head's input gradient
  for (uint64_t l = 0; l < L; ++l) {
    add_sum(t, n * H, 4, tp, pieces);  // gate/up input gradient
    add_sum(t, hd, 4, tp, pieces);     // q-norm gain
    add_sum(t, hd, 4, tp, pieces);     // k-norm gain
    add_sum(t, n * H, 4, tp, pieces);  // q/k/v input gradient
  }
  return t;
}

struct Row {
  const char* mode;
  int tp;
  double s_per_step;
  Traffic measured, analytic;
};

}  // namespace

int main(int argc, char** argv) {
  auto world = bench::start_mpi_bench();
  const int n = world->size(), me = world->rank();
  const int steps = argc > 1 ? std::atoi(argv[1]) : 5;

  model::Qwen3Config c;
  c.vocab_size = 2002;
  c.hidden_size = 256;
  c.intermediate_size = 768;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 32;
  c.tie_word_embeddings = false;
  c.max_position_embeddings = 256;
  model::Qwen3Weights full(c);
  full.init_random(3, 0.05);
  const int64_t B = 8, T = 48, R = 192;
  std::vector<int32_t> ids(static_cast<size_t>(B * T)), pos(static_cast<size_t>(B * T)), rows(static_cast<size_t>(R));
  std::mt19937 rng(5);  // the same data on every rank
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
  for (int64_t i = 0; i < B * T; ++i) ids[size_t(i)] = tok(rng), pos[size_t(i)] = int32_t(i % T);
  for (int64_t i = 0; i < R; ++i) rows[size_t(i)] = int32_t(2 * i);
  const Tensor tid = Tensor::from_vector(ids, {B, T}), tpos = Tensor::from_vector(pos, {B, T});
  const Tensor trows = Tensor::from_vector(rows, {R});
  const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
  std::vector<float> teacher(size_t(R * c.vocab_size));
  std::uniform_real_distribution<float> logit(-4.0f, 4.0f);
  for (float& x : teacher) x = logit(rng);
  const Tensor teacher_logits = Tensor::from_vector(teacher, {R, c.vocab_size});
  ops::DivergenceSpec spec;
  spec.kind = ops::Divergence::forward_kl;

  std::vector<Row> out;
  for (int pieces_total : {0, 4})
    for (int tp = 1; tp <= std::min(n, 4); tp *= 2) {
      const bool active = me < tp;
      auto group = world->split(active ? 0 : 1 + me, me, "tp");
      if (active) {
        LocalCommunicator one;
        Communicator& g = tp == 1 ? static_cast<Communicator&>(one) : *group;
        const TpPlan plan = model::tp_plan(c, tp, pieces_total);
        const model::VocabRange vr = model::vocab_range(c, plan, g.rank());
        model::Qwen3Model m(model::shard_weights(full, plan, g.rank()), true, {&g, c, vr.begin, vr.real, plan.pieces});
        const VocabSlice slice = m.vocab_slice();
        const Tensor tlogp = vp_log_softmax(teacher_logits.columns(vr.begin, vr.begin + vr.real), g, slice);
        model::Qwen3Activations acts;
        auto step = [&] {
          m.zero_grads();
          const Tensor logits = m.forward(tid, tpos, std::span(&causal, 1), trows, &acts);
          Tensor lse;
          const Tensor D = vp_divergence_forward(tlogp, logits, spec, &lse, g, slice);
          const Tensor dloss = Tensor::full({R}, 1.0 / double(R), logits.dtype());
          m.backward(acts, vp_divergence_backward(tlogp, logits, lse, dloss, spec, g, slice));
          (void)D;
        };
        step();  // warm-up
        g.barrier();
        flight_recorder().reset(size_t{1} << 16);
        const auto t0 = std::chrono::steady_clock::now();
        for (int s = 0; s < steps; ++s) step();
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        Row row{pieces_total ? "deterministic 4" : "default", tp, secs / steps, {}, {}};
        for (const auto& rec : flight_recorder().snapshot())
          if (rec.comm == g.name() && rec.op != CollectiveOp::barrier) row.measured.calls += 1, row.measured.bytes += rec.bytes;
        row.measured.calls /= uint64_t(steps), row.measured.bytes /= uint64_t(steps);
        row.analytic = analytic_step(c, uint64_t(B * T), uint64_t(R), tp, plan.pieces);
        if (me == 0) out.push_back(row);
      }
      bench::sleepy_barrier();
    }
  if (me == 0) {
    std::printf("One student training step (8 x 48 tokens, 192 logit rows, forward KL; 4 layers, hidden 256, "
                "vocabulary 2002), %d steps per layout, world of %d ranks\n", steps, n);
    std::printf("%-16s %3s %10s %8s %10s %10s %12s %12s %7s\n", "mode", "tp", "s/step", "vs tp1", "TP calls",
                "analytic", "TP bytes", "analytic", "ratio");
    double base = 0;
    for (const auto& r : out) {
      if (r.tp == 1 && std::string(r.mode) == "default") base = r.s_per_step;
      std::printf("%-16s %3d %10.4f %8.2f %10llu %10llu %12llu %12llu %7.3f\n", r.mode, r.tp, r.s_per_step,
                  r.s_per_step / base, (unsigned long long)r.measured.calls, (unsigned long long)r.analytic.calls,
                  (unsigned long long)r.measured.bytes, (unsigned long long)r.analytic.bytes,
                  r.analytic.bytes ? double(r.measured.bytes) / double(r.analytic.bytes) : 1.0);
    }
  }
  return 0;
}
