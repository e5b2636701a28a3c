// The conversion step on data-parallel groups (issue 5): for DP = 1, 2, 4 carved out of the MPI world,
// `run_opd_training` gives the same rollouts, losses, budget counters, probe KLs and updated
// parameters, bit for bit, as one process without MPI. Every mode goes through it, the teacher-sample
// path of rm-ce included, with updates whose rows do not fill the last rank's block.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "opdlm/io/model_file.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/train/opd_trainer.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;
using parallel::MpiCommunicator;

struct Case {
  const char* name;
  train::ConversionMode mode;
  train::CeSource ce_source;
};

train::OpdTrainOptions case_options(const test::TinyOpdSetup& s, const Case& c, const std::string& out) {
  auto o = test::tiny_opd_options(s, c.mode, out);
  o.ce_source = c.ce_source;
  o.prompts_per_step = 6;  // 6 samples over 4 ranks: uneven rollout shares
  // Tree width 4: a full update sums (r0 + r1) + (r2 + r3), which a left fold would not match; a
  // step's second update has fewer rows, so some ranks hold only absent (+0) slots.
  o.rows_per_update = 4;
  o.rl_steps = 3;
  o.probe_every = 2;
  return o;
}

// The step lines of a metrics log without wall-clock fields.
std::vector<nlohmann::json> comparable_lines(const std::string& path) {
  std::vector<nlohmann::json> out;
  for (auto j : test::read_metrics_jsonl(path)) {
    for (const char* k : {"elapsed_s", "train_tokens_per_s", "wall_s", "config", "path", "parallel"}) j.erase(k);
    out.push_back(j);
  }
  return out;
}

void expect_same_run(const std::string& ref_dir, const std::string& dir) {
  SCOPED_TRACE(dir);
  const auto a = io::load_model(ref_dir + "/model.h5"), b = io::load_model(dir + "/model.h5");
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    const Tensor& x = a.tensors()[i].value;
    const Tensor& y = b.tensors()[i].value;
    ASSERT_EQ(x.numel(), y.numel());
    EXPECT_EQ(std::memcmp(x.data<float>(), y.data<float>(), size_t(x.numel()) * 4), 0) << a.tensors()[i].name;
  }
  const auto la = comparable_lines(ref_dir + "/metrics.jsonl"), lb = comparable_lines(dir + "/metrics.jsonl");
  ASSERT_EQ(la.size(), lb.size());
  int steps = 0;
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_EQ(la[i], lb[i]) << "line " << i;  // loss, grad norm, budget, response lengths, probe KLs: bitwise
    steps += la[i]["event"] == "step";
  }
  EXPECT_EQ(steps, 3);
}

TEST(DataParallelOpd, EveryDpSizeTrainsBitForBitLikeOneProcess) {
  auto world = MpiCommunicator::world();
  const int n = world->size(), r = world->rank();
  const auto s = test::make_tiny_opd_setup("mpi_dp", r == 0);
  world->barrier();
  const Case cases[] = {{"opd", train::ConversionMode::opd, train::CeSource::gold},
                        {"rm-kl", train::ConversionMode::rm_kl, train::CeSource::gold},
                        {"rm-ce-teacher", train::ConversionMode::rm_ce, train::CeSource::teacher}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    // The reference: one process, no MPI at all.
    if (r == 0) {
      const auto ref = train::run_opd_training(case_options(s, c, std::string(c.name) + "_ref"), "test");
      EXPECT_GT(ref.optimizer_steps, 2);
      EXPECT_GT(ref.budget.rows, 0);
    }
    // DP groups of consecutive world ranks; each group writes through its rank 0.
    std::vector<std::string> dirs;
    for (int dp = 1; dp <= n; dp *= 2) {
      const int color = r / dp;
      auto group = world->split(color, r, "dp");
      const std::string out = std::string(c.name) + "_dp" + std::to_string(dp) + "_g" + std::to_string(color);
      train::TrainGrid grid{group.get(), group->rank() == 0};
      train::run_opd_training(case_options(s, c, out), "test", grid);
      for (int g = 0; g < n / dp; ++g)
        dirs.push_back(s.dir + "/" + c.name + "_dp" + std::to_string(dp) + "_g" + std::to_string(g));
    }
    world->barrier();
    if (r == 0)
      for (const auto& d : dirs) expect_same_run(s.dir + "/" + c.name + "_ref", d);
    world->barrier();
  }
  if (r == 0) std::filesystem::remove_all(s.dir);
}

}  // namespace
