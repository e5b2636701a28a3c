// Crash-safe training checkpoints on disk (docs/checkpoint.md): the HDF5 files of a checkpoint (the
// blocks of global tensors each writer holds, integer arrays, a JSON state), the manifest, the commit
// protocol (temporary directory, fsync, manifest, rename, LATEST), verification, the choice of the
// checkpoint to resume from, and fault injection for the tests. No MPI here: train/ agrees across
// ranks and calls these.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::io {

constexpr int64_t kCheckpointFormatVersion = 1;
constexpr const char* kCheckpointManifest = "MANIFEST.json";

// ---- the files ------------------------------------------------------------------------------------

// One block of a global f32 tensor as a writer holds it: the whole tensor's shape and where the
// block sits along the cut dimension. A tensor-parallel rank writes its shard of each weight this
// way, so every tensor is stored in global (unsharded) coordinates whatever the layout.
struct TensorBlock {
  std::string name;    // dataset path in the file, e.g. "param/model.norm.weight"
  Shape global_shape;  // the whole tensor
  int cut_dim = -1;    // -1: the block is the whole tensor; 0: a block of rows; 1: a block of columns
  int64_t offset = 0;  // the block's first row / column in the whole tensor
  Tensor data;         // f32, contiguous, the block's shape
};

// Named integer arrays (the rollout buffer's flat arrays), one dataset each.
using IntArrays = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// Writes a checkpoint file: root attributes format = "opdlm-checkpoint", format_version, meta (JSON)
// and index (the dataset names, in order); one dataset per block (attributes global_shape, cut_dim,
// offset) and per array, each with the XXH3-64 of its bytes. `between(i)` runs before dataset i
// (fault injection). The file is written in place (the checkpoint's temporary directory is what
// makes it atomic) and fsync'ed.
void write_checkpoint_file(const std::string& path, const nlohmann::json& meta, const std::vector<TensorBlock>& blocks,
                           const IntArrays& arrays, const std::function<void(size_t)>& between = {});

struct CheckpointFile {
  nlohmann::json meta;
  std::vector<TensorBlock> blocks;
  IntArrays arrays;
};
// Reads a checkpoint file and checks every dataset's XXH3-64 and block geometry; an Error names the
// file and the dataset of the first problem.
CheckpointFile read_checkpoint_file(const std::string& path);

// Copies a block into the whole tensor (f32, global_shape).
void place_block(const TensorBlock& b, Tensor& whole);

// ---- the commit protocol ----------------------------------------------------------------------------

// "step_00000012": a committed checkpoint's directory name under the checkpoint root.
std::string checkpoint_dir_name(int64_t rl_step);
// The temporary directory a checkpoint of `rl_step` is written into before it is committed.
std::string checkpoint_tmp_dir(const std::string& root, int64_t rl_step);

// Phases of a save at which the tests make a rank fail (OPDLM_CKPT_FAULT, below).
enum class CkptPhase { before_data, mid_dataset, before_fsync, before_manifest, before_rename, before_latest };
const char* ckpt_phase_name(CkptPhase p);
// OPDLM_CKPT_FAULT="<world rank>:<phase>[:<rl step>]": when it names this rank, this phase (and this
// step, when given), the process ends at once with exit code 86: a simulated crash (no unwinding, no
// cleanup, files left as they are). A malformed value is an Error naming the variable.
void maybe_inject_fault(CkptPhase phase, int world_rank, int64_t rl_step);
constexpr int kInjectedFaultExitCode = 86;

// Writes dir/MANIFEST.json (atomically, fsync'ed): `info` plus "files": the name, size and XXH3-64 of
// every other file in dir, and format / format_version.
void write_manifest(const std::string& dir, nlohmann::json info);
// Renames the temporary directory to root/step_N (fsync of root), then replaces root/LATEST
// atomically (LATEST.tmp, fsync, rename, fsync of root) and deletes every committed checkpoint but
// the newest `keep`. An existing root/step_N (a checkpoint of the same step) is replaced.
// `before_latest` runs between the rename and LATEST (fault injection).
void publish_checkpoint(const std::string& tmp_dir, const std::string& root, int64_t rl_step, int keep,
                        const std::function<void()>& before_latest = {});

// Committed checkpoint directories under root (step_* with a manifest), newest step first.
std::vector<std::string> committed_checkpoints(const std::string& root);
// Checks a checkpoint before it is trusted: the manifest parses and has this format; every file it
// lists exists with its size and XXH3-64; every dataset's XXH3-64 matches (every file is read through).
// Returns the manifest; an Error names the file and the field of the first problem.
nlohmann::json verify_checkpoint(const std::string& dir);
// The checkpoint to resume from under root: the newest committed one that verifies (a save that died
// after its rename but before LATEST moved is complete, and newer than LATEST's target). Each one
// passed over is added to `skipped` with the reason. "" when none.
std::string find_resumable_checkpoint(const std::string& root, std::vector<std::string>* skipped);

}  // namespace opdlm::io
