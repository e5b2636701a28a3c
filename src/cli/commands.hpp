// Subcommand registry of the `opdlm` binary: each src/cli/cmd_*.cpp registers itself with
// OPDLM_SUBCOMMAND, so adding a command touches no shared file.
#pragma once

#include <boost/program_options.hpp>
#include <functional>
#include <string>
#include <vector>

namespace opdlm::cli {

// Exit codes are part of the interface (slurm/ scripts read them); docs/cli.md lists them.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;

struct Subcommand {
  std::string name;
  std::string summary;
  std::function<int(const std::vector<std::string>& args)> run;  // args after the subcommand name
};

std::vector<Subcommand>& registry();

// Parses a subcommand's flags into vm. Returns true when --help was given (the help is printed and
// the caller should exit 0); boost::program_options errors propagate to main (exit 2).
bool parse_or_print_help(const std::vector<std::string>& args, const boost::program_options::options_description& desc,
                         boost::program_options::variables_map& vm,
                         const boost::program_options::positional_options_description* positional = nullptr);

struct Registrar {
  Registrar(std::string name, std::string summary, std::function<int(const std::vector<std::string>&)> run) {
    registry().push_back({std::move(name), std::move(summary), std::move(run)});
  }
};

}  // namespace opdlm::cli

#define OPDLM_SUBCOMMAND_CAT2(a, b) a##b
#define OPDLM_SUBCOMMAND_CAT(a, b) OPDLM_SUBCOMMAND_CAT2(a, b)
// OPDLM_SUBCOMMAND("tokenizer", "train / encode / decode a BPE tokenizer", run_tokenizer);
#define OPDLM_SUBCOMMAND(name, summary, fn) \
  static ::opdlm::cli::Registrar OPDLM_SUBCOMMAND_CAT(opdlm_subcommand_, __LINE__)(name, summary, fn)
