// ZeRO-1 for the student: AdamW state sharded over the DP group. Gradients are reduce-scattered
// (the deterministic tree of Communicator::reduce_scatter) into each rank's shard, the global norm is
// assembled from per-chunk sums in the fixed order of ops::grad_sq_sum, each rank clips and updates
// its shard, and the parameters are all-gathered. The shards are whole gradient-norm chunks, so for
// the same summed gradient every DP size gives the same norm and the same parameters, bit for bit,
// as one process running ops::clip_grad_norm + ops::adamw_step.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "opdlm/ops/adamw.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::parallel {

// One chunk of the gradient-norm order: elements [begin, end) of tensor `tensor`.
struct ParamUnit {
  int tensor = 0;
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const ParamUnit&) const = default;
};

// Every tensor cut into chunks of `chunk` elements (the last one shorter), tensor-major.
std::vector<ParamUnit> param_units(const std::vector<int64_t>& tensor_numels, int64_t chunk);

// Contiguous runs of units per rank, balanced by elements (pure): rank d owns units
// [first[d], first[d + 1]); first has dp + 1 entries, first[0] = 0, first[dp] = units.size().
// Rank d's run ends at the first unit boundary at or past (d + 1) / dp of the elements.
std::vector<size_t> shard_units(const std::vector<ParamUnit>& units, int dp);

class ShardedAdamW {
 public:
  // `params`: the student's f32 tensors (every rank holds them whole); `dp`: the DP communicator.
  // `no_decay[i]`: tensor i gets no weight decay (norm gains, as train::adamw_update does).
  ShardedAdamW(std::vector<Tensor*> params, std::vector<bool> no_decay, Communicator& dp);
  // Under tensor parallelism the parameters are this TP rank's shard: the global norm adds the
  // squared sums of the sharded tensors over `tp` (all_reduce_tree) and counts the tensors flagged in
  // `replicated` (the same on every TP rank: norm gains) once. Without tp (or with one TP rank) the
  // norm is the DP one above, bit for bit.
  void set_tensor_parallel(Communicator* tp, std::vector<bool> replicated);
  // The deterministic-reduction mode (docs/parallel.md): the global norm is the exact sum of squares
  // (ops::ExactSquareSum, lanes summed by integer all-reduces over DP and TP), the same bits for
  // every layout. Off: the chunked f64 order above.
  void set_exact_norm(bool on) { exact_norm_ = on; }

  // A NaN or inf anywhere in the summed gradient, on any rank (replicated tensors included), makes the
  // returned norm non-finite on every rank: the ranks agree on skipping or aborting without an extra
  // collective.
  // One optimizer step. `grads` (same shapes as params) hold this rank's part of the gradient; the
  // step sums the parts over the DP group (tree order of ranks), clips to `clip` (<= 0: no
  // clipping), updates this rank's shard and all-gathers every parameter. Returns the pre-clip
  // global norm (a non-finite norm is returned without touching anything). `accept`, when given, sees
  // the finite norm before anything changes and may veto the update (a spike policy): the same norm on
  // every rank, so the ranks agree without an extra collective.
  double step(const std::vector<const Tensor*>& grads, int64_t step, const ops::AdamWConfig& cfg, double clip,
              const std::function<bool(double)>& accept = nullptr);

  int64_t shard_elements() const { return shard_elems_; }    // this rank's parameters in the shard
  int64_t padded_shard() const { return padded_; }           // the largest shard: the collective chunk
  int64_t state_bytes() const;                               // m + v held by this rank
  const std::vector<ParamUnit>& units() const { return units_; }
  size_t first_unit(int rank) const { return first_[size_t(rank)]; }
  // The shard's moments, in unit order.
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }
  // Checkpoints: every parameter tensor's whole moments (m[i], v[i] have params[i]'s element count),
  // all-gathered over DP (collective); and the inverse, keeping this rank's shard of whole moments
  // (every DP rank passes the same), so a resume may change the DP size.
  void gather_moments(std::vector<std::vector<float>>& m, std::vector<std::vector<float>>& v);
  void set_moments(const std::vector<std::vector<float>>& m, const std::vector<std::vector<float>>& v);

 private:
  std::vector<Tensor*> params_;
  std::vector<bool> no_decay_;
  Communicator* dp_;
  Communicator* tp_ = nullptr;
  std::vector<bool> replicated_;
  bool exact_norm_ = false;
  std::vector<ParamUnit> units_;
  std::vector<size_t> first_;
  int64_t shard_elems_ = 0, padded_ = 0;
  std::vector<float> m_, v_;
  double exact_norm(const std::vector<float>& shard) const;
  double chunked_norm(const std::vector<float>& shard) const;
  void all_gather_params();
  // Step workspaces, kept between steps (no per-step allocation of model-sized buffers).
  std::vector<float> send_, shard_, own_, gathered_;
};

}  // namespace opdlm::parallel
