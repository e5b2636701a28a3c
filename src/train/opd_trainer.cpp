// The conversion loop: rollouts -> training rows -> teacher targets -> row losses -> AdamW, with
// budget counters and the state-KL probe written to RUN/metrics.jsonl; data parallel over a DP group.
#include "opdlm/train/opd_trainer.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>
#include <iomanip>
#include <optional>
#include <sstream>
#include <unistd.h>
#include <thread>
#include <set>

#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/base/stop.hpp"
#include "opdlm/diffusion/rollout_buffer.hpp"
#include "opdlm/diffusion/rollout_exchange.hpp"
#include "opdlm/io/jsonl_dataset.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/io/token_shard.hpp"
#include "opdlm/io/tokenizer.hpp"
#include "opdlm/model/ar_generate.hpp"
#include "opdlm/model/tp_layout.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/parallel/tree_sum.hpp"
#include "opdlm/parallel/watchdog.hpp"
#include "opdlm/parallel/zero1.hpp"
#include "opdlm/io/checkpoint.hpp"
#include "opdlm/io/file_util.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/train/opd_checkpoint.hpp"
#include "opdlm/train/train_common.hpp"

namespace po = boost::program_options;

namespace opdlm::train {

std::vector<std::string> prompt_files(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t comma = list.find(',', start);
    std::string f = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const auto b = f.find_first_not_of(' '), e = f.find_last_not_of(' ');
    out.push_back(b == std::string::npos ? "" : f.substr(b, e - b + 1));
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

const char* conversion_mode_name(ConversionMode m) {
  switch (m) {
    case ConversionMode::opd: return "opd";
    case ConversionMode::rm_kl: return "rm-kl";
    case ConversionMode::rm_ce: return "rm-ce";
  }
  return "?";
}

ConversionMode parse_conversion_mode(const std::string& s, const std::string& where) {
  if (s == "opd") return ConversionMode::opd;
  if (s == "rm-kl") return ConversionMode::rm_kl;
  if (s == "rm-ce") return ConversionMode::rm_ce;
  OPDLM_FAIL_AT(where, "mode", "unknown conversion mode '", s, "' (opd, rm-kl, rm-ce)");
}

int64_t max_rollout_length(int64_t step, int64_t start, int64_t max_new, int64_t ramp_steps, int64_t b) {
  if (ramp_steps <= 0 || start <= 0 || start >= max_new) return max_new;
  const double prog = std::min(1.0, static_cast<double>(step) / static_cast<double>(ramp_steps));
  const double m = static_cast<double>(start) +
                   static_cast<double>(max_new - start) * (1.0 - std::cos(std::numbers::pi / 2 * prog));
  const int64_t r = static_cast<int64_t>(std::llround(m / static_cast<double>(b))) * b;
  return std::clamp<int64_t>(r, b, std::max(b, max_new));
}

po::options_description OpdTrainOptions::schema() {
  po::options_description d("opdlm train --mode opd | rm-kl | rm-ce");
  d.add_options()
      ("model.teacher", po::value<std::string>()->default_value(""), "frozen teacher model.h5")
      ("model.student_init", po::value<std::string>()->default_value(""), "student model.h5 (empty: the teacher's weights)")
      ("model.tokenizer", po::value<std::string>()->default_value(""), "tokenizer.json of the prompts")
      ("data.prompts", po::value<std::string>()->default_value(""),
       "conversion prompts JSONL; a comma-separated list is read as one set, in list order")
      ("data.prompts_per_step", po::value<int64_t>()->default_value(16), "rollouts per RL step")
      ("data.rows_per_update", po::value<int64_t>()->default_value(8), "training rows per optimizer step")
      ("data.max_prompt_tokens", po::value<int64_t>()->default_value(0), "skip longer prompts (0: no limit)")
      ("rollout.block_size", po::value<int64_t>()->default_value(4), "block size b")
      ("rollout.steps_per_block", po::value<int64_t>()->default_value(4), "denoising steps per block s")
      ("rollout.strategy", po::value<std::string>()->default_value("low_confidence_dynamic"), "sampler strategy")
      ("rollout.tau", po::value<double>()->default_value(0.9), "low_confidence_dynamic threshold")
      ("rollout.entropy_bound", po::value<double>()->default_value(1.0), "entropy_bounded gamma (nats)")
      ("rollout.temperature", po::value<double>()->default_value(1.0), "rollout temperature (0: greedy)")
      ("rollout.top_k", po::value<int64_t>()->default_value(0), "rollout top-k (0: off)")
      ("rollout.top_p", po::value<double>()->default_value(1.0), "rollout top-p (1: off)")
      ("rollout.max_new_tokens", po::value<int64_t>()->default_value(64), "maximum response length (after the ramp)")
      ("rollout.ramp_start_tokens", po::value<int64_t>()->default_value(0), "response length at step 0 (0: no ramp)")
      ("rollout.ramp_steps", po::value<int64_t>()->default_value(0), "RL steps of the cosine length ramp")
      ("loss.divergence", po::value<std::string>()->default_value("forward_kl"), "forward_kl | reverse_kl | mixture | jsd | topk_forward_kl")
      ("loss.reverse_weight", po::value<double>()->default_value(0.0), "mixture: weight of KL(u||t)")
      ("loss.jsd_alpha", po::value<double>()->default_value(0.5), "jsd: alpha")
      ("loss.topk", po::value<int64_t>()->default_value(16), "topk_forward_kl: K")
      ("loss.state_selection", po::value<std::string>()->default_value("one_per_block"), "one_per_block | all_rounds (opd)")
      ("loss.exclude_eos", po::value<std::string>()->default_value("auto"),
       "no loss at the EOS position: true | false | auto (true for the KL modes as the paper, false for rm-ce: SFT must learn to stop)")
      ("loss.ce_source", po::value<std::string>()->default_value("gold"), "rm-ce responses: gold | rollout | teacher")
      ("loss.ce_weighting", po::value<std::string>()->default_value("inverse_t"), "rm-ce weights: inverse_t | marginal")
      ("loss.ce_t_min", po::value<double>()->default_value(1e-3), "rm-ce: clamp of t in 1/t")
      ("optim.rl_steps", po::value<int64_t>()->default_value(100), "RL steps (one rollout batch each)")
      ("optim.max_train_tokens", po::value<int64_t>()->default_value(0), "stop at this many training tokens (0: off)")
      ("eval.probe_prompts", po::value<std::string>()->default_value(""), "held-out prompts for the state-KL probe")
      ("eval.probe_every", po::value<int64_t>()->default_value(0), "RL steps between probes (0: start and end)")
      ("eval.probe_limit", po::value<int64_t>()->default_value(32), "probe prompts used")
      ("parallel.tp", po::value<int64_t>()->default_value(1), "tensor-parallel ranks per group (DP = world size / tp)")
      ("parallel.deterministic_shards", po::value<int64_t>()->default_value(0),
       "deterministic-reduction mode: compute every TP sum as over this many virtual shards (a multiple of "
       "tp), so losses and parameters are bitwise the same for every tp dividing it (0: off; docs/parallel.md)")
      ("parallel.check_slurm_ntasks", po::value<bool>()->default_value(true),
       "refuse a world size that differs from SLURM_NTASKS (the srun singleton trap)")
      ("run.out_dir", po::value<std::string>()->default_value(""), "output directory")
      ("run.seed", po::value<uint32_t>()->default_value(1234), "seed (prompt order, rollouts, states)")
      ("run.log_every", po::value<int64_t>()->default_value(1), "RL steps between log lines")
      ("run.save_every", po::value<int64_t>()->default_value(0), "RL steps between model saves (0: end only)")
      ("run.resume", po::value<std::string>()->default_value(""),
       "resume from a checkpoint: '' (start fresh), 'auto' (the newest valid one under run.out_dir/checkpoints; "
       "fresh when there is none) or a checkpoint directory (docs/checkpoint.md)")
      ("run.time_limit", po::value<double>()->default_value(0),
       "seconds from the start after which the run stops with a checkpoint and exit code 75 (0: off)")
      ("run.slurm_end_time", po::value<bool>()->default_value(true),
       "also stop before SLURM_JOB_END_TIME when the job sets it")
      ("numerics.on_nonfinite", po::value<std::string>()->default_value("abort"),
       "a NaN/inf loss or gradient: abort (an error naming the RL step; the rank and tensor are logged), skip "
       "(the update is dropped and logged, training goes on) or rollback (reload the last checkpoint, skip this "
       "RL step's batch)")
      ("numerics.on_spike", po::value<std::string>()->default_value("warn"),
       "an update's loss or gradient norm far above its running window: warn (log it, apply the update), skip, "
       "rollback or abort")
      ("numerics.spike_window", po::value<int64_t>()->default_value(50),
       "updates in the running window of losses and gradient norms (0: no spike detection)")
      ("numerics.spike_sigma", po::value<double>()->default_value(6.0),
       "a spike is above the window's mean + spike_sigma * std ...")
      ("numerics.spike_min_ratio", po::value<double>()->default_value(2.0), "... and above spike_min_ratio * mean")
      ("numerics.max_rollbacks", po::value<int64_t>()->default_value(3),
       "roll-backs (batches skipped) a run may make before it aborts")
      ("watchdog.enable", po::value<bool>()->default_value(true),
       "with more than one rank: a thread that ends the job (exit 88) when a collective stays pending too long, "
       "leaving per-rank flight records under run.out_dir/flight (opdlm flight)")
      ("watchdog.floor", po::value<double>()->default_value(300.0), "seconds a collective may always stay pending")
      ("watchdog.factor", po::value<double>()->default_value(10.0),
       "... or this many times the longest RL step or checkpoint save so far, when that is longer")
      ("watchdog.grace", po::value<double>()->default_value(5.0),
       "seconds between writing this rank's record and exiting (the other ranks write theirs)")
      ("checkpoint.every", po::value<int64_t>()->default_value(0),
       "RL steps between crash-safe checkpoints of the whole training state, and one at the end (0: off)")
      ("checkpoint.keep", po::value<int64_t>()->default_value(3), "committed checkpoints kept (the newest)")
      ("run.sample_rollouts", po::value<int64_t>()->default_value(2),
       "rollouts saved to run.out_dir/rollouts.jsonl (text, step map) per sampled RL step (0: none)")
      ("run.sample_rollouts_every", po::value<int64_t>()->default_value(10), "RL steps between sampled rollouts (and step 1)")
      ("run.peak_flops", po::value<double>()->default_value(0.0),
       "peak FLOP/s of one rank, for the MFU on step lines (0: no MFU)")
      ("run.save_at_tokens", po::value<std::string>()->default_value(""), "comma-separated training-token milestones to save checkpoints/tokens_<M>.h5 at");
  add_optim_options(d, 1e-4, 5, 0, 0.0, "cosine horizon in optimizer steps (0: rl_steps * ceil(prompts_per_step / rows_per_update))");
  return d;
}

OpdTrainOptions OpdTrainOptions::from_config(const ResolvedConfig& c, ConversionMode mode) {
  OpdTrainOptions o;
  auto where = [&](const char* key) { return c.origin.count(key) ? c.origin.at(key) : std::string("config"); };
  auto positive = [&](const char* key, int64_t v, int64_t lo) {
    if (v < lo) OPDLM_FAIL_AT(where(key), key, "must be >= ", lo, ", got ", v);
    return v;
  };
  o.mode = mode;
  o.origins = c.origin;
  o.teacher = c.get<std::string>("model.teacher");
  o.student_init = c.get<std::string>("model.student_init");
  o.tokenizer = c.get<std::string>("model.tokenizer");
  o.prompts = c.get<std::string>("data.prompts");
  o.prompts_per_step = positive("data.prompts_per_step", c.get<int64_t>("data.prompts_per_step"), 1);
  o.rows_per_update = positive("data.rows_per_update", c.get<int64_t>("data.rows_per_update"), 1);
  o.max_prompt_tokens = positive("data.max_prompt_tokens", c.get<int64_t>("data.max_prompt_tokens"), 0);
  auto& s = o.sampler;
  s.block_size = positive("rollout.block_size", c.get<int64_t>("rollout.block_size"), 1);
  s.steps_per_block = positive("rollout.steps_per_block", c.get<int64_t>("rollout.steps_per_block"), 1);
  s.strategy = diffusion::parse_strategy(c.get<std::string>("rollout.strategy"), where("rollout.strategy") + ": rollout.strategy");
  s.tau = c.get<double>("rollout.tau");
  s.entropy_bound = c.get<double>("rollout.entropy_bound");
  s.sampling.temperature = c.get<double>("rollout.temperature");
  s.sampling.top_k = c.get<int64_t>("rollout.top_k");
  s.sampling.top_p = c.get<double>("rollout.top_p");
  s.max_new_tokens = positive("rollout.max_new_tokens", c.get<int64_t>("rollout.max_new_tokens"), 1);
  o.ramp_start_tokens = positive("rollout.ramp_start_tokens", c.get<int64_t>("rollout.ramp_start_tokens"), 0);
  o.ramp_steps = positive("rollout.ramp_steps", c.get<int64_t>("rollout.ramp_steps"), 0);
  require_range(c, "rollout.tau", 0, 1);
  auto& d = o.loss.divergence;
  try {
    d.kind = ops::parse_divergence(c.get<std::string>("loss.divergence"));
  } catch (const Error& e) {
    OPDLM_FAIL_AT(where("loss.divergence"), "loss.divergence", e.what());
  }
  d.reverse_weight = c.get<double>("loss.reverse_weight");
  d.jsd_alpha = c.get<double>("loss.jsd_alpha");
  d.topk = positive("loss.topk", c.get<int64_t>("loss.topk"), 1);
  require_range(c, "loss.reverse_weight", 0, 1);
  require_range(c, "loss.jsd_alpha", 1e-9, 1 - 1e-9);
  {
    const std::string v = c.get<std::string>("loss.exclude_eos");
    if (v == "auto") o.loss.exclude_eos = mode != ConversionMode::rm_ce;
    else if (v == "true" || v == "1") o.loss.exclude_eos = true;
    else if (v == "false" || v == "0") o.loss.exclude_eos = false;
    else OPDLM_FAIL_AT(where("loss.exclude_eos"), "loss.exclude_eos", "'", v, "' is not true, false or auto");
  }
  o.loss.ce_t_min = c.get<double>("loss.ce_t_min");
  require_range(c, "loss.ce_t_min", 1e-9, 1);
  const std::string sel = c.get<std::string>("loss.state_selection");
  if (sel == "one_per_block") o.selection = StateSelection::one_per_block;
  else if (sel == "all_rounds") o.selection = StateSelection::all_rounds;
  else OPDLM_FAIL_AT(where("loss.state_selection"), "loss.state_selection", "unknown '", sel, "' (one_per_block, all_rounds)");
  const std::string src = c.get<std::string>("loss.ce_source");
  if (src == "gold") o.ce_source = CeSource::gold;
  else if (src == "rollout") o.ce_source = CeSource::rollout;
  else if (src == "teacher") o.ce_source = CeSource::teacher;
  else OPDLM_FAIL_AT(where("loss.ce_source"), "loss.ce_source", "unknown '", src, "' (gold, rollout, teacher)");
  const std::string wt = c.get<std::string>("loss.ce_weighting");
  if (wt == "inverse_t") o.loss.ce_weighting = CeWeighting::inverse_t;
  else if (wt == "marginal") o.loss.ce_weighting = CeWeighting::marginal;
  else OPDLM_FAIL_AT(where("loss.ce_weighting"), "loss.ce_weighting", "unknown '", wt, "' (inverse_t, marginal)");
  o.loss.objective = mode == ConversionMode::rm_ce ? RowObjective::masked_ce : RowObjective::teacher_kl;
  o.loss.block_size = s.block_size;

  o.rl_steps = positive("optim.rl_steps", c.get<int64_t>("optim.rl_steps"), 1);
  o.max_train_tokens = positive("optim.max_train_tokens", c.get<int64_t>("optim.max_train_tokens"), 0);
  const OptimOptions opt = read_optim_options(c);
  o.schedule = opt.schedule;
  o.adam = opt.adam;
  o.grad_clip = opt.grad_clip;
  positive("optim.max_steps", o.schedule.total_steps, 0);
  if (o.schedule.total_steps == 0) {  // the reference's estimate: every prompt yields a row (B 6.4)
    o.schedule.total_steps = o.rl_steps * ((o.prompts_per_step + o.rows_per_update - 1) / o.rows_per_update);
    if (o.schedule.total_steps <= o.schedule.warmup_steps)
      OPDLM_FAIL_AT(where("optim.warmup_steps"), "optim.warmup_steps", "the derived horizon rl_steps * ceil(prompts_per_step / ",
                    "rows_per_update) = ", o.schedule.total_steps, " optimizer steps does not exceed the warm-up (",
                    o.schedule.warmup_steps, "): lower optim.warmup_steps or set optim.max_steps");
  }
  o.schedule.validate();
  o.probe_prompts = c.get<std::string>("eval.probe_prompts");
  o.probe_every = positive("eval.probe_every", c.get<int64_t>("eval.probe_every"), 0);
  o.probe_limit = positive("eval.probe_limit", c.get<int64_t>("eval.probe_limit"), 1);
  o.tp = static_cast<int>(positive("parallel.tp", c.get<int64_t>("parallel.tp"), 1));
  o.deterministic_shards = positive("parallel.deterministic_shards", c.get<int64_t>("parallel.deterministic_shards"), 0);
  o.check_slurm_ntasks = c.get<bool>("parallel.check_slurm_ntasks");
  o.parallel_origin = where("parallel.tp");
  o.out_dir = c.get<std::string>("run.out_dir");
  o.seed = c.get<uint32_t>("run.seed");
  o.log_every = positive("run.log_every", c.get<int64_t>("run.log_every"), 1);
  o.save_every = positive("run.save_every", c.get<int64_t>("run.save_every"), 0);
  o.resume = c.get<std::string>("run.resume");
  o.on_nonfinite = c.get<std::string>("numerics.on_nonfinite");
  if (o.on_nonfinite != "abort" && o.on_nonfinite != "skip" && o.on_nonfinite != "rollback")
    OPDLM_FAIL_AT(where("numerics.on_nonfinite"), "numerics.on_nonfinite", "'", o.on_nonfinite,
                  "' is not abort, skip or rollback");
  o.on_spike = c.get<std::string>("numerics.on_spike");
  if (o.on_spike != "warn" && o.on_spike != "skip" && o.on_spike != "rollback" && o.on_spike != "abort")
    OPDLM_FAIL_AT(where("numerics.on_spike"), "numerics.on_spike", "'", o.on_spike,
                  "' is not warn, skip, rollback or abort");
  o.spike.window = positive("numerics.spike_window", c.get<int64_t>("numerics.spike_window"), 0);
  o.spike.sigma = c.get<double>("numerics.spike_sigma");
  o.spike.min_ratio = c.get<double>("numerics.spike_min_ratio");
  if (!(o.spike.sigma > 0))
    OPDLM_FAIL_AT(where("numerics.spike_sigma"), "numerics.spike_sigma", "must be > 0, got ", o.spike.sigma);
  if (!(o.spike.min_ratio >= 1))
    OPDLM_FAIL_AT(where("numerics.spike_min_ratio"), "numerics.spike_min_ratio", "must be >= 1, got ", o.spike.min_ratio);
  o.max_rollbacks = positive("numerics.max_rollbacks", c.get<int64_t>("numerics.max_rollbacks"), 0);
  o.sample_rollouts = positive("run.sample_rollouts", c.get<int64_t>("run.sample_rollouts"), 0);
  o.sample_rollouts_every = positive("run.sample_rollouts_every", c.get<int64_t>("run.sample_rollouts_every"), 1);
  o.peak_flops = c.get<double>("run.peak_flops");
  if (!(o.peak_flops >= 0)) OPDLM_FAIL_AT(where("run.peak_flops"), "run.peak_flops", "must be >= 0, got ", o.peak_flops);
  o.watchdog = c.get<bool>("watchdog.enable");
  o.watchdog_floor_s = c.get<double>("watchdog.floor");
  o.watchdog_factor = c.get<double>("watchdog.factor");
  o.watchdog_grace_s = c.get<double>("watchdog.grace");
  for (const char* key : {"watchdog.floor", "watchdog.factor", "watchdog.grace"})
    if (!(c.get<double>(key) > 0)) OPDLM_FAIL_AT(where(key), key, "must be > 0, got ", c.get<double>(key));
  o.time_limit_s = c.get<double>("run.time_limit");
  if (!(o.time_limit_s >= 0))
    OPDLM_FAIL_AT(where("run.time_limit"), "run.time_limit", "must be >= 0 seconds, got ", o.time_limit_s);
  o.slurm_end_time = c.get<bool>("run.slurm_end_time");
  o.checkpoint_every = positive("checkpoint.every", c.get<int64_t>("checkpoint.every"), 0);
  o.checkpoint_keep = positive("checkpoint.keep", c.get<int64_t>("checkpoint.keep"), 1);
  {
    const std::string list = c.get<std::string>("run.save_at_tokens");
    size_t pos = 0;
    while (pos < list.size()) {
      const size_t comma = std::min(list.find(',', pos), list.size());
      const std::string item = list.substr(pos, comma - pos);
      int64_t v = 0;
      try {
        size_t used = 0;
        v = std::stoll(item, &used);
        if (used != item.size()) throw std::invalid_argument(item);
      } catch (const std::exception&) {
        OPDLM_FAIL_AT(where("run.save_at_tokens"), "run.save_at_tokens", "'", item, "' is not an integer");
      }
      if (v <= 0 || (!o.save_at_tokens.empty() && v <= o.save_at_tokens.back()))
        OPDLM_FAIL_AT(where("run.save_at_tokens"), "run.save_at_tokens", "milestones must be positive and ascending, got ", v);
      o.save_at_tokens.push_back(v);
      pos = comma + 1;
    }
  }

  if (o.out_dir.empty()) OPDLM_FAIL_AT(where("run.out_dir"), "run.out_dir", "an output directory is required");
  if (o.prompts.empty()) OPDLM_FAIL_AT(where("data.prompts"), "data.prompts", "a conversion prompt JSONL is required");
  for (const auto& f : prompt_files(o.prompts))
    if (f.empty()) OPDLM_FAIL_AT(where("data.prompts"), "data.prompts", "empty file name in the list '", o.prompts, "'");
  if (o.tokenizer.empty()) OPDLM_FAIL_AT(where("model.tokenizer"), "model.tokenizer", "the prompts need a tokenizer");
  const bool needs_teacher = mode != ConversionMode::rm_ce || o.ce_source == CeSource::teacher;
  if (o.teacher.empty() && (needs_teacher || o.student_init.empty()))
    OPDLM_FAIL_AT(where("model.teacher"), "model.teacher",
                  needs_teacher ? "the teacher model is required for this mode" : "set model.teacher or model.student_init");
  if (!o.probe_prompts.empty() && o.teacher.empty())
    OPDLM_FAIL_AT(where("eval.probe_prompts"), "eval.probe_prompts", "the state-KL probe needs model.teacher");
  return o;
}

namespace {

// "1h02m", "3m05s", "42s": the progress line's ETA.
std::string format_duration(double s) {
  const int64_t t = std::llround(std::max(s, 0.0));
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(t / 3600), (long long)(t % 3600 / 60));
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%llds", (long long)t);
  return buf;
}

std::string slurm_job_id() {
  const char* v = std::getenv("SLURM_JOB_ID");
  return v ? v : "";
}

struct EncodedPrompt {
  std::string id;
  std::vector<int32_t> prompt, gold;  // gold: encoded response + EOS (rm-ce gold), empty if none
  std::string error;                  // why it is skipped ("" = usable)
};

// Encodes every record once; a record that cannot be used is kept with its reason (skipped per
// sample whenever it comes up, never a crash).
std::vector<EncodedPrompt> encode_prompts(const io::PromptDataset& ds, const io::Tokenizer& tok, int64_t vocab,
                                          int32_t eos, int64_t max_prompt_tokens, bool need_gold,
                                          const std::string& path) {
  std::vector<EncodedPrompt> out;
  for (const auto& r : ds.records) {
    EncodedPrompt e{r.id, {}, {}, ""};
    try {
      e.prompt = tok.encode(r.prompt);
      if (r.response) e.gold = tok.encode(*r.response);
    } catch (const Error& err) {
      e.error = err.what();
    }
    if (e.error.empty() && e.prompt.empty()) e.error = "empty prompt";
    if (e.error.empty() && max_prompt_tokens > 0 && static_cast<int64_t>(e.prompt.size()) > max_prompt_tokens)
      e.error = "prompt has " + std::to_string(e.prompt.size()) + " tokens > data.max_prompt_tokens";
    for (int32_t t : e.prompt)
      if (e.error.empty() && (t < 0 || t >= vocab)) e.error = "token id " + std::to_string(t) + " outside the vocabulary";
    if (need_gold && e.error.empty()) {
      if (!r.response) OPDLM_FAIL_AT(path, "response", "record '", r.id, "' has no response (loss.ce_source = gold needs one)");
      if (eos >= 0) e.gold.push_back(eos);
    }
    out.push_back(std::move(e));
  }
  return out;
}

// The indices i of `sample_ids` this DP rank decodes: those with sample id % dp == rank.
std::vector<size_t> my_share(const std::vector<uint32_t>& sample_ids, const parallel::Communicator& dp) {
  std::vector<size_t> out;
  for (size_t i = 0; i < sample_ids.size(); ++i)
    if (static_cast<int>(sample_ids[i] % static_cast<uint32_t>(dp.size())) == dp.rank()) out.push_back(i);
  return out;
}

// Every DP rank decodes its share of (prompts, sample_ids) with `decode(ids, sids)` (returning one
// Rollout per input); the rollouts of all ranks, in sample-id order (= the order of the inputs,
// which are ascending).
template <class Decode>
std::vector<diffusion::Rollout> shared_generate(const std::vector<std::vector<int32_t>>& prompts,
                                                const std::vector<uint32_t>& sample_ids, parallel::Communicator& dp,
                                                Decode&& decode) {
  std::vector<std::vector<int32_t>> ids;
  std::vector<uint32_t> sids;
  for (size_t i : my_share(sample_ids, dp)) ids.push_back(prompts[i]), sids.push_back(sample_ids[i]);
  const auto mine = ids.empty() ? std::vector<diffusion::Rollout>{} : decode(ids, sids);
  auto all = diffusion::all_gather_rollouts(mine, dp);
  if (all.size() != sample_ids.size()) OPDLM_FAIL("DP rollouts: gathered ", all.size(), " of ", sample_ids.size());
  return all;
}

// The student's block-diffusion rollouts, decoded in shares over DP.
std::vector<diffusion::Rollout> shared_bd_generate(const model::Qwen3Model& student,
                                                   const std::vector<std::vector<int32_t>>& prompts,
                                                   const std::vector<uint32_t>& sample_ids,
                                                   const diffusion::SamplerOptions& so, parallel::Communicator& dp) {
  return shared_generate(prompts, sample_ids, dp, [&](const auto& ids, const auto& sids) {
    return diffusion::bd_generate(student, ids, sids, so);
  });
}

}  // namespace

namespace {
// Test hooks, "<world rank>:<rl step>", acting at the first update of that RL step on that rank:
// OPDLM_INJECT_NAN puts a NaN into the gradient of the first layer's q_proj (a TP-sharded tensor);
// OPDLM_INJECT_SPIKE multiplies the rank's whole gradient by 1e4 (a gradient-norm spike).
bool injection_due(const char* var, int world_rank, int64_t rl_step) {
  const char* env = std::getenv(var);
  if (!env || !*env) return false;
  int r = -1;
  long long st = -1;
  if (std::sscanf(env, "%d:%lld", &r, &st) != 2)
    OPDLM_FAIL_AT("environment", var, "'", env, "' is not <world rank>:<rl step>");
  return r == world_rank && st == rl_step;
}

// The first non-finite gradient element of this rank, as "tensor[element] = value", or "".
std::string first_nonfinite(const model::Qwen3Weights& grads) {
  for (const auto& [name, t] : grads.tensors()) {
    const float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(p[i])) return name + "[" + std::to_string(i) + "] = " + std::to_string(p[i]);
  }
  return "";
}

// The attempt number of a start in a run directory: one more than any attempt its logs mention (0
// for the first start). Lines without "attempt" (older logs) count as attempt 0.
int64_t next_attempt(const std::string& out_dir) {
  int64_t a = -1;
  for (const char* f : {"/metrics.jsonl", "/metrics.lost.jsonl"}) {
    std::ifstream in(out_dir + f);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.is_object()) a = std::max<int64_t>(a, j.value("attempt", int64_t{0}));
    }
  }
  return a + 1;
}

// Appends the lines of `metrics` from byte `offset` on (work after the checkpoint a restart or a
// roll-back goes back to) to metrics.lost.jsonl, each tagged with the attempt that wrote it and why it
// was lost; the caller then cuts the log. A torn last line (a crash mid-write) is dropped.
void keep_lost_lines(const std::string& metrics, uintmax_t offset, const std::string& lost_by) {
  std::ifstream in(metrics, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string line, out;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    j["lost_in_attempt"] = j.value("attempt", int64_t{0});
    j["lost_by"] = lost_by;
    out += j.dump() + "\n";
  }
  if (out.empty()) return;
  const std::string lost = std::filesystem::path(metrics).parent_path().string() + "/metrics.lost.jsonl";
  std::ofstream o(lost, std::ios::app);
  o << out;
  if (!o) OPDLM_FAIL_AT(lost, "", "cannot append the lost lines of ", metrics);
}

// Keeps the sampled rollouts of RL steps <= last_step (a resume or roll-back to that checkpoint).
void cut_rollout_samples(const std::string& path, int64_t last_step) {
  if (!std::filesystem::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.value("rl_step", int64_t{0}) <= last_step) kept += line + "\n";
  }
  io::atomic_write_bytes(path, kept);
}

std::string host_name() {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return host;
}

nlohmann::json budget_to_json(const BudgetCounters& b) {
  return {{"rollouts", b.rollouts},
          {"skipped_prompts", b.skipped_prompts},
          {"generated_tokens", b.generated_tokens},
          {"train_prompt_tokens", b.train_prompt_tokens},
          {"train_response_tokens", b.train_response_tokens},
          {"rows", b.rows},
          {"loss_positions", b.loss_positions},
          {"rollout_flops", b.rollout_flops},
          {"teacher_flops", b.teacher_flops},
          {"student_forward_flops", b.student_forward_flops},
          {"student_backward_flops", b.student_backward_flops}};
}
BudgetCounters budget_from_json(const nlohmann::json& j) {
  BudgetCounters b;
  b.rollouts = j.at("rollouts");
  b.skipped_prompts = j.at("skipped_prompts");
  b.generated_tokens = j.at("generated_tokens");
  b.train_prompt_tokens = j.at("train_prompt_tokens");
  b.train_response_tokens = j.at("train_response_tokens");
  b.rows = j.at("rows");
  b.loss_positions = j.at("loss_positions");
  b.rollout_flops = j.at("rollout_flops");
  b.teacher_flops = j.at("teacher_flops");
  b.student_forward_flops = j.at("student_forward_flops");
  b.student_backward_flops = j.at("student_backward_flops");
  return b;
}
}  // namespace

int64_t dp_rows_per_rank(int dp, int64_t rows_per_update, const std::string& where) {
  const int64_t width = parallel::tree_width(rows_per_update);
  if (dp < 1 || (dp & (dp - 1)) != 0 || width % dp != 0)
    OPDLM_FAIL_AT(where, "parallel.tp", "DP = world size / parallel.tp = ", dp, " must be a power of two dividing ",
                  width, " (data.rows_per_update = ", rows_per_update, " rounded up to a power of two): each DP rank ",
                  "computes an aligned block of every update's rows so the summed gradient is the same for every ",
                  "layout; change the number of ranks, parallel.tp or data.rows_per_update");
  return width / dp;
}

OpdTrainSummary run_opd_training(const OpdTrainOptions& o, const std::string& resolved_table, const TrainGrid& grid) {
  namespace fs = std::filesystem;
  parallel::LocalCommunicator one_process;
  parallel::Communicator& dp = grid.dp ? *grid.dp : one_process;
  const std::string layout_where = o.parallel_origin.empty() ? "config" : o.parallel_origin;
  const int64_t rows_per_rank = dp_rows_per_rank(dp.size(), o.rows_per_update, layout_where);
  // Refusals of the layout come before anything is written.
  parallel::Communicator* tp_group = grid.tp && grid.tp->size() > 1 ? grid.tp : nullptr;
  // The vocab-parallel path: a TP group, or one process in the deterministic-reduction mode (its
  // model is the C-virtual-shard TP model on a group of one, docs/parallel.md).
  parallel::LocalCommunicator tp_of_one;
  parallel::Communicator* tp = tp_group ? tp_group : o.deterministic_shards > 0 ? &tp_of_one : nullptr;
  const char* tp_key = tp_group ? "parallel.tp" : "parallel.deterministic_shards";
  if (tp && o.mode == ConversionMode::rm_ce && o.ce_source == CeSource::teacher)
    OPDLM_FAIL_AT(layout_where, tp_key,
                  "rm-ce with loss.ce_source = teacher samples with the AR decoder, which is not tensor parallel yet; ",
                  "use parallel.tp = 1 and parallel.deterministic_shards = 0 for it");
  if (tp && o.sampler.sampling.top_p < 1.0)
    OPDLM_FAIL_AT(layout_where, "rollout.top_p",
                  "top_p < 1 is not vocab-parallel yet; use rollout.top_p = 1 with ", tp_key, " set");
  const bool writer = grid.writes_outputs;
  const std::string model_path = o.out_dir + "/model.h5", metrics_path = o.out_dir + "/metrics.jsonl";

  // ---- resume: the checkpoint (the same on every rank) and its state, before any output is opened ----
  const std::string ckpt_root = o.out_dir + "/checkpoints";
  parallel::Communicator& tp_grid = grid.tp ? *grid.tp : tp_of_one;
  const CkptGrid cgrid{tp_grid, dp, dp.rank() * tp_grid.size() + tp_grid.rank()};
  std::vector<std::string> resume_skipped;
  const std::string resume_dir = choose_resume_checkpoint(o.resume, ckpt_root, cgrid, &resume_skipped);
  for (const auto& why : resume_skipped) OPDLM_LOG(warning) << "resume: skipped " << why;
  std::optional<RunState> resumed;
  if (!resume_dir.empty()) resumed = read_run_state(resume_dir);
  // The teacher is not copied into checkpoints: its path and content hash are, and must still match.
  std::string teacher_sha;
  // Hashed once, when first needed (a resume's check, or the first checkpoint), by the writer only.
  auto teacher_hash = [&]() -> const std::string& {
    if (teacher_sha.empty() && writer && !o.teacher.empty()) teacher_sha = io::sha256_file(o.teacher);
    return teacher_sha;
  };
  if (resumed) teacher_hash();
  if (resumed) {
    const nlohmann::json& m = resumed->meta;
    const std::string saved_sha = m.value("teacher", nlohmann::json::object()).value("sha256", "");
    if (writer && saved_sha != teacher_sha)
      OPDLM_FAIL_AT(o.teacher, "model.teacher", "the teacher's sha256 is ", teacher_sha.empty() ? "(none)" : teacher_sha,
                    ", the checkpoint ", resume_dir, " was trained against ", saved_sha.empty() ? "(none)" : saved_sha,
                    ": resuming with another teacher would mix two runs");
    if (m.value("mode", "") != conversion_mode_name(o.mode))
      OPDLM_FAIL_AT(resume_dir, "mode", "the checkpoint is of --mode ", m.value("mode", ""), ", this run is --mode ",
                    conversion_mode_name(o.mode));
  }
  std::optional<MetricsLog> metrics_log;
  int64_t attempt = 0;
  const std::string rollouts_path = o.out_dir + "/rollouts.jsonl";
  if (writer) {
    fs::create_directories(o.out_dir);
    attempt = next_attempt(o.out_dir);
    if (resumed) {  // the log continues exactly where the checkpoint was taken
      const auto offset = resumed->meta.at("metrics_offset").get<uintmax_t>();
      std::error_code ec;
      const uintmax_t size = fs::exists(metrics_path, ec) ? fs::file_size(metrics_path) : 0;
      if (size < offset)
        OPDLM_FAIL_AT(metrics_path, "metrics_offset", "the metrics log has ", size, " bytes, the checkpoint ", resume_dir,
                      " was taken at byte ", offset, " (a log of another run?)");
      keep_lost_lines(metrics_path, offset, "restart");
      fs::resize_file(metrics_path, offset);
      cut_rollout_samples(rollouts_path, resumed->meta.at("rl_step").get<int64_t>());
    } else if (o.resume == "auto" && fs::exists(metrics_path)) {
      // A restart that found no committed checkpoint redoes the run from the start: the log of the
      // attempt that died is kept aside, not mixed into this one.
      const std::string aside = metrics_path + ".before_restart";
      keep_lost_lines(metrics_path, 0, "restart");
      fs::rename(metrics_path, aside);
      cut_rollout_samples(rollouts_path, 0);
      OPDLM_LOG(warning) << "resume=auto found no checkpoint under " << ckpt_root << ": starting fresh; the earlier "
                         << "metrics log is kept as " << aside;
    }
    metrics_log.emplace(metrics_path);
    metrics_log->stamp_lines(attempt);
  }
  struct {
    std::optional<MetricsLog>* log;
    void write(const nlohmann::json& j) { if (*log) (*log)->write(j); }
  } metrics{&metrics_log};
  const std::string mode = conversion_mode_name(o.mode);

  // ---- models: the frozen teacher and the student (the teacher's weights unless given) ----
  // Under tensor parallelism every rank reads the whole files and keeps its Megatron shard.
  std::optional<parallel::TpPlan> plan;
  auto make_model = [&](model::Qwen3Weights full, bool trainable) {
    if (!tp) return model::Qwen3Model(std::move(full), trainable);
    plan = model::tp_plan(full.config(), tp->size(), o.deterministic_shards);
    const model::VocabRange vr = model::vocab_range(full.config(), *plan, tp->rank());
    return model::Qwen3Model(model::shard_weights(full, *plan, tp->rank()), trainable,
                             {tp, full.config(), vr.begin, vr.real, plan->pieces});
  };
  std::unique_ptr<model::Qwen3Model> teacher;
  model::Qwen3Weights student_w;
  if (!o.teacher.empty()) {
    model::Qwen3Weights tw = io::load_model(o.teacher);
    student_w = o.student_init.empty() ? tw.clone() : io::load_model(o.student_init);
    teacher = std::make_unique<model::Qwen3Model>(make_model(std::move(tw), false));
  } else {
    student_w = io::load_model(o.student_init);
  }
  model::Qwen3Model student = make_model(std::move(student_w), true);
  const model::Qwen3Config& cfg = student.full_config();
  if (teacher && teacher->full_config().vocab_size != cfg.vocab_size)
    OPDLM_FAIL_AT(o.student_init, "vocab_size", "student vocabulary ", cfg.vocab_size, " differs from the teacher's ",
                  teacher->full_config().vocab_size);
  const std::string model_src = o.student_init.empty() ? o.teacher : o.student_init;
  if (cfg.mask_token_id < 0)
    OPDLM_FAIL_AT(model_src, "mask_token_id", "the model config has no mask_token_id (algorithm.md A 8)");
  RowLossSpec spec = o.loss;
  spec.mask_id = static_cast<int32_t>(cfg.mask_token_id);
  spec.eos_id = static_cast<int32_t>(cfg.eos_token_id);
  spec.pad_id = static_cast<int32_t>(cfg.pad_token_id >= 0 ? cfg.pad_token_id : std::max<int64_t>(cfg.eos_token_id, 0));
  diffusion::SamplerOptions sampler = o.sampler;
  sampler.mask_id = spec.mask_id;
  sampler.eos_id = spec.eos_id;
  sampler.pad_id = spec.pad_id;
  sampler.seed = o.seed;
  sampler.validate(cfg.vocab_size);

  // ---- data ----
  const io::Tokenizer tok = io::Tokenizer::from_file(o.tokenizer);
  if (tok.vocab_size() > cfg.vocab_size)
    OPDLM_FAIL_AT(o.tokenizer, "vocab_size", "tokenizer has ", tok.vocab_size(), " ids, the model ", cfg.vocab_size);
  const bool use_rollouts = o.mode != ConversionMode::rm_ce || o.ce_source == CeSource::rollout;
  std::vector<EncodedPrompt> prompts;
  for (const auto& file : prompt_files(o.prompts)) {
    auto part = encode_prompts(io::load_prompt_jsonl(file), tok, cfg.vocab_size, spec.eos_id, o.max_prompt_tokens,
                               o.mode == ConversionMode::rm_ce && o.ce_source == CeSource::gold, file);
    prompts.insert(prompts.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
  }
  if (prompts.empty()) OPDLM_FAIL_AT(o.prompts, "", "no prompt records");
  std::vector<EncodedPrompt> probe;
  if (!o.probe_prompts.empty()) {
    probe = encode_prompts(io::load_prompt_jsonl(o.probe_prompts), tok, cfg.vocab_size, spec.eos_id,
                           o.max_prompt_tokens, false, o.probe_prompts);
    if (static_cast<int64_t>(probe.size()) > o.probe_limit) probe.resize(size_t(o.probe_limit));
  }

  std::string run_id = resumed ? resumed->meta.value("run_id", "") : std::string();
  if (run_id.empty())
    run_id = io::sha256_hex(std::to_string(std::chrono::system_clock::now().time_since_epoch().count()) + o.out_dir +
                            std::to_string(o.seed)).substr(0, 16);
  OPDLM_LOG(info) << "opdlm train --mode " << mode << ": " << cfg.num_params() << " parameters, "
                  << prompts.size() << " prompts, TP " << (tp ? tp->size() : 1) << " x DP " << dp.size()
                  << (o.deterministic_shards ? ", deterministic reductions over " + std::to_string(o.deterministic_shards) +
                                                   " virtual shards" : std::string()) << "\n"
                  << resolved_table;
  if (!resumed)  // a resumed run's log already starts with its start line
    metrics.write({{"event", "start"}, {"mode", mode}, {"run_id", run_id}, {"params", cfg.num_params()},
                   {"prompts", prompts.size()},
                   {"parallel", {{"tp", tp ? tp->size() : 1}, {"dp", dp.size()}, {"rows_per_rank", rows_per_rank},
                                 {"deterministic_shards", o.deterministic_shards}}},
                   {"sampler", diffusion::sampler_options_to_json(sampler)}, {"config", resolved_table},
                   {"host", host_name()}, {"world_size", tp_grid.size() * dp.size()}, {"slurm_job_id", slurm_job_id()}});

  // ---- state-KL probe: held-out prompts, decoded greedily with one token per step (eval settings) ----
  OpdTrainSummary sum;
  sum.params = cfg.num_params();
  sum.model_path = model_path;
  BudgetCounters& bc = sum.budget;
  auto run_probe = [&](int64_t rl_step) {
    if (probe.empty()) return;
    diffusion::SamplerOptions ps = sampler;
    ps.strategy = diffusion::Strategy::low_confidence_static;
    ps.sampling = ops::SamplingParams{0.0, 0, 1.0};
    ps.step = 0;
    ps.seed = o.seed;
    std::vector<std::vector<int32_t>> ids;
    std::vector<uint32_t> sids;
    for (size_t i = 0; i < probe.size(); ++i)
      if (probe[i].error.empty()) ids.push_back(probe[i].prompt), sids.push_back(static_cast<uint32_t>(i));
    // Decoded in shares over DP; the KL is then computed on every rank (identical weights, same result).
    const auto rs = shared_bd_generate(student, ids, sids, ps, dp);
    std::vector<RolloutView> views;
    for (const auto& r : rs)
      if (r.ok()) views.push_back({r.sample_id, r.prompt, r.response, r.step_map});
    // States and masks keyed by the probe index, not the RL step: every probe sees the same draws.
    const StateKl kl = state_kl(*teacher, student, views, spec, o.seed, 0);
    if (kl.rows == 0) {  // nothing decoded to score: no figure rather than a misleading 0
      metrics.write({{"event", "probe"}, {"rl_step", rl_step}, {"train_tokens", bc.train_tokens()}, {"rows", 0},
                     {"skipped", kl.skipped}, {"own_state_kl", nullptr}, {"random_state_kl", nullptr}});
      OPDLM_LOG(warning) << "probe at RL step " << rl_step << ": no decoded response had a scorable position";
      return;
    }
    if (sum.probe_own_kl_first < 0) sum.probe_own_kl_first = kl.own;
    sum.probe_own_kl_last = kl.own;
    sum.probe_random_kl_last = kl.random;
    metrics.write({{"event", "probe"}, {"rl_step", rl_step}, {"train_tokens", bc.train_tokens()},
                   {"own_state_kl", kl.own}, {"random_state_kl", kl.random}, {"rows", kl.rows},
                   {"skipped", kl.skipped}, {"own_positions", kl.own_positions}, {"random_positions", kl.random_positions}});
    OPDLM_LOG(info) << "probe at RL step " << rl_step << ": KL on own states " << kl.own << ", on random states "
                    << kl.random << " (" << kl.rows << " rows)";
  };

  // ---- optimizer: AdamW moments sharded over DP (ZeRO-1), no decay on the norm gains ----
  std::vector<Tensor*> params;
  std::vector<bool> no_decay;
  for (auto& t : student.weights().tensors()) params.push_back(&t.value), no_decay.push_back(t.value.ndim() < 2);
  parallel::ShardedAdamW optimizer(params, no_decay, dp);
  optimizer.set_tensor_parallel(tp, no_decay);  // the norm gains (1-D) are the tensors every TP rank holds whole
  optimizer.set_exact_norm(o.deterministic_shards > 0);
  std::vector<const Tensor*> grads;
  for (auto& t : student.grads().tensors()) grads.push_back(&t.value);
  // One TreeSum for the run: its buffers are reused by every update.
  parallel::TreeSum tree(student.flat_grads().size(), rows_per_rank);
  model::Qwen3Activations acts;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  // The whole student: under TP every rank must call this (the shards are all-gathered).
  auto whole_student = [&]() -> model::Qwen3Weights {
    if (!tp) return student.weights();
    std::vector<model::Qwen3Weights> shards;
    for (int r = 0; r < tp->size(); ++r) shards.push_back(student.weights().zeros_like());
    for (size_t i = 0; i < params.size(); ++i) {
      const size_t n = size_t(params[i]->numel());
      std::vector<float> all(n * size_t(tp->size()));
      tp->all_gather(std::span<const float>(params[i]->data<float>(), n), std::span<float>(all));
      for (int r = 0; r < tp->size(); ++r)
        std::copy(all.begin() + long(n) * r, all.begin() + long(n) * (r + 1), shards[size_t(r)].tensors()[i].value.data<float>());
    }
    std::vector<const model::Qwen3Weights*> ptrs;
    for (const auto& s : shards) ptrs.push_back(&s);
    return model::unshard_weights(ptrs, cfg, *plan);
  };
  auto save = [&](int64_t rl_step) {
    const model::Qwen3Weights whole = whole_student();
    if (!writer) return;
    io::save_model(model_path, whole,
                   {{"mode", mode}, {"rl_step", rl_step}, {"optimizer_steps", sum.optimizer_steps},
                    {"train_tokens", bc.train_tokens()}, {"teacher", o.teacher}, {"tokenizer", o.tokenizer}});
    metrics.write({{"event", "save"}, {"rl_step", rl_step}, {"path", model_path}});
  };

  size_t next_milestone = 0;
  auto save_milestones = [&](int64_t rl_step) {
    while (next_milestone < o.save_at_tokens.size() && bc.train_tokens() >= o.save_at_tokens[next_milestone]) {
      const int64_t m = o.save_at_tokens[next_milestone++];
      const model::Qwen3Weights whole = whole_student();
      if (!writer) continue;
      fs::create_directories(o.out_dir + "/checkpoints");
      const std::string path = o.out_dir + "/checkpoints/tokens_" + std::to_string(m) + ".h5";
      io::save_model(path, whole,
                     {{"mode", mode}, {"rl_step", rl_step}, {"optimizer_steps", sum.optimizer_steps},
                      {"train_tokens", bc.train_tokens()}, {"milestone", m}, {"teacher", o.teacher},
                      {"tokenizer", o.tokenizer}});
      metrics.write({{"event", "milestone"}, {"milestone", m}, {"train_tokens", bc.train_tokens()},
                     {"rl_step", rl_step}, {"path", path}});
    }
  };

  diffusion::RolloutBuffer rollouts;
  int64_t start_step = 0, last_checkpoint = -1;
  // ---- numerics: the spike windows and the batches roll-backs skip (both saved in checkpoints) ----
  SpikeDetector loss_spikes(o.spike), norm_spikes(o.spike);
  std::set<int64_t> skip_batches;  // RL steps (1-based) whose prompts are not trained on
  // The state a checkpoint holds, on every rank: parameters and moments resharded for this layout;
  // counters, cursor, rollouts, spike windows and skipped batches as saved.
  auto restore = [&](const std::string& dir, const RunState& st) {
    load_run_tensors(dir, student, plan, tp ? tp->rank() : 0, optimizer);
    const nlohmann::json& m = st.meta;
    start_step = last_checkpoint = m.at("rl_step");
    sum.rl_steps = start_step;
    sum.optimizer_steps = m.at("optimizer_steps");
    bc = budget_from_json(m.at("budget"));
    const nlohmann::json& sm = m.at("summary");
    sum.final_loss = sm.at("final_loss");
    sum.probe_own_kl_first = sm.at("probe_own_kl_first");
    sum.probe_own_kl_last = sm.at("probe_own_kl_last");
    sum.probe_random_kl_last = sm.at("probe_random_kl_last");
    rollouts = st.rollouts;
    next_milestone = 0;
    while (next_milestone < o.save_at_tokens.size() && o.save_at_tokens[next_milestone] <= bc.train_tokens()) ++next_milestone;
    const nlohmann::json num = m.value("numerics", nlohmann::json::object());
    loss_spikes = SpikeDetector(o.spike);
    norm_spikes = SpikeDetector(o.spike);
    loss_spikes.from_json(num.value("loss_window", nlohmann::json::array()), dir + "/state.h5 numerics.loss_window");
    norm_spikes.from_json(num.value("grad_norm_window", nlohmann::json::array()), dir + "/state.h5 numerics.grad_norm_window");
    for (int64_t b : num.value("skip_batches", std::vector<int64_t>{})) skip_batches.insert(b);
  };
  if (resumed) {
    restore(resume_dir, *resumed);
    const nlohmann::json& m = resumed->meta;
    const nlohmann::json saved_layout = m.value("layout", nlohmann::json::object());
    // The log was cut where the checkpoint was taken, before the line that announced its commit.
    metrics.write({{"event", "checkpoint"}, {"rl_step", start_step}, {"path", ckpt_root + "/" + io::checkpoint_dir_name(start_step)}});
    metrics.write({{"event", "resume"}, {"run_id", run_id}, {"from", resume_dir}, {"rl_step", start_step},
                   {"optimizer_steps", sum.optimizer_steps}, {"saved_layout", saved_layout}, {"skipped", resume_skipped},
                   {"layout", {{"tp", tp_grid.size()}, {"dp", dp.size()}}}, {"host", host_name()},
                   {"slurm_job_id", slurm_job_id()}});
    OPDLM_LOG(info) << "resumed from " << resume_dir << " at RL step " << start_step << " (saved at TP "
                    << saved_layout.value("tp", 1) << " x DP " << saved_layout.value("dp", 1) << ")";
  } else {
    run_probe(0);
  }
  // The time budget: run.time_limit from now, and SLURM_JOB_END_TIME (epoch seconds) when set.
  double deadline = o.time_limit_s > 0 ? elapsed() + o.time_limit_s : 0;
  if (const char* end = std::getenv("SLURM_JOB_END_TIME"); end && o.slurm_end_time) {
    const double left = std::atof(end) - double(std::time(nullptr));
    if (deadline == 0 || elapsed() + left < deadline) deadline = elapsed() + left;
  }
  double max_step_s = 0, max_checkpoint_s = 0;
  // The whole training state at the end of RL step `rl_step` (every rank calls it).
  auto checkpoint = [&](int64_t rl_step) {
    const double t_save = elapsed();
    RunState st;
    st.rollouts = rollouts;
    std::error_code ec;
    st.meta = {{"run_id", run_id}, {"mode", mode}, {"rl_step", rl_step}, {"optimizer_steps", sum.optimizer_steps},
               {"budget", budget_to_json(bc)},
               {"summary", {{"final_loss", sum.final_loss}, {"probe_own_kl_first", sum.probe_own_kl_first},
                            {"probe_own_kl_last", sum.probe_own_kl_last}, {"probe_random_kl_last", sum.probe_random_kl_last}}},
               // The RNG is counter-based: every draw is keyed by (seed, purpose, RL step, sample id,
               // position), so the seed and the next step are its whole state; the prompt stream is
               // the seeded permutation per epoch, read from sample id next_sample_id on.
               {"rng", {{"seed", o.seed}, {"next_rl_step", rl_step}}},
               {"data_cursor", {{"next_sample_id", rl_step * o.prompts_per_step}, {"prompts", prompts.size()},
                                {"prompts_per_step", o.prompts_per_step}}},
               {"lr_next", o.schedule.at(sum.optimizer_steps)},
               {"metrics_offset", writer && fs::exists(metrics_path, ec) ? int64_t(fs::file_size(metrics_path)) : int64_t{0}},
               {"teacher", {{"path", o.teacher}, {"sha256", teacher_hash()}}},
               {"student_init", o.student_init},
               {"layout", {{"tp", tp ? tp->size() : 1}, {"dp", dp.size()}, {"deterministic_shards", o.deterministic_shards}}},
               {"numerics", {{"skip_batches", skip_batches}, {"loss_window", loss_spikes.to_json()},
                             {"grad_norm_window", norm_spikes.to_json()}}},
               {"config", resolved_table},
               {"config_sha256", io::sha256_hex(resolved_table)},
               {"model_config", cfg.to_json()}};
    save_run_checkpoint(ckpt_root, rl_step, int(o.checkpoint_keep), cgrid, student, plan, optimizer, st);
    last_checkpoint = rl_step;
    max_checkpoint_s = std::max(max_checkpoint_s, elapsed() - t_save);
    metrics.write({{"event", "checkpoint"}, {"rl_step", rl_step}, {"path", ckpt_root + "/" + io::checkpoint_dir_name(rl_step)},
                   {"seconds", elapsed() - t_save}});
  };
  // ---- the hang watchdog (more than one rank): records under RUN/flight/<attempt> ----
  std::unique_ptr<parallel::HangWatchdog> watchdog;
  const int world_size = tp_grid.size() * dp.size();
  if (o.watchdog && world_size > 1) {
    char stamp[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(stamp, sizeof stamp, "attempt_%Y%m%dT%H%M%S", std::gmtime(&now));
    parallel::WatchdogOptions wo;
    wo.floor_s = o.watchdog_floor_s;
    wo.factor = o.watchdog_factor;
    wo.grace_s = o.watchdog_grace_s;
    wo.poll_s = std::min(0.5, o.watchdog_floor_s / 4);
    wo.dump_dir = o.out_dir + "/flight/" + grid_broadcast(cgrid, std::string(stamp));  // one name for every rank
    wo.world_rank = cgrid.world_rank;
    wo.exit_code = kExitHang;
    const parallel::GridShape shape{world_size, tp_grid.size()};
    std::vector<int> world_ranks(static_cast<size_t>(world_size));
    for (int r = 0; r < world_size; ++r) world_ranks[size_t(r)] = r;
    wo.identity = {{"world_rank", cgrid.world_rank}, {"tp_rank", tp_grid.rank()}, {"dp_rank", dp.rank()},
                   {"run_id", run_id},
                   {"comms", {{"world", world_ranks}, {"tp", parallel::tp_group_ranks(dp.rank(), shape)},
                              {"dp", parallel::dp_group_ranks(tp_grid.rank(), shape)}}}};
    if (writer)
      wo.on_hang = [&metrics_log](const nlohmann::json& ev) {
        if (metrics_log) metrics_log->write(ev);
      };
    watchdog = std::make_unique<parallel::HangWatchdog>(parallel::flight_recorder(), std::move(wo));
  }
  std::vector<uint64_t> perm;
  uint64_t perm_epoch = UINT64_MAX;
  const double first_step_at = elapsed();  // this attempt's first RL step: the ETA's clock
  const int64_t tokens_at_attempt_start = bc.train_tokens();  // throughput counts this attempt's tokens only
  // A run resumed from the checkpoint it took when its token budget ran out has nothing left to train.
  bool budget_reached = o.max_train_tokens > 0 && bc.train_tokens() >= o.max_train_tokens;
  for (int64_t step = start_step; step < o.rl_steps && !budget_reached; ++step) {
    set_error_step(step + 1);  // errors name the 1-based RL step, as the log does
    const double t_step = elapsed();
    const double comm_at_start = parallel::flight_recorder().comm_seconds();
    const BudgetCounters bc_at_start = bc;
    // Phase times of this step on this rank (docs/logs.md): each wraps its calls, communication included.
    double rollout_s = 0, teacher_s = 0, student_s = 0, optimizer_s = 0;
    auto timed = [&](double& acc, auto&& f) {
      const double t = elapsed();
      f();
      acc += elapsed() - t;
    };
    const uint32_t ustep = static_cast<uint32_t>(step);
    const int64_t max_new = max_rollout_length(step, o.ramp_start_tokens, sampler.max_new_tokens, o.ramp_steps,
                                               sampler.block_size);
    // ---- the step's prompts: a fixed shuffled stream, one epoch after another ----
    std::vector<const EncodedPrompt*> batch;
    std::vector<uint32_t> sample_ids;
    if (injection_due("OPDLM_INJECT_HANG", cgrid.world_rank, step + 1))  // test hook: this rank stops talking
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    // A batch a roll-back skips: its prompts are used up, nothing is decoded or trained on.
    const bool skip_batch = skip_batches.count(step + 1) > 0;
    if (skip_batch) metrics.write({{"event", "skip_batch"}, {"rl_step", step + 1}, {"prompts", o.prompts_per_step}});
    for (int64_t i = 0; i < o.prompts_per_step && !skip_batch; ++i) {
      const uint64_t g = static_cast<uint64_t>(step * o.prompts_per_step + i);
      const uint64_t epoch = g / prompts.size();
      if (epoch != perm_epoch) perm = io::shuffle_permutation(prompts.size(), o.seed, static_cast<uint32_t>(epoch)), perm_epoch = epoch;
      const EncodedPrompt& p = prompts[perm[g % prompts.size()]];
      if (!p.error.empty()) {
        ++bc.skipped_prompts;
        metrics.write({{"event", "skip"}, {"rl_step", step}, {"id", p.id}, {"reason", p.error}});
        continue;
      }
      batch.push_back(&p);
      sample_ids.push_back(static_cast<uint32_t>(g));
    }

    // ---- responses: the student's rollouts, or clean responses for rm-ce ----
    struct Sample {
      uint32_t sample_id;
      const std::vector<int32_t>* prompt;
      std::vector<int32_t> response, step_map;
    };
    std::vector<Sample> samples;
    int64_t step_generated = 0, step_denoise = 0, eos_count = 0;
    if (use_rollouts) {
      diffusion::SamplerOptions so = sampler;
      so.max_new_tokens = max_new;
      so.step = ustep;
      std::vector<std::vector<int32_t>> ids;
      for (const auto* p : batch) ids.push_back(p->prompt);
      std::vector<diffusion::Rollout> rs;
      timed(rollout_s, [&] { rs = shared_bd_generate(student, ids, sample_ids, so, dp); });
      // The step's rollouts, tagged with the weights that made them (the unit a checkpoint saves).
      rollouts = diffusion::RolloutBuffer(sum.optimizer_steps, so);
      for (size_t i = 0; i < rs.size(); ++i)
        if (!rs[i].ok()) {
          ++bc.skipped_prompts;
          metrics.write({{"event", "skip"}, {"rl_step", step}, {"id", batch[i]->id}, {"reason", rs[i].error}});
        }
      rollouts.append_ok(rs);
      // A few rollouts as text with their denoising order, for `opdlm-logs rollouts` and the report.
      if (writer && o.sample_rollouts > 0 && (step == 0 || (step + 1) % o.sample_rollouts_every == 0)) {
        std::string lines;
        for (size_t i = 0; i < rollouts.size() && static_cast<int64_t>(i) < o.sample_rollouts; ++i) {
          const auto& r = rollouts[i];
          nlohmann::json pieces = nlohmann::json::array();
          for (int32_t t : r.response) pieces.push_back(tok.decode(std::span<const int32_t>(&t, 1)));
          lines += nlohmann::json({{"rl_step", step + 1}, {"sample_id", r.sample_id}, {"prompt", tok.decode(r.prompt)},
                                   {"prompt_ids", r.prompt}, {"response_ids", r.response}, {"response_pieces", pieces},
                                   {"step_map", r.step_map}, {"block_size", sampler.block_size},
                                   {"stopped_at_eos", r.stopped_at_eos}}).dump() + "\n";
        }
        std::ofstream out(rollouts_path, std::ios::app);
        out << lines;
      }
      for (const auto& r : rollouts) {
        ++bc.rollouts;
        step_generated += static_cast<int64_t>(r.response.size());
        step_denoise += r.denoise_forwards;
        eos_count += r.stopped_at_eos;
        // An estimate from the forward counts: the prefill (P tokens, mean context P/2), then b query
        // tokens per denoising or commit forward at the response's mean context P + R/2.
        const double P = static_cast<double>(r.prompt.size()), R = static_cast<double>(r.response.size());
        bc.rollout_flops += P * model::forward_flops_per_token(cfg, P / 2, false) +
                            static_cast<double>((r.denoise_forwards + r.commit_forwards) * sampler.block_size) *
                                model::forward_flops_per_token(cfg, P + R / 2);
        samples.push_back({r.sample_id, &r.prompt, r.response, r.step_map});
      }
      bc.generated_tokens += step_generated;
    } else if (o.ce_source == CeSource::gold) {
      for (size_t i = 0; i < batch.size(); ++i) {
        std::vector<int32_t> resp = batch[i]->gold;
        if (static_cast<int64_t>(resp.size()) > max_new) resp.resize(size_t(max_new));
        if (resp.empty()) continue;
        samples.push_back({sample_ids[i], &batch[i]->prompt, std::move(resp), {}});
      }
    } else {  // rm-ce on the teacher's own samples (sequence-level KD)
      model::ArGenerateOptions ao;
      ao.max_new_tokens = max_new;
      ao.sampling = ops::SamplingParams{1.0, 0, 1.0};
      ao.eos_id = spec.eos_id;
      ao.pad_id = spec.pad_id;
      ao.seed = o.seed;
      ao.step = ustep;
      // Each DP rank samples its share; the samples travel as rollouts (no step map).
      std::vector<std::vector<int32_t>> ids;
      for (const auto* p : batch) ids.push_back(p->prompt);
      const double t_generate = elapsed();
      const auto all = shared_generate(ids, sample_ids, dp, [&](const auto& mine_ids, const auto& mine_sids) {
        const auto gs = model::ar_generate(*teacher, mine_ids, mine_sids, ao);
        std::vector<diffusion::Rollout> rs(gs.size());
        for (size_t k = 0; k < gs.size(); ++k) {
          rs[k].sample_id = mine_sids[k];
          rs[k].prompt = mine_ids[k];
          rs[k].response = gs[k].tokens;
          rs[k].stopped_at_eos = gs[k].stopped_at_eos;
        }
        return rs;
      });
      rollout_s += elapsed() - t_generate;
      for (size_t i = 0; i < all.size(); ++i)
        if (!all[i].response.empty()) samples.push_back({sample_ids[i], &batch[i]->prompt, all[i].response, {}});
    }

    // ---- training rows ----
    struct Row {
      TrainingRow row;
      Tensor teacher_logp;
      size_t sample;
    };
    std::vector<Row> rows;
    int64_t masked_total = 0, slots_total = 0;
    for (size_t si = 0; si < samples.size(); ++si) {
      const Sample& s = samples[si];
      TrainingRow base;
      base.sample_id = s.sample_id;
      base.prompt = *s.prompt;
      base.x0 = s.response;
      std::vector<std::vector<uint8_t>> states;
      std::vector<double> t_block;
      if (o.mode == ConversionMode::opd) {
        if (o.selection == StateSelection::one_per_block)
          states.push_back(select_state_per_block(s.step_map, sampler.block_size, {o.seed, RngPurpose::state_select, ustep, s.sample_id, 0}));
        else
          states = all_rounds(s.step_map, sampler.block_size);
      } else {
        RandomState rs = random_states(base.L1(), sampler.block_size, {o.seed, RngPurpose::random_mask, ustep, s.sample_id, 0});
        states.push_back(std::move(rs.masked));
        t_block = std::move(rs.t);
      }
      for (auto& st : states) {
        Row r{base, Tensor(), si};
        r.row.masked = std::move(st);
        r.row.t_block = t_block;
        if (loss_positions(r.row, spec).empty()) continue;  // nothing to learn: dropped (B 4.3)
        masked_total += std::count(r.row.masked.begin(), r.row.masked.end(), uint8_t(1));
        slots_total += r.row.L1();
        rows.push_back(std::move(r));
      }
    }

    // ---- updates: rows_per_update rows per optimizer step, mean of row token-means ----
    double step_loss = 0, last_norm = 0;
    std::optional<nlohmann::json> rollback_cause;  // set when a policy asks to roll back: ends the step's updates
    int64_t step_rows = 0, step_updates = 0;
    std::vector<uint8_t> trained(samples.size(), 0);
    for (size_t u0 = 0; u0 < rows.size() && !budget_reached; u0 += size_t(o.rows_per_update)) {
      const size_t u1 = std::min(rows.size(), u0 + size_t(o.rows_per_update));
      const int64_t n = static_cast<int64_t>(u1 - u0);
      const double scale = 1.0 / static_cast<double>(n);
      // This rank's aligned block of the update's rows: per-row gradients are the leaves of the
      // canonical tree (absent rows are +0), so the sum does not depend on the DP size.
      const int64_t k0 = dp.rank() * rows_per_rank, k1 = std::min(n, k0 + rows_per_rank);
      // Per row slot: loss * scale, loss positions, student forward and backward FLOPs. Each slot is
      // filled by one rank, so the all-reduce sums it with zeros only: exact in any order.
      std::vector<double> slot(size_t(4 * n), 0.0);
      for (int64_t k = k0; k < k1; ++k) {
        Row& r = rows[u0 + size_t(k)];
        Tensor tlp;
        if (spec.objective == RowObjective::teacher_kl)
          timed(teacher_s, [&] { tlp = teacher_logprobs(*teacher, r.row.prompt, r.row.x0, loss_positions(r.row, spec)); });
        student.zero_grads();
        RowLoss l;
        timed(student_s, [&] { l = row_loss(student, tlp, r.row, spec, scale, acts); });
        tree.add(k - k0, student.flat_grads());
        slot[size_t(4 * k)] = l.loss * scale;
        slot[size_t(4 * k + 1)] = static_cast<double>(l.loss_positions);
        slot[size_t(4 * k + 2)] = l.student_forward_flops;
        slot[size_t(4 * k + 3)] = l.student_backward_flops;
      }
      tree.finish_into(student.flat_grads());
      if (u0 == 0 && injection_due("OPDLM_INJECT_NAN", cgrid.world_rank, step + 1))
        student.grads().get("model.layers.0.self_attn.q_proj.weight").data<float>()[0] = std::nanf("");
      if (u0 == 0 && injection_due("OPDLM_INJECT_SPIKE", cgrid.world_rank, step + 1))
        for (float& g : student.flat_grads()) g *= 1e4f;
      timed(optimizer_s, [&] { dp.all_reduce(std::span<double>(slot)); });
      // Counters of every row of the update, in row order (the same sums on every rank).
      double update_loss = 0;
      for (int64_t k = 0; k < n; ++k) {
        const Row& r = rows[u0 + size_t(k)];
        update_loss += slot[size_t(4 * k)];
        bc.rows += 1;
        bc.loss_positions += static_cast<int64_t>(slot[size_t(4 * k + 1)]);
        bc.student_forward_flops += slot[size_t(4 * k + 2)];
        bc.student_backward_flops += slot[size_t(4 * k + 3)];
        if (spec.objective == RowObjective::teacher_kl) {
          const auto js = loss_positions(r.row, spec);
          const int64_t T = static_cast<int64_t>(r.row.prompt.size()) + js.back();
          const ops::MaskDescriptor causal = ops::MaskDescriptor::causal();
          bc.teacher_flops += model::forward_flops(teacher->full_config(), std::span(&causal, 1), 1, T, T,
                                                   static_cast<int64_t>(js.size()));
        }
        if (!trained[r.sample]) {
          trained[r.sample] = 1;
          bc.train_prompt_tokens += static_cast<int64_t>(r.row.prompt.size());
          bc.train_response_tokens += r.row.L1();
        }
      }
      // A non-finite loss (the same sum on every rank) or gradient norm (non-finite on every rank when
      // any rank's gradient is): numerics.on_nonfinite decides, the same way on every rank. Returns
      // whether the step must end for a roll-back.
      auto nonfinite = [&](const char* what, double value) -> bool {
        // Only here, off the hot path: this rank's part of the gradient (left as it was by the
        // optimizer) is where a NaN or inf can be named with its rank, tensor and step.
        if (const std::string bad = first_nonfinite(student.grads()); !bad.empty())
          OPDLM_LOG(error) << "non-finite gradient on rank " << cgrid.world_rank << " (TP " << tp_grid.rank() << ", DP "
                           << dp.rank() << ") at RL step " << step + 1 << ", update " << step_updates + 1 << ": " << bad;
        if (o.on_nonfinite == "abort")
          OPDLM_FAIL_AT(o.origin_of("numerics.on_nonfinite"), "numerics.on_nonfinite", "non-finite ", what, " ", value, " at RL step ", step + 1,
                        " (the log names the rank and tensor; lower optim.lr, raise optim.warmup_steps, or set "
                        "numerics.on_nonfinite = skip or rollback)");
        nlohmann::json ev = {{"event", "nonfinite"}, {"rl_step", step + 1}, {"update", step_updates + 1},
                             {"what", what}, {"value", std::to_string(value)}, {"policy", o.on_nonfinite}};
        if (o.on_nonfinite == "rollback" && last_checkpoint >= 0) {
          rollback_cause = ev;
          return true;
        }
        if (o.on_nonfinite == "rollback") ev["policy"] = "skip (no checkpoint to roll back to yet)";
        ++sum.skipped_updates;
        ev["skipped_updates"] = sum.skipped_updates;
        metrics.write(ev);
        OPDLM_LOG(warning) << "non-finite " << what << " at RL step " << step + 1 << ": update skipped ("
                           << sum.skipped_updates << " so far)";
        return false;
      };
      // A loss or gradient norm far above its window: numerics.on_spike decides (the same values, so the
      // same decision, on every rank). Returns whether the update goes ahead.
      auto spike = [&](const char* metric, const Spike& sp) -> bool {
        nlohmann::json ev = {{"event", "spike"}, {"rl_step", step + 1}, {"update", step_updates + 1}, {"metric", metric},
                             {"value", sp.value}, {"window_mean", sp.mean}, {"window_std", sp.stddev},
                             {"threshold", sp.threshold}, {"policy", o.on_spike}};
        OPDLM_LOG(warning) << metric << " spike at RL step " << step + 1 << ", update " << step_updates + 1 << ": "
                           << sp.value << " > " << sp.threshold << " (window mean " << sp.mean << ", std " << sp.stddev
                           << "); numerics.on_spike = " << o.on_spike;
        if (o.on_spike == "abort")
          OPDLM_FAIL_AT(o.origin_of("numerics.on_spike"), "numerics.on_spike", metric, " spike ", sp.value, " at RL step ", step + 1,
                        " (threshold ", sp.threshold, ", window mean ", sp.mean, ")");
        if (o.on_spike == "warn") {
          metrics.write(ev);
          return true;
        }
        if (o.on_spike == "rollback" && last_checkpoint >= 0) {
          rollback_cause = ev;
          return false;
        }
        if (o.on_spike == "rollback") ev["policy"] = "skip (no checkpoint to roll back to yet)";
        ++sum.skipped_updates;
        ev["skipped_updates"] = sum.skipped_updates;
        metrics.write(ev);
        return false;
      };
      if (!std::isfinite(update_loss)) {
        if (nonfinite("loss", update_loss)) break;
        continue;
      }
      if (auto sp = loss_spikes.check(update_loss); sp && !spike("loss", *sp)) {
        if (rollback_cause) break;
        continue;
      }
      ops::AdamWConfig adam = o.adam;
      adam.lr = o.schedule.at(sum.optimizer_steps);
      // Sums the ranks' parts over DP, clips to the global norm, updates each shard, all-gathers; a
      // norm spike vetoes the update before anything changes.
      bool vetoed = false;
      double norm = 0;
      timed(optimizer_s, [&] {
        norm = optimizer.step(grads, sum.optimizer_steps + 1, adam, o.grad_clip, [&](double g) {
          if (auto sp = norm_spikes.check(g); sp && !spike("grad_norm", *sp)) vetoed = true;
          return !vetoed;
        });
      });
      if (!std::isfinite(norm)) {  // nothing was updated (ShardedAdamW returns before touching the shard)
        if (nonfinite("gradient norm", norm)) break;
        continue;
      }
      if (vetoed) {
        if (rollback_cause) break;
        continue;
      }
      loss_spikes.push(update_loss);
      norm_spikes.push(norm);
      ++sum.optimizer_steps;
      ++step_updates;
      step_loss += update_loss;
      step_rows += n;
      last_norm = norm;
      save_milestones(step + 1);
      if (o.max_train_tokens > 0 && bc.train_tokens() >= o.max_train_tokens) budget_reached = true;
    }
    // ---- a roll-back: the last committed checkpoint, then the steps after it again, this batch skipped ----
    if (rollback_cause) {
      if (static_cast<int64_t>(skip_batches.size()) >= o.max_rollbacks)
        OPDLM_FAIL_AT(o.origin_of("numerics.max_rollbacks"), "numerics.max_rollbacks", "RL step ", step + 1, " asks for roll-back number ",
                      skip_batches.size() + 1, " (", rollback_cause->dump(), "); the run has already skipped the batches of ",
                      nlohmann::json(skip_batches).dump(), ": lower optim.lr or inspect the data");
      std::vector<std::string> skipped;
      const std::string dir = choose_resume_checkpoint("auto", ckpt_root, cgrid, &skipped);
      for (const auto& why : skipped) OPDLM_LOG(warning) << "roll-back: skipped " << why;
      if (dir.empty()) OPDLM_FAIL_AT(ckpt_root, "LATEST", "a roll-back found no committed checkpoint that verifies");
      const RunState st = read_run_state(dir);
      std::set<int64_t> skips = skip_batches;
      skips.insert(step + 1);
      restore(dir, st);
      skip_batches.insert(skips.begin(), skips.end());
      ++sum.rollbacks;
      if (metrics_log) {
        const auto offset = st.meta.at("metrics_offset").get<uintmax_t>();
        keep_lost_lines(metrics_path, offset, "rollback");
        metrics_log->truncate(offset);
        cut_rollout_samples(rollouts_path, start_step);
      }
      metrics.write({{"event", "checkpoint"}, {"rl_step", start_step}, {"path", dir}});
      metrics.write({{"event", "rollback"}, {"rl_step", step + 1}, {"to", dir}, {"to_rl_step", start_step},
                     {"cause", *rollback_cause}, {"skip_batches", skip_batches}});
      OPDLM_LOG(warning) << "rolled back from RL step " << step + 1 << " to the checkpoint " << dir << " (RL step "
                         << start_step << "); the batch of RL step " << step + 1 << " will be skipped. Cause: "
                         << rollback_cause->dump();
      step = start_step - 1;  // the loop's ++ makes it start_step
      continue;
    }
    sum.rl_steps = step + 1;
    sum.final_loss = step_updates ? step_loss / static_cast<double>(step_updates) : 0;
    // ---- the step's one agreement over the grid: stop flags, and each rank's busy time ----
    // A stop signal on any rank, or too little time left for another step and a save, stops every
    // rank after this step's log line, probe, save and checkpoint. The same all-reduce carries each
    // rank's time outside collectives this step (stragglers show up there, not in the step time).
    const double step_s = elapsed() - t_step;
    const double comm_s = parallel::flight_recorder().comm_seconds() - comm_at_start;
    const double margin = 1.5 * std::max(max_step_s, step_s) + 1.5 * max_checkpoint_s + 5.0;
    std::vector<int64_t> agree(size_t(2 + world_size), 0);
    agree[0] = stop_signal() != 0 ? 1 : 0;
    agree[1] = deadline > 0 && deadline - elapsed() < margin ? 1 : 0;
    agree[size_t(2 + cgrid.world_rank)] = std::llround((step_s - comm_s) * 1e6);
    grid_sum(cgrid, std::span<int64_t>(agree));
    if ((step + 1) % o.log_every == 0 || step + 1 == o.rl_steps || budget_reached) {
      const double secs = elapsed();
      const double n_samples = static_cast<double>(std::max<size_t>(samples.size(), 1));
      nlohmann::json j = {{"event", "step"}, {"rl_step", step + 1}, {"optimizer_steps", sum.optimizer_steps},
                          {"loss", sum.final_loss}, {"grad_norm", last_norm},
                          {"lr", o.schedule.at(std::max<int64_t>(sum.optimizer_steps - 1, 0))},
                          {"max_new_tokens", max_new}, {"samples", samples.size()}, {"rows", step_rows},
                          {"masked_fraction", slots_total ? double(masked_total) / double(slots_total) : 0.0},
                          {"elapsed_s", secs},
                          {"train_tokens_per_s", static_cast<double>(bc.train_tokens() - tokens_at_attempt_start) / secs},
                          {"budget", budget_to_json(bc)}};
      j["budget"]["train_tokens"] = bc.train_tokens();
      if (skip_batch) j["skipped_batch"] = true;
      if (use_rollouts) {
        j["mean_response_len"] = static_cast<double>(step_generated) / n_samples;
        j["eos_rate"] = static_cast<double>(eos_count) / n_samples;
        j["rollout_tokens_per_forward"] = step_denoise ? double(step_generated) / double(step_denoise) : 0.0;
      }
      // Who, where, how long (docs/logs.md): rank 0's phase times, every rank's busy time, FLOPs, MFU.
      const double flops = (bc.rollout_flops - bc_at_start.rollout_flops) + (bc.teacher_flops - bc_at_start.teacher_flops) +
                           (bc.student_forward_flops - bc_at_start.student_forward_flops) +
                           (bc.student_backward_flops - bc_at_start.student_backward_flops);
      std::vector<double> busy;
      for (int r = 0; r < world_size; ++r) busy.push_back(static_cast<double>(agree[size_t(2 + r)]) * 1e-6);
      j["run_id"] = run_id;
      j["slurm_job_id"] = slurm_job_id();
      j["layout"] = {{"tp", tp_grid.size()}, {"dp", dp.size()}};
      j["timings"] = {{"step_s", step_s}, {"rollout_s", rollout_s}, {"teacher_s", teacher_s}, {"student_s", student_s},
                      {"optimizer_s", optimizer_s}, {"communication_s", comm_s}};
      j["busy_s_by_rank"] = busy;
      j["flops"] = flops;
      j["mfu"] = o.peak_flops > 0 ? nlohmann::json(flops / (step_s * o.peak_flops * world_size)) : nlohmann::json(nullptr);
      metrics.write(j);
      // The progress line: one per logged step, also in batch logs (docs/logs.md).
      const double per_step = (secs - first_step_at) / static_cast<double>(step + 1 - start_step);
      std::ostringstream line;
      line << mode << " RL step " << step + 1 << "/" << o.rl_steps << " loss " << sum.final_loss << " |g| " << last_norm
           << " rows " << step_rows << " train tokens " << bc.train_tokens() << " ("
           << static_cast<int64_t>(static_cast<double>(bc.train_tokens() - tokens_at_attempt_start) / secs) << "/s)";
      if (use_rollouts && step_denoise) line << " tok/fwd " << std::setprecision(3) << double(step_generated) / double(step_denoise);
      if (sum.probe_own_kl_last >= 0) line << " probe KL " << std::setprecision(4) << sum.probe_own_kl_last;
      line << " ETA " << format_duration(per_step * static_cast<double>(o.rl_steps - step - 1));
      OPDLM_LOG(info) << line.str();
    }
    if (o.probe_every > 0 && (step + 1) % o.probe_every == 0 && step + 1 < o.rl_steps && !budget_reached) run_probe(step + 1);
    if (o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < o.rl_steps && !budget_reached) save(step + 1);
    if (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 && step + 1 < o.rl_steps && !budget_reached)
      checkpoint(step + 1);
    max_step_s = std::max(max_step_s, elapsed() - t_step);
    if (watchdog) watchdog->set_expected(std::max(max_step_s, max_checkpoint_s));
    if (step + 1 < o.rl_steps && !budget_reached) {
      const int64_t* flags = agree.data();
      if (flags[0] > 0 || flags[1] > 0) {
        sum.stopped = flags[0] > 0 ? "signal" : "time limit";
        if (last_checkpoint != step + 1) checkpoint(step + 1);
        metrics.write({{"event", "stop"}, {"rl_step", step + 1}, {"reason", sum.stopped},
                       {"signal", stop_signal()}, {"ranks_signalled", flags[0]}, {"elapsed_s", elapsed()},
                       {"margin_s", margin}, {"checkpoint", ckpt_root + "/" + io::checkpoint_dir_name(step + 1)}});
        OPDLM_LOG(warning) << "stopping after RL step " << step + 1 << " (" << sum.stopped << "): checkpoint "
                           << ckpt_root << "/" << io::checkpoint_dir_name(step + 1) << " committed; exit "
                           << kExitRequeue << " to be requeued (resume with --run.resume=auto)";
        sum.wall_s = elapsed();
        return sum;
      }
    }
  }
  set_error_step(-1);
  if (o.checkpoint_every > 0 && last_checkpoint != sum.rl_steps) checkpoint(sum.rl_steps);
  run_probe(sum.rl_steps);
  sum.wall_s = elapsed();
  save(sum.rl_steps);
  metrics.write({{"event", "end"}, {"mode", mode}, {"rl_steps", sum.rl_steps}, {"optimizer_steps", sum.optimizer_steps},
                 {"train_tokens", bc.train_tokens()}, {"generated_tokens", bc.generated_tokens},
                 {"loss_positions", bc.loss_positions}, {"wall_s", sum.wall_s}, {"final_loss", sum.final_loss},
                 {"budget_reached", budget_reached}, {"probe_own_kl_first", sum.probe_own_kl_first},
                 {"probe_own_kl_last", sum.probe_own_kl_last}, {"probe_random_kl_last", sum.probe_random_kl_last}});
  return sum;
}

}  // namespace opdlm::train
