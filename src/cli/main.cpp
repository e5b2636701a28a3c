// The `opdlm` command-line binary: global flags (--help, --version) and subcommand dispatch.
// Subcommands register in kSubcommands; each parses its own flags with Boost.Program_options.
#include <boost/program_options.hpp>
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"

#include "opdlm/base/build_info.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/base/rng.hpp"
#include "opdlm/parallel/communicator.hpp"

namespace po = boost::program_options;

namespace {

using opdlm::cli::kExitError;
using opdlm::cli::kExitOk;
using opdlm::cli::kExitUsage;

std::vector<opdlm::cli::Subcommand> sorted_commands() {
  auto cmds = opdlm::cli::registry();
  std::sort(cmds.begin(), cmds.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return cmds;
}

void print_usage(std::ostream& os) {
  os << "Usage: opdlm [--help] [--version] <subcommand> [options]\n\n"
        "opdlm converts a Qwen3 autoregressive LM into a block-diffusion LM by on-policy distillation.\n\n"
        "Subcommands:\n";
  for (const auto& s : sorted_commands()) {
    os << "  " << s.name;
    for (size_t i = s.name.size(); i < 12; ++i) os << ' ';
    os << s.summary << "\n";
  }
  os << "\nRun `opdlm <subcommand> --help` for its options.\n";
}

int cmd_version(const std::vector<std::string>&) {
  std::cout << "opdlm " << opdlm::kVersion << " (" << opdlm::kBuildType << ", " << opdlm::kCxxCompiler
#ifdef OPDLM_HAVE_CUDA
            << ", CUDA on"
#else
            << ", CUDA off"
#endif
            << ")\n";
  return kExitOk;
}

int cmd_rng(const std::vector<std::string>& args) {
  po::options_description desc("opdlm rng: print uniform draws of one counter-RNG key");
  uint32_t seed = 0, purpose = 0, step = 0, sample = 0, position = 0, count = 4;
  desc.add_options()("help", "show this help")
      ("seed", po::value(&seed)->default_value(0), "seed (32 bit)")
      ("purpose", po::value(&purpose)->default_value(0), "purpose id (see include/opdlm/base/rng.hpp)")
      ("step", po::value(&step)->default_value(0), "step")
      ("sample", po::value(&sample)->default_value(0), "global sample id")
      ("position", po::value(&position)->default_value(0), "position")
      ("count", po::value(&count)->default_value(4), "number of 32-bit words");
  po::variables_map vm;
  if (opdlm::cli::parse_or_print_help(args, desc, vm)) return kExitOk;
  opdlm::CounterRng rng({seed, static_cast<opdlm::RngPurpose>(purpose), step, sample, position});
  for (uint32_t i = 0; i < count; ++i) std::printf("%u %08x %.9f\n", i, rng.u32(i), rng.uniform(i));
  return kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("version", "print the version and build facts", cmd_version);
OPDLM_SUBCOMMAND("rng", "print counter-RNG draws for a key (reproducibility checks across machines)", cmd_rng);

namespace opdlm::cli {
std::vector<Subcommand>& registry() {
  static std::vector<Subcommand> r;
  return r;
}

bool parse_or_print_help(const std::vector<std::string>& args, const po::options_description& desc,
                         po::variables_map& vm, const po::positional_options_description* positional) {
  po::command_line_parser p(args);
  p.options(desc);
  if (positional) p.positional(*positional);
  po::store(p.run(), vm);
  if (vm.count("help")) {
    std::cout << desc << "\n";
    return true;
  }
  po::notify(vm);
  return false;
}
}  // namespace opdlm::cli

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty()) {
      print_usage(std::cerr);
      return kExitUsage;
    }
    const std::string& first = args[0];
    if (first == "--help" || first == "-h" || first == "help") {
      print_usage(std::cout);
      return kExitOk;
    }
    if (first == "--version") return cmd_version({});
    for (const auto& s : opdlm::cli::registry())
      if (first == s.name) {
        opdlm::init_logging({});
        return s.run(std::vector<std::string>(args.begin() + 1, args.end()));
      }
    std::cerr << "opdlm: unknown " << (first.rfind("-", 0) == 0 ? "option '" : "subcommand '") << first
              << "'\n\n";
    print_usage(std::cerr);
    return kExitUsage;
  } catch (const po::error& e) {
    std::cerr << "opdlm: command line: " << e.what() << std::endl;
    opdlm::parallel::MpiRuntime::abort_if_parallel(kExitUsage);
    return kExitUsage;
  } catch (const opdlm::Error& e) {
    std::cerr << "opdlm: error: " << e.what() << std::endl;
    opdlm::parallel::MpiRuntime::abort_if_parallel(kExitError);
    return kExitError;
  } catch (const std::exception& e) {
    std::cerr << "opdlm: unexpected error: " << e.what() << std::endl;
    opdlm::parallel::MpiRuntime::abort_if_parallel(kExitError);
    return kExitError;
  }
}
