// Communicator: the collectives opdlm uses (all-reduce, reduce-scatter, all-gather, broadcast,
// barrier) behind one interface, with an MPI backend for CPUs (here) and an NCCL backend for GPUs
// (the CUDA issue). Every call goes through one non-virtual wrapper that records it in a per-rank
// FlightRecorder ring: (sequence number, communicator, op, bytes, start, end), for hang diagnosis.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

namespace opdlm::parallel {

enum class CollectiveOp { all_reduce, reduce_scatter, all_gather, broadcast, barrier };
enum class ReduceOp { sum, max };
enum class ElemType { f32, f64, i64, u8 };

const char* collective_op_name(CollectiveOp op);
const char* reduce_op_name(ReduceOp op);
size_t elem_size(ElemType t);

// ---- flight recorder --------------------------------------------------------------------------------

struct CollectiveRecord {
  uint64_t seq = 0;         // per communicator, from 0; equal on every member for the same call
  std::string comm;         // communicator name ("world", "tp", "dp")
  CollectiveOp op = CollectiveOp::barrier;
  size_t bytes = 0;         // payload this rank contributes (all-gather: its own piece)
  double start_s = 0;       // seconds since the recorder was made (steady clock)
  double end_s = -1;        // < 0 while the call is in flight: the call a hung rank is stuck in
};

// A fixed-size ring of the most recent collectives of every communicator of this rank.
class FlightRecorder {
 public:
  explicit FlightRecorder(size_t capacity = 4096);
  // Records the start of a call and returns its slot token for finish().
  uint64_t start(const std::string& comm, uint64_t seq, CollectiveOp op, size_t bytes);
  void finish(uint64_t token);
  // The records still in the ring, oldest first.
  std::vector<CollectiveRecord> snapshot() const;
  uint64_t total() const;  // calls ever recorded
  // Empties the ring and gives it room for `capacity` records (benches that read a whole run).
  void reset(size_t capacity);
  // One line per record: "seq comm op bytes start end|IN-FLIGHT".
  void dump(std::ostream& os) const;
  // The call in flight that started first, if any (the hang watchdog's question).
  std::optional<CollectiveRecord> oldest_in_flight() const;
  // Seconds since the recorder was made (the clock of start_s / end_s), and that moment's wall clock.
  double now() const;
  std::chrono::system_clock::time_point wall_t0() const { return wall_t0_; }
  // Seconds spent inside finished collectives since the recorder was made (waiting included): the
  // communication time of a step is the difference of two readings.
  double comm_seconds() const;

 private:
  mutable std::mutex mu_;
  std::vector<CollectiveRecord> ring_;
  uint64_t next_ = 0;  // tokens are absolute call numbers; slot = token % capacity
  std::chrono::steady_clock::time_point t0_;
  std::chrono::system_clock::time_point wall_t0_;
  double comm_s_ = 0;
};

// The process-wide recorder every communicator of this rank writes to.
FlightRecorder& flight_recorder();

// ---- the interface ---------------------------------------------------------------------------------

class Communicator {
 public:
  Communicator(std::string name, FlightRecorder& recorder) : name_(std::move(name)), rec_(&recorder) {}
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  const std::string& name() const { return name_; }
  uint64_t calls() const { return seq_; }  // collectives issued on this communicator so far

  // In place: buf <- op over ranks of buf.
  void all_reduce(std::span<float> buf, ReduceOp op = ReduceOp::sum);
  void all_reduce(std::span<double> buf, ReduceOp op = ReduceOp::sum);
  void all_reduce(std::span<int64_t> buf, ReduceOp op = ReduceOp::sum);
  // in has size() * out.size() elements; out <- sum over ranks of in's rank()-th chunk, summed in
  // the fixed pairwise tree over ranks (tree_sum.hpp): deterministic, the same bits as a serial
  // tree_combine of the same parts. Every backend must keep this order.
  void reduce_scatter(std::span<const float> in, std::span<float> out);
  void reduce_scatter(std::span<const double> in, std::span<double> out);
  // A sum whose bits do not depend on MPI's algorithm and are the same on every rank: reduce_scatter
  // (the fixed tree over ranks) then all_gather, on buf padded to a multiple of size(). For values
  // that replicas must agree on bit for bit (tensor-parallel activations and input gradients).
  void all_reduce_tree(std::span<float> buf);
  void all_reduce_tree(std::span<double> buf);
  // out has size() * in.size() elements; chunk r of out <- rank r's in.
  void all_gather(std::span<const float> in, std::span<float> out);
  void all_gather(std::span<const double> in, std::span<double> out);
  void all_gather(std::span<const int64_t> in, std::span<int64_t> out);
  // buf <- root's buf.
  void broadcast(std::span<float> buf, int root);
  void broadcast(std::span<double> buf, int root);
  void broadcast(std::span<int64_t> buf, int root);
  void broadcast(std::span<uint8_t> buf, int root);
  void barrier();

 protected:
  // Backends implement these; count is in elements of `type`.
  virtual void do_all_reduce(void* buf, size_t count, ElemType type, ReduceOp op) = 0;
  virtual void do_reduce_scatter(const void* in, void* out, size_t count_per_rank, ElemType type) = 0;
  virtual void do_all_gather(const void* in, void* out, size_t count_per_rank, ElemType type) = 0;
  virtual void do_broadcast(void* buf, size_t count, ElemType type, int root) = 0;
  virtual void do_barrier() = 0;

 private:
  // The one wrapper: checks sizes, records the call, runs it.
  template <class F>
  void recorded(CollectiveOp op, size_t bytes, F&& run);
  void check_chunks(const char* what, size_t big, size_t small) const;

  std::string name_;
  FlightRecorder* rec_;
  uint64_t seq_ = 0;
};

// ---- the deterministic-reduction mode ------------------------------------------------------------------

// A tensor-parallel sum whose bits do not depend on the TP size (docs/parallel.md): the reduced
// dimension is cut into C virtual shards, rank r of `tp` holding shards [r * pieces, (r + 1) * pieces)
// (C = pieces * tp.size()). `parts` holds this rank's `pieces` partials of out.size() values back to
// back; out <- the C partials all-gathered and combined by the fixed pairwise tree over the virtual
// shard index (tree_combine_into). With the partials computed shard by shard, one process holding all
// C shards and C ranks holding one each give the same bits.
void virtual_shard_sum(Communicator& tp, int pieces, std::span<const float> parts, std::span<float> out);
void virtual_shard_sum(Communicator& tp, int pieces, std::span<const double> parts, std::span<double> out);

// ---- one process without MPI ------------------------------------------------------------------------

// A communicator that claims (rank, size) without MPI. With size 1 every collective is the identity
// (a copy), so one-process runs and unit tests go through the same code as a DP group; with size > 1
// it only answers rank() and size() (for code that lays out shards) and any collective throws.
class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(int rank = 0, int size = 1);
  int rank() const override { return rank_; }
  int size() const override { return size_; }

 protected:
  void do_all_reduce(void*, size_t, ElemType, ReduceOp) override;
  void do_reduce_scatter(const void* in, void* out, size_t n, ElemType t) override;
  void do_all_gather(const void* in, void* out, size_t n, ElemType t) override;
  void do_broadcast(void*, size_t, ElemType, int) override;
  void do_barrier() override;

 private:
  void single_rank_only(const char* op) const;
  int rank_, size_;
};

// ---- MPI backend -------------------------------------------------------------------------------------

// Starts MPI once per process (MPI_Init_thread, FUNNELED; a singleton world without mpirun) and
// finalizes it at exit. MPI_ERRORS_RETURN is set on MPI_COMM_WORLD so MPI_CHECK reports failures.
class MpiRuntime {
 public:
  static void ensure_initialized();
  static bool initialized();
  // After an error on this rank: when MPI runs a world of more than one rank, MPI_Abort it (the other
  // ranks would wait forever in their next collective); otherwise nothing.
  static void abort_if_parallel(int exit_code);
};

class MpiCommunicator final : public Communicator {
 public:
  // MPI_COMM_WORLD (not freed).
  static std::shared_ptr<MpiCommunicator> world();
  // MPI_Comm_split of this communicator: ranks with the same color form one group, ordered by key.
  std::unique_ptr<MpiCommunicator> split(int color, int key, std::string name);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }

 protected:
  void do_all_reduce(void* buf, size_t count, ElemType type, ReduceOp op) override;
  void do_reduce_scatter(const void* in, void* out, size_t count_per_rank, ElemType type) override;
  void do_all_gather(const void* in, void* out, size_t count_per_rank, ElemType type) override;
  void do_broadcast(void* buf, size_t count, ElemType type, int root) override;
  void do_barrier() override;

 private:
  MpiCommunicator(MPI_Comm comm, bool owned, std::string name);
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace opdlm::parallel
