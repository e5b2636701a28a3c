// ProcessGrid: the world of MPI ranks split into tensor-parallel (TP) x data-parallel (DP) groups.
// The layout is one pure function (grid_coord) tested exhaustively; the communicators come from
// MPI_Comm_split on it. The preflight refuses layouts the model cannot be sharded on, and a world
// size that disagrees with SLURM_NTASKS (the singleton trap of a misconfigured srun).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace opdlm::parallel {

class MpiCommunicator;

// ---- the layout (pure) ------------------------------------------------------------------------------

struct GridShape {
  int world = 1;  // ranks in MPI_COMM_WORLD
  int tp = 1;     // ranks per tensor-parallel group; DP = world / tp
  int dp() const { return world / tp; }
};

struct GridCoord {
  int tp_rank = 0;  // rank inside the TP group (the shard index)
  int dp_rank = 0;  // index of the TP group = rank inside the DP group
  bool operator==(const GridCoord&) const = default;
};

// Throws an Error naming `parallel.tp` unless world >= 1, tp >= 1 and tp divides world.
void validate_grid_shape(GridShape s, const std::string& where = "parallel.tp");

// TP varies fastest: world rank r -> (tp_rank = r % tp, dp_rank = r / tp), so the ranks of one TP
// group are consecutive and, with ranks filled node by node (mpirun/srun block placement), node-local.
GridCoord grid_coord(int world_rank, GridShape s);
// The inverse: (tp_rank, dp_rank) -> world rank.
int grid_world_rank(GridCoord c, GridShape s);
// World ranks of the TP group with this dp_rank / of the DP group with this tp_rank, in group-rank order.
std::vector<int> tp_group_ranks(int dp_rank, GridShape s);
std::vector<int> dp_group_ranks(int tp_rank, GridShape s);

// ---- preflight (pure) ---------------------------------------------------------------------------------

// What the preflight checks, gathered by the caller from the config, the model file and the
// environment, so the checks themselves stay a pure, testable function.
struct PreflightInput {
  GridShape shape;
  std::string config_file;  // named in errors about parallel.*
  std::string model_file;   // named in errors about the model's dimensions
  int64_t num_heads = 1;
  int64_t num_kv_heads = 1;
  int64_t intermediate_size = 1;
  int64_t vocab_size = 1;
  std::optional<int64_t> slurm_ntasks;  // SLURM_NTASKS when set
  bool check_slurm_ntasks = true;       // parallel.check_slurm_ntasks
  // parallel.deterministic_shards (0: off): the deterministic-reduction mode computes every TP
  // reduction as over this many virtual shards (docs/parallel.md); it must be a multiple of tp and
  // divide the heads, the KV heads and the FFN width, and the vocabulary is padded to a multiple of it.
  int64_t deterministic_shards = 0;
};

// How the model is sharded over a TP group of the checked size.
struct TpPlan {
  int tp = 1;
  int64_t heads_per_rank = 1;
  int64_t kv_heads_per_rank = 1;  // after replication
  int kv_replication = 1;         // > 1 when tp > num_kv_heads: each KV head lives on this many ranks
  int64_t ffn_per_rank = 1;
  int64_t padded_vocab = 1;       // vocab rounded up to a multiple of tp (of deterministic_shards when on); pad rows
                                  // are zeros, their logits never computed
  int64_t vocab_per_rank = 1;
  int pieces = 0;                 // deterministic mode: virtual shards per rank (deterministic_shards / tp); 0: off
  std::vector<std::string> notes;  // human-readable: replication and padding, for the start log
};

// Throws an Error naming the file and field of the first problem:
//   parallel.tp not dividing the world size; num_attention_heads, num_key_value_heads (neither a
//   multiple of tp nor dividing it) or intermediate_size not divisible by tp; SLURM_NTASKS set and
//   not equal to the world size (unless check_slurm_ntasks is false); deterministic_shards not a
//   multiple of tp or not dividing the heads, KV heads or intermediate_size.
TpPlan preflight(const PreflightInput& in);

// ---- the grid on a running MPI world -----------------------------------------------------------

class ProcessGrid {
 public:
  // Splits `world` (which must have shape.world ranks) into the TP and DP communicators.
  ProcessGrid(std::shared_ptr<MpiCommunicator> world, GridShape shape);
  ~ProcessGrid();

  GridShape shape() const { return shape_; }
  GridCoord coord() const { return coord_; }
  int world_rank() const;
  MpiCommunicator& world() { return *world_; }
  MpiCommunicator& tp() { return *tp_; }
  MpiCommunicator& dp() { return *dp_; }

 private:
  GridShape shape_;
  GridCoord coord_;
  std::shared_ptr<MpiCommunicator> world_;
  std::unique_ptr<MpiCommunicator> tp_, dp_;
};

}  // namespace opdlm::parallel
