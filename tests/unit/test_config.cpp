// Tests for the INI + command-line config loader: precedence, defaults, and errors naming the file
// and the key for unknown keys, malformed values and out-of-range values.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "opdlm/base/config.hpp"
#include "test_util.hpp"

namespace po = boost::program_options;
using namespace opdlm;

namespace {
po::options_description schema() {
  po::options_description d("test");
  d.add_options()("optim.lr", po::value<double>()->default_value(1e-3), "learning rate")(
      "optim.max_steps", po::value<int64_t>()->default_value(100), "steps")(
      "run.out_dir", po::value<std::string>(), "output")("run.verbose", po::value<bool>()->default_value(false), "");
  return d;
}

std::string write_ini(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}
}  // namespace

TEST(Config, FileThenCommandLineOverrides) {
  const auto ini = write_ini("ok.ini", "[optim]\nlr = 0.01\nmax_steps = 7\n[run]\nout_dir = runs/x\n");
  ResolvedConfig c = load_config(schema(), ini, {"--optim.max_steps=9"});
  EXPECT_DOUBLE_EQ(c.get<double>("optim.lr"), 0.01);
  EXPECT_EQ(c.get<int64_t>("optim.max_steps"), 9);
  EXPECT_EQ(c.get<std::string>("run.out_dir"), "runs/x");
  EXPECT_FALSE(c.get<bool>("run.verbose"));
  EXPECT_EQ(c.origin.at("optim.max_steps"), "command line");
  EXPECT_EQ(c.origin.at("optim.lr"), ini);
  EXPECT_EQ(c.origin.at("run.verbose"), "default");
  const std::string table = c.table();
  EXPECT_NE(table.find("optim.max_steps"), std::string::npos);
  EXPECT_NE(table.find("(command line)"), std::string::npos);
}

TEST(Config, EmptyCommandLineValueClearsAStringKey) {
  const auto ini = write_ini("clear.ini", "[run]\nout_dir = runs/x\n");
  ResolvedConfig c = load_config(schema(), ini, {"--run.out_dir="});
  EXPECT_EQ(c.get<std::string>("run.out_dir"), "");
  EXPECT_EQ(c.origin.at("run.out_dir"), "command line");
  // A number still needs a value: the error names the key.
  EXPECT_ERROR_HAS(load_config(schema(), ini, {"--optim.max_steps="}), "optim.max_steps");
}

TEST(Config, ErrorsNameFileAndKey) {
  const auto unknown = write_ini("unknown.ini", "[optim]\nlearning_rate = 0.01\n");
  EXPECT_ERROR_HAS(load_config(schema(), unknown, {}), unknown.c_str(), "optim.learning_rate");
  const auto bad = write_ini("bad.ini", "[optim]\nmax_steps = many\n");
  EXPECT_ERROR_HAS(load_config(schema(), bad, {}), bad.c_str(), "optim.max_steps");
  EXPECT_ERROR_HAS(load_config(schema(), "", {"--optim.nope=1"}), "command line", "optim.nope");
  EXPECT_ERROR_HAS(load_config(schema(), "", {"--optim.lr=abc"}), "command line", "optim.lr");
  EXPECT_ERROR_HAS(load_config(schema(), "/nonexistent.ini", {}), "/nonexistent.ini", "cannot open");
  ResolvedConfig c = load_config(schema(), "", {"--optim.lr=5"});
  EXPECT_ERROR_HAS(require_range(c, "optim.lr", 0, 1), "optim.lr", "command line", "outside");
}

// Found by fuzz_config_ini: Boost.Program_options loops forever building the message of an error
// whose text holds one of its own placeholders. Such text is refused first, naming where it is.
TEST(Config, ParserPlaceholdersAreRefusedNotLoopedOn) {
  EXPECT_ERROR_HAS(load_config(schema(), "", {"--opt'%canonical_option%'=1"}), "command line", "%canonical_option%",
                   "reserved");
  EXPECT_ERROR_HAS(load_config(schema(), "", {"--optim.lr=%value%"}), "command line", "optim.lr", "%value%");
  const auto ini = write_ini("placeholder.ini", "[optim]\nlr = 0.1\nmax_steps = %original_token%\n");
  const std::string line3 = ini + ":3";  // named: the macro keeps the pointer past the expression
  EXPECT_ERROR_HAS(load_config(schema(), ini, {}), line3.c_str(), "%original_token%");
  // An ordinary percent sign is fine.
  const auto ok = write_ini("percent.ini", "[run]\nout_dir = runs/100%\n");
  EXPECT_EQ(load_config(schema(), ok, {}).get<std::string>("run.out_dir"), "runs/100%");
}
