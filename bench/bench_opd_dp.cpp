// bench_opd_dp: the whole conversion step (`run_opd_training`: rollouts, rows, teacher, backward,
// ZeRO-1 AdamW) on every (TP, DP) grid that fits one mpiexec world (TP <= the model's 2 KV heads),
// on the quickstart model shape (853k parameters, random weights). Per layout: seconds per RL step
// with the ratio to 1 x 1 from the same run, the DP collectives the flight recorder saw checked
// against the call sequence the trainer must issue (2 rollout all-gathers per RL step; per optimizer
// step 1 stats all-reduce + the 3 ZeRO-1 calls) and their gradient-path bytes against the analytic
// count; the rollout bytes (data-dependent) and the TP calls and bytes as measured.
// Run: mpiexec -n 4 --allow-run-as-root --oversubscribe --bind-to none build/bench/opdlm_bench_opd_dp [rl_steps]
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/io/bpe_trainer.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/model/tp_layout.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "opdlm/train/opd_trainer.hpp"

using namespace opdlm;
using namespace opdlm::parallel;
namespace fs = std::filesystem;

namespace {

struct Row {
  int tp, dp;
  double s_per_step;
  int64_t steps, updates, rows;
  uint64_t calls, expected_calls, grad_bytes, grad_analytic, rollout_bytes;
  uint64_t tp_calls = 0, tp_bytes = 0;
};

}  // namespace

int main(int argc, char** argv) {
  auto world = bench::start_mpi_bench();
  const int n = world->size(), me = world->rank();
  const int64_t rl_steps = argc > 1 ? std::atoll(argv[1]) : 4;

  // ---- the setup: byte tokenizer, random quickstart-shaped teacher, arithmetic prompts ----
  const std::string dir = "/tmp/opdlm_bench_opd_dp";
  if (me == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    io::BpeTrainerOptions bo;
    bo.vocab_size = 260;
    bo.min_frequency = 1000000;
    io::BpeTrainer bt(bo);
    bt.add_text("0123456789+-*=");
    const io::Tokenizer tok = bt.train();
    tok.save(dir + "/tokenizer.json");
    model::Qwen3Config c;
    c.vocab_size = 512;
    c.hidden_size = 128;
    c.intermediate_size = 384;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 32;
    c.tie_word_embeddings = true;
    c.max_position_embeddings = 256;
    c.eos_token_id = tok.token_id("<|endoftext|>").value();
    c.pad_token_id = c.eos_token_id;
    c.mask_token_id = tok.token_id("<|MASK|>").value();
    model::Qwen3Weights w(c);
    w.init_random(3, 0.05);
    io::save_model(dir + "/teacher.h5", w);
    std::ofstream p(dir + "/prompts.jsonl");
    for (int i = 0; i < 256; ++i)
      p << nlohmann::json{{"id", i}, {"prompt", std::to_string(i % 97) + "+" + std::to_string(i % 31) + "="}}.dump() << "\n";
  }
  world->barrier();

  train::OpdTrainOptions o;
  o.teacher = dir + "/teacher.h5";
  o.tokenizer = dir + "/tokenizer.json";
  o.prompts = dir + "/prompts.jsonl";
  o.prompts_per_step = 16;
  o.rows_per_update = 8;
  o.sampler.block_size = 4;
  o.sampler.steps_per_block = 4;
  o.sampler.strategy = diffusion::Strategy::low_confidence_static;
  o.sampler.max_new_tokens = 12;
  o.rl_steps = rl_steps;
  o.schedule = {3e-4, 1, 100, 0.1};
  o.seed = 11;

  std::vector<Row> rows;
  const model::Qwen3Config full = io::read_model_info(o.teacher).config;
  for (int tp = 1; tp <= std::min<int>(n, int(full.num_key_value_heads)); tp *= 2)
    for (int dp = 1; tp * dp <= n; dp *= 2) {
      const bool active = me < tp * dp;
      // TP fastest (grid_coord): TP groups of consecutive ranks, DP groups strided.
      auto tpc = world->split(active ? me / tp : n + me, me, "tp");
      auto group = world->split(active ? me % tp : n + me, me, "dp");
      if (active) {
        o.out_dir = dir + "/tp" + std::to_string(tp) + "_dp" + std::to_string(dp);
        group->barrier();
        tpc->barrier();
        flight_recorder().reset(size_t{1} << 18);  // the whole run: TP layouts make tens of thousands of calls
        const uint64_t before = flight_recorder().total();
        const auto t0 = std::chrono::steady_clock::now();
        const auto s = train::run_opd_training(o, "bench", {group.get(), me == 0, tpc.get()});
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const auto recs = flight_recorder().snapshot();
        const uint64_t calls = flight_recorder().total() - before;
        if (calls > recs.size()) std::fprintf(stderr, "bench_opd_dp: the flight recorder overflowed\n");
        // The analytic DP gradient path per optimizer step (bench_comm): reduce-scatter input dp * P
        // floats, the norm all-gather of U doubles, the parameter all-gather of P floats (P, U of this
        // TP rank's shard); plus the stats all-reduce of 4 doubles per row.
        model::Qwen3Weights shape(tp == 1 ? full : model::shard_config(full, model::tp_plan(full, tp)));
        std::vector<Tensor*> pp;
        std::vector<bool> nd;
        for (auto& t : shape.tensors()) pp.push_back(&t.value), nd.push_back(t.value.ndim() < 2);
        ShardedAdamW layout(pp, nd, *group);
        size_t U = 0;
        for (int r = 0; r < dp; ++r) U = std::max(U, layout.first_unit(r + 1) - layout.first_unit(r));
        const uint64_t P = uint64_t(layout.padded_shard());
        const uint64_t zero1 = uint64_t(dp) * P * 4 + U * 8 + P * 4;
        Row row{tp, dp, secs / double(s.rl_steps), s.rl_steps, s.optimizer_steps, s.budget.rows, 0,
                uint64_t(2 * s.rl_steps + 4 * s.optimizer_steps), 0,
                uint64_t(s.optimizer_steps) * zero1 + uint64_t(32 * s.budget.rows), 0};
        // The DP calls in the order the trainer issues them; the TP calls (activations, input
        // gradients, vocab-parallel losses and draws, the norm, the model gather) counted apart.
        std::vector<CollectiveRecord> dps;
        for (size_t i = recs.size() - calls; i < recs.size(); ++i) {
          if (recs[i].comm == "tp") row.tp_calls += 1, row.tp_bytes += recs[i].bytes;
          else if (recs[i].comm == "dp") dps.push_back(recs[i]);
        }
        row.calls = dps.size();
        for (size_t i = 0; i < dps.size(); ++i) {
          const auto& r = dps[i];
          if (r.op == CollectiveOp::all_gather && i + 1 < dps.size() && dps[i + 1].op == CollectiveOp::all_gather &&
              r.bytes == 8)
            row.rollout_bytes += r.bytes + dps[i + 1].bytes, ++i;  // the count, then the packed rollouts
          else
            row.grad_bytes += r.bytes;
        }
        if (me == 0) rows.push_back(row);
      }
      bench::sleepy_barrier();
    }
  if (me == 0) {
    std::printf("OPD step (quickstart shape, random weights, %lld RL steps, 16 prompts, 8 rows/update) on (TP, DP) "
                "grids carved from %d ranks\n", (long long)rl_steps, n);
    std::printf("%3s %3s %10s %7s %8s %6s %13s %15s %15s %6s %10s %9s %12s\n", "tp", "dp", "s/RL step", "vs 1x1",
                "updates", "rows", "DP calls(exp)", "DP grad B rec", "DP grad B anal", "ratio", "rollout B", "TP calls",
                "TP B");
    double base = 0;
    for (const auto& r : rows) {
      if (r.tp == 1 && r.dp == 1) base = r.s_per_step;
      std::printf("%3d %3d %10.3f %7.2f %8lld %6lld %6llu (%4llu) %15llu %15llu %6.3f %10llu %9llu %12llu\n", r.tp, r.dp,
                  r.s_per_step, r.s_per_step / base, (long long)r.updates, (long long)r.rows,
                  (unsigned long long)r.calls, (unsigned long long)r.expected_calls, (unsigned long long)r.grad_bytes,
                  (unsigned long long)r.grad_analytic, double(r.grad_bytes) / double(r.grad_analytic),
                  (unsigned long long)r.rollout_bytes, (unsigned long long)r.tp_calls, (unsigned long long)r.tp_bytes);
    }
    fs::remove_all(dir);
  }
  return 0;
}
