// `opdlm train --mode ar | opd | rm-kl | rm-ce --config FILE.ini [--section.key=value ...]`:
// autoregressive pretraining or SFT of a teacher, or AR-to-DLM conversion of a teacher.
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "opdlm/base/config.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/train/ar_trainer.hpp"
#include "opdlm/train/opd_trainer.hpp"

namespace {

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
    auto s = opdlm::train::run_opd_training(opts, cfg.table());
    const auto& b = s.budget;
    nlohmann::json j = {{"mode", mode}, {"params", s.params}, {"rl_steps", s.rl_steps},
                        {"optimizer_steps", s.optimizer_steps}, {"train_tokens", b.train_tokens()},
                        {"generated_tokens", b.generated_tokens}, {"loss_positions", b.loss_positions},
                        {"rows", b.rows}, {"wall_s", s.wall_s}, {"final_loss", s.final_loss},
                        {"probe_own_kl_first", s.probe_own_kl_first}, {"probe_own_kl_last", s.probe_own_kl_last},
                        {"probe_random_kl_last", s.probe_random_kl_last}, {"model", s.model_path}};
    std::cout << j.dump() << "\n";
    return opdlm::cli::kExitOk;
  }
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
