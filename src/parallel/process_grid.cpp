// ProcessGrid: the pure rank layout, the sharding preflight, and the TP/DP communicator split.
#include "opdlm/parallel/process_grid.hpp"

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/communicator.hpp"

namespace opdlm::parallel {

// ---- the layout -------------------------------------------------------------------------------------

void validate_grid_shape(GridShape s, const std::string& where) {
  if (s.world < 1) OPDLM_FAIL_AT(where, "world size", "the world size must be >= 1, got ", s.world);
  if (s.tp < 1) OPDLM_FAIL_AT(where, "parallel.tp", "parallel.tp must be >= 1, got ", s.tp);
  if (s.world % s.tp != 0)
    OPDLM_FAIL_AT(where, "parallel.tp", "parallel.tp = ", s.tp, " does not divide the world size ", s.world,
                  " (DP = world / TP must be a whole number)");
}

GridCoord grid_coord(int world_rank, GridShape s) {
  validate_grid_shape(s);
  OPDLM_CHECK(world_rank >= 0 && world_rank < s.world, "world rank ", world_rank, " outside [0, ", s.world, ")");
  return {world_rank % s.tp, world_rank / s.tp};
}

int grid_world_rank(GridCoord c, GridShape s) {
  validate_grid_shape(s);
  OPDLM_CHECK(c.tp_rank >= 0 && c.tp_rank < s.tp && c.dp_rank >= 0 && c.dp_rank < s.dp(), "grid coordinate (tp ",
              c.tp_rank, ", dp ", c.dp_rank, ") outside ", s.tp, " x ", s.dp());
  return c.dp_rank * s.tp + c.tp_rank;
}

std::vector<int> tp_group_ranks(int dp_rank, GridShape s) {
  std::vector<int> r;
  for (int t = 0; t < s.tp; ++t) r.push_back(grid_world_rank({t, dp_rank}, s));
  return r;
}

std::vector<int> dp_group_ranks(int tp_rank, GridShape s) {
  std::vector<int> r;
  for (int d = 0; d < s.dp(); ++d) r.push_back(grid_world_rank({tp_rank, d}, s));
  return r;
}

// ---- preflight --------------------------------------------------------------------------------------

TpPlan preflight(const PreflightInput& in) {
  const GridShape s = in.shape;
  validate_grid_shape(s, in.config_file);
  if (in.check_slurm_ntasks && in.slurm_ntasks && *in.slurm_ntasks != s.world)
    OPDLM_FAIL_AT("environment", "SLURM_NTASKS",
                  "SLURM_NTASKS = ", *in.slurm_ntasks, " but this MPI world has ", s.world, " rank(s): ",
                  s.world == 1 ? "each task started as its own singleton MPI world, so the job would run the same "
                                 "work SLURM_NTASKS times; launch with `srun --mpi=pmix` or `mpirun` inside the "
                                 "allocation"
                               : "the launcher started a different number of ranks than the allocation has tasks",
                  " (or set parallel.check_slurm_ntasks = false when this is intended)");
  const int tp = s.tp;
  TpPlan p;
  p.tp = tp;
  if (in.num_heads % tp != 0)
    OPDLM_FAIL_AT(in.model_file, "num_attention_heads", "num_attention_heads = ", in.num_heads,
                  " is not divisible by parallel.tp = ", tp, " (", in.config_file, ")");
  p.heads_per_rank = in.num_heads / tp;
  if (in.num_kv_heads % tp == 0) {
    p.kv_heads_per_rank = in.num_kv_heads / tp;
  } else if (tp % in.num_kv_heads == 0) {
    // Megatron's choice for GQA with TP > KV heads: every rank holds the one KV head its query heads use.
    p.kv_replication = static_cast<int>(tp / in.num_kv_heads);
    p.kv_heads_per_rank = 1;
    p.notes.push_back("num_key_value_heads = " + std::to_string(in.num_kv_heads) + " < tp = " + std::to_string(tp) +
                      ": each KV head is replicated on " + std::to_string(p.kv_replication) + " ranks");
  } else {
    OPDLM_FAIL_AT(in.model_file, "num_key_value_heads", "num_key_value_heads = ", in.num_kv_heads,
                  " neither divides nor is divided by parallel.tp = ", tp, " (", in.config_file, ")");
  }
  if (in.intermediate_size % tp != 0)
    OPDLM_FAIL_AT(in.model_file, "intermediate_size", "intermediate_size = ", in.intermediate_size,
                  " is not divisible by parallel.tp = ", tp, " (", in.config_file, ")");
  p.ffn_per_rank = in.intermediate_size / tp;
  const int64_t C = in.deterministic_shards;
  if (C < 0 || (C > 0 && C % tp != 0))
    OPDLM_FAIL_AT(in.config_file, "parallel.deterministic_shards", "parallel.deterministic_shards = ", C,
                  " must be 0 (off) or a multiple of parallel.tp = ", tp);
  if (C > 0) {
    // Every virtual shard must be a whole TP shard of a C-way layout: the same gemm shapes for every tp.
    const std::pair<const char*, int64_t> dims[] = {{"num_attention_heads", in.num_heads},
                                                     {"num_key_value_heads", in.num_kv_heads},
                                                     {"intermediate_size", in.intermediate_size}};
    for (const auto& [name, value] : dims)
      if (value % C != 0)
        OPDLM_FAIL_AT(in.config_file, "parallel.deterministic_shards", "parallel.deterministic_shards = ", C,
                      " does not divide ", name, " = ", value, " of ", in.model_file);
    p.pieces = static_cast<int>(C / tp);
  }
  const int64_t quantum = C > 0 ? C : tp;
  p.padded_vocab = (in.vocab_size + quantum - 1) / quantum * quantum;
  p.vocab_per_rank = p.padded_vocab / tp;
  if (p.padded_vocab != in.vocab_size)
    p.notes.push_back("vocab_size = " + std::to_string(in.vocab_size) + " padded to " + std::to_string(p.padded_vocab) +
                      (C > 0 ? " for deterministic_shards = " + std::to_string(C) : " for tp = " + std::to_string(tp)) +
                      ": the pad rows are zeros whose logits are never computed");
  return p;
}

// ---- the grid on MPI ---------------------------------------------------------------------------------

ProcessGrid::ProcessGrid(std::shared_ptr<MpiCommunicator> world, GridShape shape)
    : shape_(shape), world_(std::move(world)) {
  validate_grid_shape(shape_);
  if (world_->size() != shape_.world)
    OPDLM_FAIL("ProcessGrid: the communicator has ", world_->size(), " ranks, the shape ", shape_.world);
  coord_ = grid_coord(world_->rank(), shape_);
  // Same dp_rank -> one TP group, ordered by tp_rank; same tp_rank -> one DP group, ordered by dp_rank.
  tp_ = world_->split(coord_.dp_rank, coord_.tp_rank, "tp");
  dp_ = world_->split(coord_.tp_rank, coord_.dp_rank, "dp");
}

ProcessGrid::~ProcessGrid() = default;

int ProcessGrid::world_rank() const { return world_->rank(); }

}  // namespace opdlm::parallel
