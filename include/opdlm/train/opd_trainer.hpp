// AR-to-DLM conversion (`opdlm train --mode opd | rm-kl | rm-ce`): the RL-step loop of algorithm.md
// B 2 with opdlm's choices (A): roll out with the current student, build training rows (on-policy
// states or random-mask states), score them with the frozen teacher, minimise the row losses with
// AdamW; budget counters (A 7) and an optional state-KL probe logged as JSONL metrics.
#pragma once

#include <boost/program_options/options_description.hpp>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "opdlm/base/config.hpp"
#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/train/lr_schedule.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "opdlm/train/spike_detector.hpp"

namespace opdlm::train {

enum class ConversionMode : uint8_t {
  opd,    // on-policy states (the student's own step map), teacher KL
  rm_kl,  // random-mask states on the same on-policy rollouts, teacher KL (reference random_mask)
  rm_ce,  // random-mask states, 1/t-weighted cross-entropy on a clean response (SDAR/BD3LM/dllm)
};
const char* conversion_mode_name(ConversionMode m);  // "opd", "rm-kl", "rm-ce"
ConversionMode parse_conversion_mode(const std::string& s, const std::string& where = "command line");

enum class StateSelection : uint8_t { one_per_block, all_rounds };
// Where rm-ce's clean responses come from: the JSONL `response` (ground truth, SDAR-style SFT), the
// student's rollouts, or the teacher's own temperature-1 samples (sequence-level KD).
enum class CeSource : uint8_t { gold, rollout, teacher };

// The maximum rollout length at RL step i (B 3.6 `max_token_schedule`, cosine): start + (max - start)
// * (1 - cos(pi/2 * min(i / ramp_steps, 1))), rounded to the nearest multiple of b, at least b.
// ramp_steps = 0: always max_new.
int64_t max_rollout_length(int64_t step, int64_t start, int64_t max_new, int64_t ramp_steps, int64_t b);

// data.prompts split at commas, each name trimmed of spaces ("a.jsonl, b.jsonl" -> {a, b}); empty
// names are kept so the caller can reject them.
std::vector<std::string> prompt_files(const std::string& list);

struct OpdTrainOptions {
  ConversionMode mode = ConversionMode::opd;
  // [model]
  std::string teacher;       // frozen teacher model.h5 (required for opd / rm-kl and rm-ce source=teacher)
  std::string student_init;  // empty: a copy of the teacher (the A2D init)
  std::string tokenizer;     // tokenizer.json of the prompts
  // [data]
  std::string prompts;           // conversion prompts JSONL (rm-ce source=gold needs `response`)
  int64_t prompts_per_step = 16;  // rollouts per RL step (B 2: 128)
  int64_t rows_per_update = 8;    // rows per optimizer step (B 6.4: 8)
  int64_t max_prompt_tokens = 0;  // longer prompts are skipped (0: the model context decides)
  // [rollout]
  diffusion::SamplerOptions sampler;  // block size, steps, strategy, tau, sampling; max_new_tokens = final length
  int64_t ramp_start_tokens = 0;      // 0: no ramp
  int64_t ramp_steps = 0;
  // [loss]
  RowLossSpec loss;  // divergence, exclude_eos, ce weighting (ids filled from the model config)
  StateSelection selection = StateSelection::one_per_block;
  CeSource ce_source = CeSource::gold;
  // [optim]
  int64_t rl_steps = 100;
  int64_t max_train_tokens = 0;  // stop once this many training tokens entered a backward (0: off)
  LrSchedule schedule;           // total_steps 0 in the config: rl_steps * ceil(prompts/rows)
  ops::AdamWConfig adam;
  double grad_clip = 1.0;
  // [eval]: the state-KL probe (C3) on held-out prompts decoded by the current student
  std::string probe_prompts;  // JSONL; empty: no probe
  int64_t probe_every = 0;    // RL steps between probes (0: start and end only)
  int64_t probe_limit = 32;
  // [parallel]: the layout (DP = world size / tp); the grid itself is given to run_opd_training
  int tp = 1;
  int64_t deterministic_shards = 0;  // parallel.deterministic_shards (0: off)
  bool check_slurm_ntasks = true;
  std::string parallel_origin;  // where parallel.tp was set (named in layout errors)
  // [run]
  std::string out_dir;
  uint32_t seed = 1234;
  int64_t log_every = 1;
  int64_t save_every = 0;
  std::string resume;            // run.resume: "", "auto" or a checkpoint directory
  // Stop with a checkpoint and the requeue code before this many seconds from the start (0: off), or
  // before SLURM_JOB_END_TIME when run.slurm_end_time is set and the variable is (docs/fault_tolerance.md).
  double time_limit_s = 0;
  std::string on_nonfinite = "abort";  // numerics.on_nonfinite: abort | skip | rollback
  std::string on_spike = "warn";       // numerics.on_spike: warn | skip | rollback | abort
  SpikeRule spike{50, 6.0, 2.0};       // numerics.spike_window / spike_sigma / spike_min_ratio
  int64_t max_rollbacks = 3;
  // [watchdog]: with more than one rank, a collective pending longer than max(floor, factor x the
  // longest step or save) ends the job with exit code 88 and per-rank flight records.
  int64_t sample_rollouts = 2, sample_rollouts_every = 10;  // RUN/rollouts.jsonl
  double peak_flops = 0;  // run.peak_flops: one rank's peak FLOP/s, for the MFU (0: none)
  bool watchdog = true;
  double watchdog_floor_s = 300, watchdog_factor = 10, watchdog_grace_s = 5;
  bool slurm_end_time = true;
  // [checkpoint]: crash-safe checkpoints of the whole state under out_dir/checkpoints (docs/checkpoint.md)
  int64_t checkpoint_every = 0;  // RL steps between checkpoints, and one at the end (0: off)
  int64_t checkpoint_keep = 3;
  // Token milestones (ascending): the first update that brings train_tokens to >= M writes
  // RUN/checkpoints/tokens_<M>.h5, for tokens-to-threshold curves from one run.
  std::vector<int64_t> save_at_tokens;

  // Where each key was set ("default", a config file, "command line"): named by errors during the run.
  std::map<std::string, std::string> origins;
  std::string origin_of(const std::string& key) const {
    auto it = origins.find(key);
    return it == origins.end() ? std::string("config") : it->second;
  }

  static boost::program_options::options_description schema();
  static OpdTrainOptions from_config(const ResolvedConfig& cfg, ConversionMode mode);
};

// Cumulative budget counters (A 7), all logged every RL step.
struct BudgetCounters {
  int64_t rollouts = 0, skipped_prompts = 0;
  int64_t generated_tokens = 0;      // response tokens the student's rollouts produced
  int64_t train_prompt_tokens = 0;   // prompt tokens of samples whose rows entered a backward
  int64_t train_response_tokens = 0; // response tokens of those samples
  int64_t rows = 0, loss_positions = 0;
  double rollout_flops = 0, teacher_flops = 0, student_forward_flops = 0, student_backward_flops = 0;
  int64_t train_tokens() const { return train_prompt_tokens + train_response_tokens; }
};

struct OpdTrainSummary {
  int64_t params = 0, rl_steps = 0, optimizer_steps = 0;
  BudgetCounters budget;
  double wall_s = 0, final_loss = 0;
  double probe_own_kl_first = -1, probe_own_kl_last = -1, probe_random_kl_last = -1;
  std::string model_path;
  // Non-empty when the run stopped early with a checkpoint to be requeued: "signal <n>" or "time limit".
  std::string stopped;
  int64_t skipped_updates = 0;  // updates dropped for a non-finite value or a spike (policy skip)
  int64_t rollbacks = 0;        // roll-backs to the last checkpoint made by this process
};

// Where one rank of a conversion run sits in the process grid: data parallel over `dp`, tensor
// parallel over `tp`.
struct TrainGrid {
  parallel::Communicator* dp = nullptr;  // nullptr: one process (a LocalCommunicator)
  bool writes_outputs = true;            // metrics.jsonl, model.h5 and checkpoints: world rank 0 only
  // The TP group (nullptr or one rank: no tensor parallelism). Its ranks hold Megatron shards of the
  // teacher and the student (model/tp_layout.hpp) and decode and train the same rows together.
  parallel::Communicator* tp = nullptr;
};

// The rows of one optimizer step are the leaves of the canonical pairwise tree (parallel/tree_sum.hpp)
// of width tree_width(rows_per_update); DP rank d computes the aligned block of rows
// [d w, (d + 1) w) with w = width / dp, which this returns. That makes the summed gradient the same
// bits for every DP size. Throws, naming `where` (parallel.tp and data.rows_per_update), unless dp
// is a power of two dividing the width.
int64_t dp_rows_per_rank(int dp, int64_t rows_per_update, const std::string& where);

// The run, on one rank. Prompts are split over DP by global sample id (g % DP), each rank decodes its
// share and the rollouts are all-gathered, so every rank builds the same rows; each rank backprops
// its block of every update's rows into a TreeSum and ShardedAdamW (ZeRO-1) finishes the sum, the
// norm and the update. Loss, parameters and metrics are bitwise the same for every DP size.
OpdTrainSummary run_opd_training(const OpdTrainOptions& opts, const std::string& resolved_table,
                                 const TrainGrid& grid = {});

}  // namespace opdlm::train
