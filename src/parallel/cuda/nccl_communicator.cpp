// NCCL backend of the Communicator: device buffers, collectives enqueued on the compute stream. The
// reduce-scatter keeps the Communicator's fixed pairwise tree over ranks (grouped send/recv, then the
// tree_combine kernel), so its bits match the MPI backend and one process summing the same parts.
#include "opdlm/parallel/nccl_communicator.hpp"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "tree_combine.hpp"

namespace opdlm::parallel {

namespace {

ncclDataType_t nccl_type(ElemType t) {
  switch (t) {
    case ElemType::f32: return ncclFloat32;
    case ElemType::f64: return ncclFloat64;
    case ElemType::i64: return ncclInt64;
    case ElemType::u8: return ncclUint8;
  }
  OPDLM_FAIL("NcclCommunicator: unknown element type ", int(t));
}

ncclComm_t as_comm(void* c) { return static_cast<ncclComm_t>(c); }

}  // namespace

// ---- construction -----------------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(std::string name, FlightRecorder& recorder, cudaStream_t stream, bool synchronize)
    : Communicator(std::move(name), recorder), stream_(stream), synchronize_(synchronize) {}

NcclCommunicator::NcclCommunicator(MpiCommunicator& mpi, std::string name, FlightRecorder& recorder,
                                   cudaStream_t stream, bool synchronize)
    : NcclCommunicator(std::move(name), recorder, stream, synchronize) {
  ncclUniqueId id{};
  if (mpi.rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  MPI_CHECK(MPI_Bcast(&id, static_cast<int>(sizeof(id)), MPI_BYTE, 0, mpi.comm()));
  init(&id, mpi.rank(), mpi.size());
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::single(std::string name, FlightRecorder& recorder,
                                                           cudaStream_t stream, bool synchronize) {
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(std::move(name), recorder, stream, synchronize));
  ncclUniqueId id{};
  NCCL_CHECK(ncclGetUniqueId(&id));
  c->init(&id, 0, 1);
  return c;
}

void NcclCommunicator::init(const void* unique_id, int rank, int size) {
  ncclComm_t comm = nullptr;
  ncclUniqueId id;
  std::memcpy(&id, unique_id, sizeof(id));
  NCCL_CHECK(ncclCommInitRank(&comm, size, id, rank));
  comm_ = comm;
  rank_ = rank;
  size_ = size;
}

NcclCommunicator::~NcclCommunicator() {
  // Work still queued on the stream may use the staging buffer or the communicator: wait for it.
  // Errors are ignored here (never throw from a destructor).
  cudaStreamSynchronize(stream_);
  if (staging_) cudaFree(staging_);
  if (comm_) ncclCommDestroy(as_comm(comm_));
}

void NcclCommunicator::finish() {
  if (synchronize_) CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---- collectives --------------------------------------------------------------------------------------

void NcclCommunicator::do_all_reduce(void* buf, size_t count, ElemType type, ReduceOp op) {
  if (type == ElemType::u8) OPDLM_FAIL("all_reduce on '", name(), "': u8 is only supported by broadcast");
  if (count == 0) return;
  NCCL_CHECK(ncclAllReduce(buf, buf, count, nccl_type(type), op == ReduceOp::sum ? ncclSum : ncclMax, as_comm(comm_),
                           stream_));
  finish();
}

// Rank r receives every rank's chunk r into staging [size, count] (its own by a device copy), then
// one kernel sums the parts in the fixed tree order of tree_combine_into.
void NcclCommunicator::do_reduce_scatter(const void* in, void* out, size_t count_per_rank, ElemType type) {
  if (type != ElemType::f32 && type != ElemType::f64)
    OPDLM_FAIL("reduce_scatter on '", name(), "' supports f32 and f64");
  if (count_per_rank == 0) return;
  const size_t es = elem_size(type), chunk = count_per_rank * es;
  if (size_ == 1) {  // the sum of one part is the part
    CUDA_CHECK(cudaMemcpyAsync(out, in, chunk, cudaMemcpyDeviceToDevice, stream_));
    finish();
    return;
  }
  const size_t need = chunk * static_cast<size_t>(size_);
  if (staging_bytes_ < need) {
    // Grow outside steady state: earlier work on the stream may still read the old buffer.
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (staging_) CUDA_CHECK(cudaFree(staging_));
    staging_ = nullptr;
    staging_bytes_ = 0;
    CUDA_CHECK(cudaMalloc(&staging_, need));
    staging_bytes_ = need;
  }
  const char* src = static_cast<const char*>(in);
  char* stage = static_cast<char*>(staging_);
  const ncclDataType_t t = nccl_type(type);
  CUDA_CHECK(cudaMemcpyAsync(stage + size_t(rank_) * chunk, src + size_t(rank_) * chunk, chunk,
                             cudaMemcpyDeviceToDevice, stream_));
  NCCL_CHECK(ncclGroupStart());
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    NCCL_CHECK(ncclSend(src + size_t(p) * chunk, count_per_rank, t, p, as_comm(comm_), stream_));
    NCCL_CHECK(ncclRecv(stage + size_t(p) * chunk, count_per_rank, t, p, as_comm(comm_), stream_));
  }
  NCCL_CHECK(ncclGroupEnd());
  cuda::tree_combine_device(staging_, static_cast<size_t>(size_), count_per_rank, out, type, stream_);
  finish();
}

void NcclCommunicator::do_all_gather(const void* in, void* out, size_t count_per_rank, ElemType type) {
  if (count_per_rank == 0) return;
  NCCL_CHECK(ncclAllGather(in, out, count_per_rank, nccl_type(type), as_comm(comm_), stream_));
  finish();
}

void NcclCommunicator::do_broadcast(void* buf, size_t count, ElemType type, int root) {
  if (root < 0 || root >= size_) OPDLM_FAIL("broadcast on '", name(), "': root ", root, " outside [0, ", size_, ")");
  if (count == 0) return;
  NCCL_CHECK(ncclBroadcast(buf, buf, count, nccl_type(type), root, as_comm(comm_), stream_));
  finish();
}

// A one-byte all-reduce every rank must join, then a wait for it: the barrier always blocks,
// whatever synchronize_ says. The byte lives in the staging buffer (its value does not matter).
void NcclCommunicator::do_barrier() {
  if (staging_bytes_ < 256) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (staging_) CUDA_CHECK(cudaFree(staging_));
    staging_ = nullptr;
    staging_bytes_ = 0;
    CUDA_CHECK(cudaMalloc(&staging_, 256));
    staging_bytes_ = 256;
  }
  NCCL_CHECK(ncclAllReduce(staging_, staging_, 1, ncclUint8, ncclMax, as_comm(comm_), stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace opdlm::parallel
