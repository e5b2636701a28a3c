// The tensor-parallel layout of a Qwen3 model (Megatron): which shard of each weight a TP rank holds,
// and the memory per rank of teacher + student + gradients + ZeRO-1 AdamW state (docs/parallel.md).
// The TP model allocates its shards from tp_shard_shapes; the formula is checked against allocations.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/parallel/process_grid.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::model {

// The preflight's plan for this model at `tp` ranks (parallel::preflight on the model's dimensions,
// a world of exactly tp ranks, no SLURM check): for code that already knows the layout is valid.
// deterministic_shards > 0 plans the deterministic-reduction mode (PreflightInput).
parallel::TpPlan tp_plan(const Qwen3Config& c, int tp, int64_t deterministic_shards = 0);

// One TP rank's weight shapes, in Qwen3Weights' order and names: embedding and LM head split by
// vocabulary rows (padded vocabulary), q/k/v and gate/up by output rows (column-parallel), o and
// down by input columns (row-parallel); RMSNorm gains replicated. With tp = 1 these are
// Qwen3Weights::expected_shapes.
std::vector<std::pair<std::string, Shape>> tp_shard_shapes(const Qwen3Config& c, const parallel::TpPlan& plan);

struct RankMemory {
  int64_t params = 0;          // parameters of one model held by this rank (its TP shard)
  int64_t teacher_bytes = 0;   // frozen teacher shard (f32)
  int64_t student_bytes = 0;   // trainable student shard (f32)
  int64_t grad_bytes = 0;      // the student's gradient buffers (f32)
  int64_t adam_bytes = 0;      // AdamW m + v, ZeRO-1 sharded over DP: 8 * ceil(params / dp) (+ up to one norm chunk)
  int64_t zero1_step_bytes = 0;  // transient buffers of one ShardedAdamW step: 4 * (2 dp + 2) * ceil(params / dp)
  int64_t total_bytes() const { return teacher_bytes + student_bytes + grad_bytes + adam_bytes + zero1_step_bytes; }
};

// Closed form, f32 weights; activations, KV caches and rollouts are not included.
RankMemory memory_per_rank(const Qwen3Config& c, const parallel::TpPlan& plan, int dp);

// ---- sharding real weights (pure) ------------------------------------------------------------------

// The vocabulary rows [begin, begin + real) of the full model that TP rank `rank` holds; its shard has
// plan.vocab_per_rank rows, of which the last (vocab_per_rank - real) are padding (zeros, never read:
// the model computes logits for the real rows only).
struct VocabRange {
  int64_t begin = 0, real = 0;
};
VocabRange vocab_range(const Qwen3Config& c, const parallel::TpPlan& plan, int rank);

// The config a TP shard is built with (its tensors have tp_shard_shapes): heads, KV heads, FFN and
// vocabulary per rank; the special token ids are -1 (they are ids of the full vocabulary, which the
// model keeps as its global config).
Qwen3Config shard_config(const Qwen3Config& c, const parallel::TpPlan& plan);

// TP rank `rank`'s shard of full weights (Megatron layout; RMSNorm gains copied). Refuses plans that
// replicate KV heads (tp > num_key_value_heads): not supported by the TP model yet.
Qwen3Weights shard_weights(const Qwen3Weights& full, const parallel::TpPlan& plan, int rank);
// Where TP rank `rank`'s shard of tensor `name` sits in the whole tensor (checkpoints store shards as
// blocks in global coordinates): cut_dim -1 for a replicated tensor (every rank holds it whole),
// 0 for a block of rows (for the vocabulary: the rank's real rows), 1 for a block of columns; the
// block is the first `extent` rows / columns of the shard, starting at `offset` in the whole tensor.
struct ShardBlock {
  int cut_dim = -1;
  int64_t offset = 0, extent = 0;
};
ShardBlock shard_block(const std::string& name, const Qwen3Config& full_config, const parallel::TpPlan& plan, int rank);

// The inverse: the full weights from every rank's shard (shards[r] of rank r), pad rows dropped;
// norms taken from rank 0. Used to save a TP model and by the tests.
Qwen3Weights unshard_weights(const std::vector<const Qwen3Weights*>& shards, const Qwen3Config& full_config,
                             const parallel::TpPlan& plan);

}  // namespace opdlm::model
