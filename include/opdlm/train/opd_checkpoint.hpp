// Saving and resuming a conversion run (docs/checkpoint.md): the grid-wide commit of a checkpoint
// (student parameters and AdamW moments as blocks of global tensors, one file per TP rank; the run
// state and the rollout buffer in state.h5), the choice of the checkpoint to resume from, and the load
// of its tensors at any (TP, DP) layout.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "opdlm/diffusion/rollout_buffer.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/parallel/zero1.hpp"

namespace opdlm::train {

// This rank's place in the run's grid (TP fastest): its TP and DP groups and its world rank.
struct CkptGrid {
  parallel::Communicator& tp;
  parallel::Communicator& dp;
  int world_rank = 0;
};
// Collectives over the whole grid from its two groups (every TP group has one member in each DP group).
void grid_barrier(const CkptGrid& g);
int64_t grid_sum(const CkptGrid& g, int64_t v);
void grid_sum(const CkptGrid& g, std::span<int64_t> v);
// World rank 0's string on every rank.
std::string grid_broadcast(const CkptGrid& g, const std::string& s);

// What a checkpoint holds besides the tensors.
struct RunState {
  nlohmann::json meta;  // counters, data cursor, layout, run id, teacher hash, metrics offset, config
  diffusion::RolloutBuffer rollouts;
};

// Writes and commits the checkpoint of `rl_step` under root (every rank of the grid calls it):
// a temporary directory; each TP rank's DP rank 0 writes shard_tp<r>.h5 (its blocks of the student's
// parameters and of the whole AdamW moments, gathered over DP); world rank 0 writes state.h5; the
// ranks agree that every write succeeded; world rank 0 writes the manifest, renames the directory
// into place, points LATEST at it and keeps the newest `keep`. A failure on any rank throws on every
// rank and leaves the committed checkpoints as they were. Fault injection: io::maybe_inject_fault.
void save_run_checkpoint(const std::string& root, int64_t rl_step, int keep, const CkptGrid& g,
                         const model::Qwen3Model& student, const std::optional<parallel::TpPlan>& plan,
                         parallel::ShardedAdamW& optimizer, const RunState& state);

// The checkpoint a run resumes from, the same on every rank ("" = start fresh). `resume` is "" (no
// resume), "auto" (the newest committed checkpoint under root that verifies; fresh when there is
// none; every one passed over is added to `skipped` with the reason) or a checkpoint directory
// (verified; an Error when it does not).
std::string choose_resume_checkpoint(const std::string& resume, const std::string& root, const CkptGrid& g,
                                     std::vector<std::string>* skipped);
// state.h5 of a checkpoint.
RunState read_run_state(const std::string& dir);
// The student's parameters and the optimizer's moments from a checkpoint written at any layout,
// resharded for this rank (plan: this run's TP plan, nullopt without TP).
void load_run_tensors(const std::string& dir, model::Qwen3Model& student, const std::optional<parallel::TpPlan>& plan,
                      int tp_rank, parallel::ShardedAdamW& optimizer);

}  // namespace opdlm::train
