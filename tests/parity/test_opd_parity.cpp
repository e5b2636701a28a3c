// OPD training rows against opd_ref.py cases (tests/golden/gen_opd.py): row layout, position ids,
// mask, all-rounds states, teacher and student log-probs, every row loss and its gradient norm, and
// the batch losses (mean of row token-means), in float64 and float32.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "opdlm/io/hf.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "test_util.hpp"

using namespace opdlm;
using opdlm::test::golden_dir;
using nlohmann::json;

namespace {

json load_case(const std::string& name) {
  const std::string path = golden_dir() + "/" + name + ".json";
  std::ifstream f(path);
  if (!f) throw std::runtime_error("missing " + path + " (the ctest fixture golden_generate writes it)");
  return json::parse(f);
}

std::vector<uint8_t> mask_of(const json& list, size_t L1) {
  std::vector<uint8_t> m(L1, 0);
  for (const auto& j : list) m[j.get<size_t>()] = 1;
  return m;
}

struct LossKey {
  std::string state;  // "opd", "random", "all_rounds<r>"
  train::RowLossSpec spec;
};

train::RowLossSpec base_spec(const json& c) {
  train::RowLossSpec s;
  s.block_size = c["block_size"].get<int64_t>();
  s.mask_id = c["mask_id"].get<int32_t>();
  s.eos_id = c["eos_id"].get<int32_t>();
  s.pad_id = c["pad_id"].get<int32_t>();
  s.exclude_eos = c["exclude_eos"].get<bool>();
  s.ce_t_min = c["rm_ce_t_min"].get<double>();
  return s;
}

// The dump's loss names -> (state, spec).
LossKey key_spec(const std::string& name, const json& c) {
  LossKey k{name.substr(0, name.find('/')), base_spec(c)};
  const std::string loss = name.substr(name.find('/') + 1);
  auto& d = k.spec.divergence;
  if (loss == "forward_kl" || loss == "rm_kl") d.kind = ops::Divergence::forward_kl;
  else if (loss == "reverse_kl") d.kind = ops::Divergence::reverse_kl;
  else if (loss == "mixture_w0.3") d.kind = ops::Divergence::mixture, d.reverse_weight = c["mixture_w"].get<double>();
  else if (loss == "jsd_a0.5") d.kind = ops::Divergence::jsd, d.jsd_alpha = c["jsd_alpha"].get<double>();
  else if (loss == "topk4_forward_kl") d.kind = ops::Divergence::topk_forward_kl, d.topk = c["topk"].get<int64_t>();
  else if (loss == "rm_ce") k.spec.objective = train::RowObjective::masked_ce;
  else if (loss == "rm_ce_marginal")
    k.spec.objective = train::RowObjective::masked_ce, k.spec.ce_weighting = train::CeWeighting::marginal;
  else ADD_FAILURE() << "unknown loss name in the case: " << name;
  return k;
}

train::TrainingRow row_for(const json& r, const std::string& state) {
  train::TrainingRow row;
  row.prompt = r["prompt"].get<std::vector<int32_t>>();
  row.x0 = r["x0"].get<std::vector<int32_t>>();
  row.real_len = r["R"].get<int64_t>();
  row.pad_left = r["pad_left"].get<int64_t>();
  const size_t L1 = row.x0.size();
  if (state == "opd") {
    row.masked = mask_of(r["opd"]["masked"], L1);
  } else if (state == "random") {
    row.masked = mask_of(r["random"]["masked"], L1);
    row.t_block = r["random"]["t"].get<std::vector<double>>();
  } else {
    const size_t round = std::stoul(state.substr(std::string("all_rounds").size()));
    row.masked = mask_of(r["all_rounds"][round]["masked"], L1);
  }
  return row;
}

// The case's F32 weights, held in `dtype` (f64 holds them exactly).
model::Qwen3Weights load_weights(const std::string& dir, DType dtype) {
  model::Qwen3Weights f32 = io::import_hf(dir, DType::f32);
  if (dtype == DType::f32) return f32;
  model::Qwen3Weights w(f32.config(), dtype);
  for (size_t i = 0; i < w.tensors().size(); ++i) w.tensors()[i].value = f32.tensors()[i].value.to(dtype);
  return w;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }

std::vector<const Tensor*> grad_ptrs(model::Qwen3Model& m) {
  std::vector<const Tensor*> g;
  for (auto& t : m.grads().tensors()) g.push_back(&t.value);
  return g;
}

// One row's loss and (from a zeroed gradient) the norm of its gradient.
std::pair<double, double> run_row(model::Qwen3Model& teacher, model::Qwen3Model& student, const train::TrainingRow& row,
                                  const train::RowLossSpec& spec, double scale, model::Qwen3Activations& acts) {
  const auto js = train::loss_positions(row, spec);
  Tensor tlp = spec.objective == train::RowObjective::teacher_kl
                   ? train::teacher_logprobs(teacher, row.prompt, row.x0, js)
                   : Tensor();
  const train::RowLoss l = train::row_loss(student, tlp, row, spec, scale, acts);
  return {l.loss, ops::global_grad_norm(grad_ptrs(student))};
}

class OpdParity : public ::testing::TestWithParam<std::tuple<std::string, DType>> {};

TEST_P(OpdParity, RowsLossesAndGradientsMatchOpdRef) {
  const auto [name, dtype] = GetParam();
  const json c = load_case(name);
  const json& cfg = c["config"];
  // f64 runs the f32 weights exactly (every expected value is f64 from them); f32 is the product path.
  const double tol = dtype == DType::f64 ? 1e-9 : 1e-5;
  model::Qwen3Model teacher = model::Qwen3Model::teacher(load_weights(golden_dir() + "/" + c["teacher_dir"].get<std::string>(), dtype));
  model::Qwen3Model student = model::Qwen3Model::student(load_weights(golden_dir() + "/" + c["student_dir"].get<std::string>(), dtype));
  model::Qwen3Activations acts;
  const train::RowLossSpec spec0 = base_spec(cfg);
  double worst = 0;

  for (const json& r : c["rows"]) {
    // Layout: ids, position ids, mask pair by pair.
    train::TrainingRow opd_row = row_for(r, "opd");
    const train::RowInputs in = train::build_row_inputs(opd_row, spec0.block_size, spec0.mask_id, spec0.pad_id);
    EXPECT_EQ(std::vector<int32_t>(in.ids.data<int32_t>(), in.ids.data<int32_t>() + in.ids.numel()),
              r["seq"].get<std::vector<int32_t>>());
    EXPECT_EQ(std::vector<int32_t>(in.positions.data<int32_t>(), in.positions.data<int32_t>() + in.positions.numel()),
              r["position_ids"].get<std::vector<int32_t>>());
    const auto& am = r["attn_mask"];
    const int64_t N = opd_row.N();
    ASSERT_EQ(static_cast<int64_t>(am.size()), N);
    for (int64_t q = 0; q < N; ++q) {
      const std::string line = am[size_t(q)].get<std::string>();
      for (int64_t k = 0; k < N; ++k)
        ASSERT_EQ(in.mask.allowed(q, k, N), line[size_t(k)] == '1') << name << " q=" << q << " k=" << k;
    }
    // Loss positions and all-rounds states (deterministic functions of the step map).
    const auto js = train::loss_positions(opd_row, spec0);
    EXPECT_EQ(std::vector<int64_t>(js.begin(), js.end()), r["opd"]["loss_positions"].get<std::vector<int64_t>>());
    const auto rounds = train::all_rounds(r["step_map"].get<std::vector<int32_t>>(), spec0.block_size);
    ASSERT_EQ(rounds.size(), r["all_rounds"].size());
    for (size_t i = 0; i < rounds.size(); ++i) EXPECT_EQ(rounds[i], mask_of(r["all_rounds"][i]["masked"], opd_row.x0.size()));

    // Teacher and student log-probs at the loss positions, and per-position divergences.
    const Tensor tlp = train::teacher_logprobs(teacher, opd_row.prompt, opd_row.x0, js);
    const Tensor slp = train::student_logprobs(student, opd_row, spec0, js);
    const auto exp_t = r["opd"]["teacher_logp"].get<std::vector<std::vector<double>>>();
    const auto exp_s = r["opd"]["student_logp"].get<std::vector<std::vector<double>>>();
    const int64_t V = tlp.shape()[1];
    for (size_t i = 0; i < js.size(); ++i)
      for (int64_t v = 0; v < V; ++v) {
        const double et = exp_t[i][size_t(v)], es = exp_s[i][size_t(v)];
        EXPECT_LE(std::abs(tlp.item(int64_t(i) * V + v) - et), tol * std::max(1.0, std::abs(et))) << "teacher " << i << "," << v;
        EXPECT_LE(std::abs(slp.item(int64_t(i) * V + v) - es), tol * std::max(1.0, std::abs(es))) << "student " << i << "," << v;
      }

    // Every row loss and the norm of its gradient.
    for (auto it = r["expected"].begin(); it != r["expected"].end(); ++it) {
      const LossKey k = key_spec(it.key(), cfg);
      student.zero_grads();
      const auto [loss, gnorm] = run_row(teacher, student, row_for(r, k.state), k.spec, 1.0, acts);
      const double el = (*it)["loss"].get<double>(), eg = (*it)["grad_norm"].get<double>();
      EXPECT_LE(rel(loss, el), tol) << name << " " << it.key() << ": " << loss << " vs " << el;
      EXPECT_LE(rel(gnorm, eg), tol) << name << " " << it.key() << " grad norm: " << gnorm << " vs " << eg;
      worst = std::max({worst, rel(loss, el), rel(gnorm, eg)});
    }
  }

  // Batch losses: mean over rows of row token-means; gradients of that mean accumulated row by row.
  for (auto it = c["batch"].begin(); it != c["batch"].end(); ++it) {
    const LossKey k = key_spec(it.key(), cfg);
    student.zero_grads();
    double loss = 0;
    const double n = static_cast<double>(c["rows"].size());
    for (const json& r : c["rows"]) loss += run_row(teacher, student, row_for(r, k.state), k.spec, 1.0 / n, acts).first / n;
    const double gnorm = ops::global_grad_norm(grad_ptrs(student));
    EXPECT_LE(rel(loss, (*it)["loss"].get<double>()), tol) << name << " batch " << it.key();
    EXPECT_LE(rel(gnorm, (*it)["grad_norm"].get<double>()), tol) << name << " batch grad norm " << it.key();
    if (it.key() == "opd/forward_kl") {  // per tensor, under the HF names
      for (const auto& t : student.grads().tensors()) {
        const auto& per = c["batch_grad_norm_per_tensor_forward_kl"];
        ASSERT_TRUE(per.contains(t.name)) << t.name;
        EXPECT_LE(rel(ops::global_grad_norm({&t.value}), per[t.name].get<double>()), tol) << t.name;
      }
    }
  }
  RecordProperty("worst_rel_err", std::to_string(worst));
  std::printf("%s %s: worst relative error of row losses and gradient norms %.3g\n", name.c_str(),
              dtype == DType::f64 ? "f64" : "f32", worst);
}

INSTANTIATE_TEST_SUITE_P(Cases, OpdParity,
                         ::testing::Combine(::testing::Values("opd_case_tied", "opd_case_untied"),
                                            ::testing::Values(DType::f64, DType::f32)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + (std::get<1>(info.param) == DType::f64 ? "_f64" : "_f32");
                         });

}  // namespace
