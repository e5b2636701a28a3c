// NCCL backend of the Communicator (CUDA builds): buffers are DEVICE pointers; one NCCL communicator
// per TP or DP group, its unique id made by the group's rank 0 and broadcast over the group's MPI
// communicator; collectives are enqueued on the compute stream, so they are ordered with the kernels.
#pragma once

#include <memory>
#include <string>

#include "opdlm/parallel/communicator.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace opdlm::parallel {

class NcclCommunicator final : public Communicator {
 public:
  // The group of `mpi` (e.g. a ProcessGrid's tp or dp communicator): rank 0 calls ncclGetUniqueId,
  // MPI broadcasts it, every rank calls ncclCommInitRank on the current CUDA device. `stream` is the
  // stream that collectives are enqueued on (nullptr: the legacy default stream). With
  // synchronize = true every collective waits for its stream before returning (host code may read
  // the result at once, and the flight recorder's timings are real); false leaves ordering to the stream.
  NcclCommunicator(MpiCommunicator& mpi, std::string name, FlightRecorder& recorder, cudaStream_t stream,
                   bool synchronize = true);
  // A single-rank group without MPI (tests on one GPU; every collective is the identity / a copy
  // through NCCL).
  static std::unique_ptr<NcclCommunicator> single(std::string name, FlightRecorder& recorder, cudaStream_t stream,
                                                  bool synchronize = true);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  cudaStream_t stream() const { return stream_; }

 protected:
  // all_reduce: ncclAllReduce (fast, order up to NCCL). reduce_scatter: the fixed pairwise tree over
  // ranks of tree_sum.hpp, as the Communicator contract requires: grouped ncclSend/ncclRecv bring
  // every rank's chunk r to rank r, then one kernel combines them in the tree order.
  void do_all_reduce(void* buf, size_t count, ElemType type, ReduceOp op) override;
  void do_reduce_scatter(const void* in, void* out, size_t count_per_rank, ElemType type) override;
  void do_all_gather(const void* in, void* out, size_t count_per_rank, ElemType type) override;
  void do_broadcast(void* buf, size_t count, ElemType type, int root) override;
  void do_barrier() override;

 private:
  NcclCommunicator(std::string name, FlightRecorder& recorder, cudaStream_t stream, bool synchronize);
  void init(const void* unique_id, int rank, int size);
  void finish();  // stream sync when synchronize_
  void* comm_ = nullptr;  // ncclComm_t
  cudaStream_t stream_ = nullptr;
  bool synchronize_ = true;
  int rank_ = 0, size_ = 1;
  void* staging_ = nullptr;  // device buffer for reduce_scatter's gathered chunks (grown on demand)
  size_t staging_bytes_ = 0;
};

}  // namespace opdlm::parallel
