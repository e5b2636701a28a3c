// `opdlm ckpt inspect|verify PATH`: what a training checkpoint holds (step, layout, sizes, counters,
// config) and whether every checksum holds (docs/checkpoint.md). PATH is a checkpoint directory, a
// checkpoint root (its LATEST is used) or a run directory (RUN/checkpoints/LATEST).
#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/checkpoint.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace opdlm;

namespace {

// The checkpoint directory PATH names.
std::string resolve(const std::string& path) {
  if (fs::is_regular_file(fs::path(path) / io::kCheckpointManifest)) return path;
  for (const std::string root : {path, path + "/checkpoints"}) {
    const std::string latest = root + "/LATEST";
    if (!fs::is_regular_file(latest)) continue;
    std::ifstream in(latest);
    std::string name;
    in >> name;
    if (name.empty()) OPDLM_FAIL_AT(latest, "", "LATEST is empty");
    return root + "/" + name;
  }
  if (fs::is_directory(path)) {
    const auto all = io::committed_checkpoints(path);
    if (!all.empty()) return all.front();
  }
  OPDLM_FAIL_AT(path, "", "not a checkpoint directory, a checkpoint root with LATEST, or a run directory with checkpoints/");
}

int run_ckpt(const std::vector<std::string>& args) {
  po::options_description d(
      "opdlm ckpt inspect|verify PATH: what a checkpoint holds / check every size and checksum (exit 1 and the bad "
      "file and dataset when one fails). PATH: a checkpoint directory, a checkpoint root or a run directory");
  std::string action, path;
  d.add_options()("help", "show help")("action", po::value(&action)->required(), "inspect | verify")(
      "path", po::value(&path)->required(), "checkpoint directory, checkpoint root or run directory")(
      "config", "inspect: also print the resolved config the run was started with");
  po::positional_options_description pos;
  pos.add("action", 1).add("path", 1);
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm, &pos)) return cli::kExitOk;
  if (action != "inspect" && action != "verify")
    OPDLM_FAIL_AT("command line", "action", "'", action, "' is not inspect or verify");
  const std::string dir = resolve(path);
  if (action == "verify") {
    const nlohmann::json m = io::verify_checkpoint(dir);
    int64_t bytes = 0;
    for (const auto& f : m["files"]) bytes += f.value("bytes", int64_t{0});
    std::cout << "ok " << dir << ": " << m["files"].size() << " files, " << bytes
              << " bytes; every size, file and dataset checksum (XXH3-64) matches\n";
    return cli::kExitOk;
  }
  const std::string mpath = dir + "/" + io::kCheckpointManifest;
  std::ifstream in(mpath);
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    OPDLM_FAIL_AT(mpath, "manifest", "not valid JSON: ", e.what());
  }
  const io::CheckpointFile state = io::read_checkpoint_file(dir + "/state.h5");
  const nlohmann::json& s = state.meta;
  const nlohmann::json budget = s.value("budget", nlohmann::json::object());
  nlohmann::json out = {
      {"checkpoint", dir},
      {"rl_step", m.value("rl_step", int64_t{-1})},
      {"run_id", s.value("run_id", "")},
      {"mode", s.value("mode", "")},
      {"layout", m.value("layout", nlohmann::json::object())},
      {"optimizer_steps", s.value("optimizer_steps", int64_t{0})},
      {"train_tokens", budget.value("train_prompt_tokens", int64_t{0}) + budget.value("train_response_tokens", int64_t{0})},
      {"lr_next", s.value("lr_next", 0.0)},
      {"data_cursor", s.value("data_cursor", nlohmann::json::object())},
      {"rng", s.value("rng", nlohmann::json::object())},
      {"numerics", s.value("numerics", nlohmann::json::object())},  // spike windows, batches skipped by roll-backs
      {"teacher", s.value("teacher", nlohmann::json::object())},
      {"rollouts", s.value("rollouts", nlohmann::json::object())},
      {"metrics_offset", s.value("metrics_offset", int64_t{0})},
      {"config_sha256", s.value("config_sha256", "")},
      {"files", m.value("files", nlohmann::json::array())}};
  std::cout << out.dump(2) << "\n";
  if (vm.count("config")) std::cout << s.value("config", "") << "\n";
  return cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("ckpt", "inspect or verify a training checkpoint (step, layout, sizes, checksums)", run_ckpt);
