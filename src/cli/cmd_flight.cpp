// `opdlm flight PATH [--json]`: merges the per-rank flight records a hang left (the watchdog's
// rank<r>.json) and names the collective the ranks wait in and the ranks that never arrived
// (docs/fault_tolerance.md). PATH: a record directory, RUN/flight, or a run directory (its newest).
#include <boost/program_options.hpp>
#include <filesystem>
#include <iostream>

#include "commands.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/parallel/flight_analysis.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace opdlm;

namespace {

bool has_records(const fs::path& dir) {
  if (!fs::is_directory(dir)) return false;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("rank", 0) == 0 && e.path().extension() == ".json") return true;
  }
  return false;
}

// The record directory PATH names: itself, or the newest attempt under PATH or PATH/flight.
std::string resolve(const std::string& path) {
  if (has_records(path)) return path;
  for (const fs::path root : {fs::path(path), fs::path(path) / "flight"}) {
    if (!fs::is_directory(root)) continue;
    fs::path newest;
    for (const auto& e : fs::directory_iterator(root))
      if (has_records(e.path()) && (newest.empty() || e.path().filename() > newest.filename())) newest = e.path();
    if (!newest.empty()) return newest.string();
  }
  OPDLM_FAIL_AT(path, "", "no flight records (rank<N>.json) here, under it, or under its flight/ folder");
}

int run_flight(const std::vector<std::string>& args) {
  po::options_description d(
      "opdlm flight PATH [--json]: merge the per-rank flight records a hang left and name the collective the ranks "
      "wait in and the ranks that never arrived. PATH: a record directory, RUN/flight or a run directory");
  std::string path;
  d.add_options()("help", "show help")("path", po::value(&path)->required(), "record directory or run directory")(
      "json", "print the diagnosis as JSON");
  po::positional_options_description pos;
  pos.add("path", 1);
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm, &pos)) return cli::kExitOk;
  const std::string dir = resolve(path);
  const auto diag = parallel::diagnose_hang(parallel::read_flight_dir(dir));
  if (vm.count("json")) {
    nlohmann::json j = diag.to_json();
    j["dir"] = dir;
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << "flight records in " << dir << "\n" << diag.text();
  }
  return cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("flight", "merge the per-rank flight records of a hang: the collective and the ranks that never arrived", run_flight);
