// The grid-wide checkpoint commit and the resume of a conversion run at any layout (docs/checkpoint.md).
#include "opdlm/train/opd_checkpoint.hpp"

#include <filesystem>
#include <map>

#include "opdlm/base/error.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/io/checkpoint.hpp"
#include "opdlm/model/tp_layout.hpp"

namespace opdlm::train {

namespace fs = std::filesystem;

// ---- the grid ------------------------------------------------------------------------------------------

void grid_barrier(const CkptGrid& g) {
  g.tp.barrier();
  g.dp.barrier();
}

void grid_sum(const CkptGrid& g, std::span<int64_t> v) {
  g.tp.all_reduce(v);
  g.dp.all_reduce(v);
}

int64_t grid_sum(const CkptGrid& g, int64_t v) {
  int64_t x[1] = {v};
  grid_sum(g, std::span<int64_t>(x));
  return x[0];
}

std::string grid_broadcast(const CkptGrid& g, const std::string& s) {
  // World rank 0 is (tp 0, dp 0): first to its TP group, then each TP rank to its DP group.
  std::string out = s;
  for (parallel::Communicator* c : {&g.tp, &g.dp}) {
    int64_t n[1] = {int64_t(out.size())};
    c->broadcast(std::span<int64_t>(n), 0);
    out.resize(size_t(n[0]));
    c->broadcast(std::span<uint8_t>(reinterpret_cast<uint8_t*>(out.data()), out.size()), 0);
  }
  return out;
}

namespace {

const char* const kGroups[] = {"param", "adam_m", "adam_v"};

std::string shard_file(int tp_rank) { return "shard_tp" + std::to_string(tp_rank) + ".h5"; }

// The rollout buffer's flat arrays as the state file's integer datasets.
io::IntArrays rollout_arrays(const diffusion::FlatRollouts& f) {
  auto wide = [](const auto& v) { return std::vector<int64_t>(v.begin(), v.end()); };
  return {{"rollouts/sample_id", wide(f.sample_id)},         {"rollouts/prompt_offsets", wide(f.prompt_offsets)},
          {"rollouts/prompt_ids", wide(f.prompt_ids)},       {"rollouts/response_offsets", wide(f.response_offsets)},
          {"rollouts/response_ids", wide(f.response_ids)},   {"rollouts/step_map", wide(f.step_map)},
          {"rollouts/stopped_at_eos", wide(f.stopped_at_eos)}, {"rollouts/denoise_forwards", wide(f.denoise_forwards)},
          {"rollouts/commit_forwards", wide(f.commit_forwards)}};
}

diffusion::FlatRollouts flat_from_arrays(const io::IntArrays& a, const std::string& path) {
  std::map<std::string, const std::vector<int64_t>*> by;
  for (const auto& [n, v] : a) by[n] = &v;
  auto get = [&](const char* n) -> const std::vector<int64_t>& {
    const std::string key = std::string("rollouts/") + n;
    if (!by.count(key)) OPDLM_FAIL_AT(path, key, "the rollout buffer's array is missing");
    return *by[key];
  };
  diffusion::FlatRollouts f;
  auto narrow = [](const std::vector<int64_t>& v, auto& out) { out.assign(v.begin(), v.end()); };
  narrow(get("sample_id"), f.sample_id);
  narrow(get("prompt_offsets"), f.prompt_offsets);
  narrow(get("prompt_ids"), f.prompt_ids);
  narrow(get("response_offsets"), f.response_offsets);
  narrow(get("response_ids"), f.response_ids);
  narrow(get("step_map"), f.step_map);
  narrow(get("stopped_at_eos"), f.stopped_at_eos);
  narrow(get("denoise_forwards"), f.denoise_forwards);
  narrow(get("commit_forwards"), f.commit_forwards);
  return f;
}

// A local tensor as the block `sb` of the whole tensor (its real rows for the vocabulary).
io::TensorBlock block_of(const std::string& name, const Tensor& local, const model::ShardBlock& sb, const Shape& global) {
  return {name, global, sb.cut_dim, sb.offset, sb.cut_dim == 0 ? local.slice(0, sb.extent).clone() : local.clone()};
}

}  // namespace

// ---- save ----------------------------------------------------------------------------------------------

void save_run_checkpoint(const std::string& root, int64_t rl_step, int keep, const CkptGrid& g,
                         const model::Qwen3Model& student, const std::optional<parallel::TpPlan>& plan,
                         parallel::ShardedAdamW& optimizer, const RunState& state) {
  const std::string tmp = io::checkpoint_tmp_dir(root, rl_step);
  const int tp_rank = g.tp.rank();
  if (g.world_rank == 0) {
    fs::create_directories(root);
    std::error_code ec;
    fs::remove_all(tmp, ec);  // a save of the same step that died
    fs::create_directories(tmp);
  }
  grid_barrier(g);
  std::vector<std::vector<float>> m, v;
  optimizer.gather_moments(m, v);  // collective over DP
  std::string error;
  try {
    auto fault = [&](size_t n) {
      return [&, n](size_t i) {
        if (i == 0) io::maybe_inject_fault(io::CkptPhase::before_data, g.world_rank, rl_step);
        if (i == n / 2 && n > 1) io::maybe_inject_fault(io::CkptPhase::mid_dataset, g.world_rank, rl_step);
        if (i == n) io::maybe_inject_fault(io::CkptPhase::before_fsync, g.world_rank, rl_step);
      };
    };
    if (g.dp.rank() == 0) {
      const model::Qwen3Config& full = student.full_config();
      std::vector<io::TensorBlock> blocks;
      const auto& tensors = student.weights().tensors();
      const auto whole_shapes = model::Qwen3Weights::expected_shapes(full);  // the same names, in tensor order
      for (size_t i = 0; i < tensors.size(); ++i) {
        const auto& [name, value] = tensors[i];
        OPDLM_CHECK(whole_shapes[i].first == name, "save_run_checkpoint: tensor ", i, " is ", name);
        const model::ShardBlock sb = plan ? model::shard_block(name, full, *plan, tp_rank) : model::ShardBlock{};
        if (sb.cut_dim < 0 && tp_rank != 0) continue;  // a replicated tensor: TP rank 0 writes it
        const Shape& global = whole_shapes[i].second;
        blocks.push_back(block_of(std::string(kGroups[0]) + "/" + name, value, sb, global));
        blocks.push_back(block_of(std::string(kGroups[1]) + "/" + name, Tensor::from_vector(m[i], value.shape()), sb, global));
        blocks.push_back(block_of(std::string(kGroups[2]) + "/" + name, Tensor::from_vector(v[i], value.shape()), sb, global));
      }
      const nlohmann::json meta = {{"tp_rank", tp_rank}, {"tp", g.tp.size()}, {"rl_step", rl_step}};
      io::write_checkpoint_file(tmp + "/" + shard_file(tp_rank), meta, blocks, {}, fault(blocks.size()));
    }
    if (g.world_rank == 0) {
      nlohmann::json meta = state.meta;
      meta["rollouts"] = {{"weight_version", state.rollouts.weight_version()},
                          {"sampler", diffusion::sampler_options_to_json(state.rollouts.sampler())}};
      const io::IntArrays arrays = rollout_arrays(state.rollouts.to_flat());
      io::write_checkpoint_file(tmp + "/state.h5", meta, {}, arrays, fault(arrays.size()));
    }
  } catch (const Error& e) {
    error = e.what();
    OPDLM_LOG(error) << "checkpoint of RL step " << rl_step << ": " << error;
  }
  // Every rank's files are complete and fsync'ed before anything is committed.
  const int64_t failed = grid_sum(g, error.empty() ? 0 : 1);
  if (failed > 0)
    OPDLM_FAIL_AT(tmp, "", "the checkpoint of RL step ", rl_step, " failed on ", failed,
                  " rank(s); the committed checkpoints are unchanged", error.empty() ? "" : ": " + error);
  if (g.world_rank == 0) {
    io::maybe_inject_fault(io::CkptPhase::before_manifest, g.world_rank, rl_step);
    nlohmann::json info = {{"rl_step", rl_step},
                           {"layout", state.meta.value("layout", nlohmann::json::object())},
                           {"config_sha256", state.meta.value("config_sha256", "")},
                           {"run_id", state.meta.value("run_id", "")}};
    io::write_manifest(tmp, info);
    io::maybe_inject_fault(io::CkptPhase::before_rename, g.world_rank, rl_step);
    io::publish_checkpoint(tmp, root, rl_step, keep,
                           [&] { io::maybe_inject_fault(io::CkptPhase::before_latest, g.world_rank, rl_step); });
  }
  grid_barrier(g);
}

// ---- resume --------------------------------------------------------------------------------------------

std::string choose_resume_checkpoint(const std::string& resume, const std::string& root, const CkptGrid& g,
                                     std::vector<std::string>* skipped) {
  std::string dir, error;
  if (g.world_rank == 0 && !resume.empty()) {
    try {
      if (resume == "auto") {
        dir = io::find_resumable_checkpoint(root, skipped);
      } else {
        io::verify_checkpoint(resume);
        dir = resume;
      }
    } catch (const Error& e) {
      error = e.what();
    }
  }
  // An error on rank 0 reaches every rank (no rank is left waiting in a collective).
  const std::string verdict = grid_broadcast(g, error.empty() ? "ok:" + dir : "error:" + error);
  if (verdict.rfind("error:", 0) == 0)
    OPDLM_FAIL_AT(resume, "run.resume", "cannot resume from this checkpoint: ", verdict.substr(6));
  return verdict.substr(3);
}

RunState read_run_state(const std::string& dir) {
  const std::string path = dir + "/state.h5";
  io::CheckpointFile f = io::read_checkpoint_file(path);
  RunState s;
  s.meta = f.meta;
  const nlohmann::json r = f.meta.value("rollouts", nlohmann::json::object());
  diffusion::RolloutBuffer buf(r.value("weight_version", int64_t{0}),
                               diffusion::sampler_options_from_json(r.value("sampler", nlohmann::json::object()),
                                                                    path + ": rollouts.sampler"));
  buf.assign_flat(flat_from_arrays(f.arrays, path), path);
  s.rollouts = std::move(buf);
  return s;
}

void load_run_tensors(const std::string& dir, model::Qwen3Model& student, const std::optional<parallel::TpPlan>& plan,
                      int tp_rank, parallel::ShardedAdamW& optimizer) {
  const model::Qwen3Config& full = student.full_config();
  // The whole parameters and moments, assembled from every shard file of the checkpoint's layout.
  std::map<std::string, model::Qwen3Weights> whole;
  for (const char* grp : kGroups) whole.emplace(grp, model::Qwen3Weights(full, DType::f32));
  std::map<std::string, int> placed;
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("shard_tp", 0) == 0) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  if (files.empty()) OPDLM_FAIL_AT(dir, "shard_tp0.h5", "the checkpoint has no shard files");
  for (const auto& path : files) {
    const io::CheckpointFile f = io::read_checkpoint_file(path);
    for (const auto& b : f.blocks) {
      const size_t slash = b.name.find('/');
      const std::string grp = b.name.substr(0, slash), name = slash == std::string::npos ? "" : b.name.substr(slash + 1);
      if (!whole.count(grp) || !whole.at(grp).has(name))
        OPDLM_FAIL_AT(path, b.name, "not a tensor of the student (", full.num_params(), " parameters)");
      Tensor& t = whole.at(grp).get(name);
      if (t.shape() != b.global_shape)
        OPDLM_FAIL_AT(path, b.name, "the checkpoint's tensor is ", shape_str(b.global_shape), ", the student's ",
                      shape_str(t.shape()), " (another model?)");
      io::place_block(b, t);
      placed[b.name] += int(b.cut_dim < 0 ? t.numel() : b.data.numel());
    }
  }
  for (const char* grp : kGroups)
    for (const auto& [name, t] : whole.at(grp).tensors())
      if (placed[std::string(grp) + "/" + name] != t.numel())
        OPDLM_FAIL_AT(dir, std::string(grp) + "/" + name, "the shard files cover ", placed[std::string(grp) + "/" + name],
                      " of its ", t.numel(), " elements");
  // This rank's shard at the current layout.
  if (plan)
    for (auto& [grp, w] : whole) w = model::shard_weights(w, *plan, tp_rank);
  const model::Qwen3Weights &params = whole.at("param"), &m = whole.at("adam_m"), &v = whole.at("adam_v");
  std::vector<std::vector<float>> mv, vv;
  auto& dst = student.weights().tensors();
  for (size_t i = 0; i < dst.size(); ++i) {
    const Tensor& src = params.tensors()[i].value;
    OPDLM_CHECK(src.shape() == dst[i].value.shape(), "load_run_tensors: shard shape of ", dst[i].name);
    std::copy_n(src.data<float>(), src.numel(), dst[i].value.data<float>());
    mv.push_back(m.tensors()[i].value.to_f32_vector());
    vv.push_back(v.tensors()[i].value.to_f32_vector());
  }
  optimizer.set_moments(mv, vv);
}

}  // namespace opdlm::train
