// `opdlm train --mode ar | opd | rm-kl | rm-ce --config FILE.ini [--section.key=value ...]`:
// autoregressive pretraining or SFT of a teacher, or AR-to-DLM conversion of a teacher.
#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "opdlm/base/config.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/base/stop.hpp"
#include "opdlm/io/model_file.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/train/ar_trainer.hpp"
#include "opdlm/train/opd_trainer.hpp"

namespace {

// The world size an MPI launcher announced (Open MPI's mpirun / srun --mpi=pmix), without starting MPI.
int launched_ranks() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"})
    if (const char* v = std::getenv(var)) return std::max(1, std::atoi(v));
  return 1;
}

// The preflight of the layout against the model and the environment (parallel/process_grid.hpp).
opdlm::parallel::GridShape preflight_layout(const opdlm::train::OpdTrainOptions& o, int world_size) {
  const std::string model_file = o.student_init.empty() ? o.teacher : o.student_init;
  const auto info = opdlm::io::read_model_info(model_file);
  opdlm::parallel::PreflightInput in;
  in.shape = {world_size, o.tp};
  in.config_file = o.parallel_origin;
  in.model_file = model_file;
  in.num_heads = info.config.num_attention_heads;
  in.num_kv_heads = info.config.num_key_value_heads;
  in.intermediate_size = info.config.intermediate_size;
  in.vocab_size = info.config.vocab_size;
  if (const char* v = std::getenv("SLURM_NTASKS")) in.slurm_ntasks = std::atoll(v);
  in.check_slurm_ntasks = o.check_slurm_ntasks;
  in.deterministic_shards = o.deterministic_shards;
  const opdlm::parallel::TpPlan plan = opdlm::parallel::preflight(in);
  if (plan.kv_replication > 1)
    OPDLM_FAIL_AT(in.config_file, "parallel.tp", "parallel.tp = ", plan.tp, " exceeds num_key_value_heads = ",
                  in.num_kv_heads, " of ", model_file, ": replicating KV heads is not supported by the TP model yet");
  for (const auto& note : plan.notes) OPDLM_LOG(info) << "tensor parallel: " << note;
  return in.shape;
}

int run_train(const std::vector<std::string>& args) {
  std::string mode, config;
  std::vector<std::string> overrides;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    // "--flag value" or "--flag=value"; exact names only (--model.x must not match --mode).
    auto is_flag = [&](const std::string& flag) { return a == flag || a.rfind(flag + "=", 0) == 0; };
    auto value = [&](const std::string& flag) -> std::string {
      if (a.size() > flag.size()) return a.substr(flag.size() + 1);
      if (i + 1 >= args.size()) OPDLM_FAIL_AT("command line", flag.substr(2), "missing value");
      return args[++i];
    };
    if (a == "--help" || a == "-h") {
      std::cout << "Usage: opdlm train --mode ar|opd|rm-kl|rm-ce --config FILE.ini [--section.key=value ...]\n\n"
                << opdlm::train::ArTrainOptions::schema() << "\n"
                << opdlm::train::OpdTrainOptions::schema() << "\n";
      return opdlm::cli::kExitOk;
    }
    if (is_flag("--mode")) mode = value("--mode");
    else if (is_flag("--config")) config = value("--config");
    else overrides.push_back(a);
  }
  if (mode.empty()) OPDLM_FAIL_AT("command line", "mode", "--mode is required (ar, opd, rm-kl, rm-ce)");
  if (mode != "ar") {
    const auto conv = opdlm::train::parse_conversion_mode(mode);
    opdlm::ResolvedConfig cfg = opdlm::load_config(opdlm::train::OpdTrainOptions::schema(), config, overrides);
    auto opts = opdlm::train::OpdTrainOptions::from_config(cfg, conv);
    // Layout errors name where parallel.tp came from: the command line, the config file, or the
    // config file it would go in when defaulted.
    if (opts.parallel_origin == "default" || opts.parallel_origin.empty())
      opts.parallel_origin = config.empty() ? "config (parallel.tp defaulted to 1)" : config;
    // One binary for every launch: a singleton MPI world without mpirun, the launcher's world with it.
    auto world = opdlm::parallel::MpiCommunicator::world();
    opdlm::LogOptions lo;
    lo.rank = world->rank();
    opdlm::init_logging(lo);
    opdlm::parallel::ProcessGrid grid(world, preflight_layout(opts, world->size()));
    const opdlm::train::TrainGrid tg{&grid.dp(), world->rank() == 0, &grid.tp()};
    opdlm::install_stop_handlers();
    auto s = opdlm::train::run_opd_training(opts, cfg.table(), tg);
    const int code = s.stopped.empty() ? opdlm::cli::kExitOk : opdlm::kExitRequeue;
    if (world->rank() != 0) return code;  // one summary line per job
    const auto& b = s.budget;
    nlohmann::json j = {{"mode", mode}, {"params", s.params}, {"rl_steps", s.rl_steps},
                        {"optimizer_steps", s.optimizer_steps}, {"train_tokens", b.train_tokens()},
                        {"generated_tokens", b.generated_tokens}, {"loss_positions", b.loss_positions},
                        {"rows", b.rows}, {"wall_s", s.wall_s}, {"final_loss", s.final_loss},
                        {"probe_own_kl_first", s.probe_own_kl_first}, {"probe_own_kl_last", s.probe_own_kl_last},
                        {"probe_random_kl_last", s.probe_random_kl_last}, {"model", s.model_path}};
    if (!s.stopped.empty()) j["stopped"] = s.stopped;
    std::cout << j.dump() << "\n";
    return code;
  }
  if (launched_ranks() > 1)
    OPDLM_FAIL_AT("environment", "OMPI_COMM_WORLD_SIZE", "--mode ar (teacher pretraining) runs on one process; ",
                  "launch it without mpirun/srun tasks (the conversion modes are the ones that run on a TP x DP grid)");
  opdlm::ResolvedConfig cfg = opdlm::load_config(opdlm::train::ArTrainOptions::schema(), config, overrides);
  auto opts = opdlm::train::ArTrainOptions::from_config(cfg);
  auto s = opdlm::train::run_ar_training(opts, cfg.table());
  nlohmann::json j = {{"params", s.params}, {"steps", s.steps}, {"tokens", s.tokens}, {"wall_s", s.wall_s},
                      {"tokens_per_s", s.tokens_per_s}, {"final_train_loss", s.final_train_loss},
                      {"eval_loss", s.eval_loss}, {"eval_ppl", s.eval_ppl}, {"unigram_ppl", s.unigram_ppl},
                      {"model", s.model_path}};
  std::cout << j.dump() << "\n";
  return opdlm::cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("train", "train a model (--mode ar: teacher pretraining/SFT; opd | rm-kl | rm-ce: AR-to-DLM conversion)", run_train);
