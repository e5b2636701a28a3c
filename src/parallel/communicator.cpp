// Communicator wrapper (size checks + flight recorder), the recorder ring, LocalCommunicator and the MPI backend.
#include "opdlm/parallel/communicator.hpp"

#include <cstring>
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <iomanip>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/parallel/tree_sum.hpp"

namespace opdlm::parallel {

const char* collective_op_name(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::all_reduce: return "all_reduce";
    case CollectiveOp::reduce_scatter: return "reduce_scatter";
    case CollectiveOp::all_gather: return "all_gather";
    case CollectiveOp::broadcast: return "broadcast";
    case CollectiveOp::barrier: return "barrier";
  }
  return "?";
}

const char* reduce_op_name(ReduceOp op) { return op == ReduceOp::sum ? "sum" : "max"; }

size_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::f32: return 4;
    case ElemType::f64: return 8;
    case ElemType::i64: return 8;
    case ElemType::u8: return 1;
  }
  return 0;
}

// ---- flight recorder --------------------------------------------------------------------------------

FlightRecorder::FlightRecorder(size_t capacity)
    : ring_(std::max<size_t>(capacity, 1)), t0_(std::chrono::steady_clock::now()), wall_t0_(std::chrono::system_clock::now()) {}

double FlightRecorder::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

uint64_t FlightRecorder::start(const std::string& comm, uint64_t seq, CollectiveOp op, size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t token = next_++;
  ring_[token % ring_.size()] = CollectiveRecord{seq, comm, op, bytes, now(), -1.0};
  return token;
}

void FlightRecorder::finish(uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  const double t = now();
  if (next_ - token > ring_.size()) return;  // overwritten by newer calls already
  CollectiveRecord& r = ring_[token % ring_.size()];
  r.end_s = t;
  comm_s_ += t - r.start_s;
}

double FlightRecorder::comm_seconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  return comm_s_;
}

std::vector<CollectiveRecord> FlightRecorder::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<CollectiveRecord> out;
  const uint64_t n = std::min<uint64_t>(next_, ring_.size());
  out.reserve(n);
  for (uint64_t t = next_ - n; t < next_; ++t) out.push_back(ring_[t % ring_.size()]);
  return out;
}

std::optional<CollectiveRecord> FlightRecorder::oldest_in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t n = std::min<uint64_t>(next_, ring_.size());
  for (uint64_t t = next_ - n; t < next_; ++t)
    if (ring_[t % ring_.size()].end_s < 0) return ring_[t % ring_.size()];
  return std::nullopt;
}

uint64_t FlightRecorder::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_;
}

void FlightRecorder::reset(size_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  ring_.assign(std::max<size_t>(capacity, 1), CollectiveRecord{});
  next_ = 0;
}

void FlightRecorder::dump(std::ostream& os) const {
  os << "# seq comm op bytes start_s end_s\n";
  for (const auto& r : snapshot()) {
    os << r.seq << ' ' << r.comm << ' ' << collective_op_name(r.op) << ' ' << r.bytes << ' ' << std::fixed
       << std::setprecision(6) << r.start_s << ' ';
    if (r.end_s < 0)
      os << "IN-FLIGHT";
    else
      os << r.end_s;
    os << '\n';
  }
}

FlightRecorder& flight_recorder() {
  static FlightRecorder rec;
  return rec;
}

// ---- the wrapper ------------------------------------------------------------------------------------

template <class F>
void Communicator::recorded(CollectiveOp op, size_t bytes, F&& run) {
  const uint64_t token = rec_->start(name_, seq_++, op, bytes);
  run();
  rec_->finish(token);
}

void Communicator::check_chunks(const char* what, size_t big, size_t small) const {
  if (big != small * static_cast<size_t>(size()))
    OPDLM_FAIL(what, " on communicator '", name_, "': the full buffer has ", big, " elements, expected ", size(),
               " x ", small);
}

void Communicator::all_reduce(std::span<float> b, ReduceOp op) {
  recorded(CollectiveOp::all_reduce, b.size_bytes(), [&] { do_all_reduce(b.data(), b.size(), ElemType::f32, op); });
}
void Communicator::all_reduce(std::span<double> b, ReduceOp op) {
  recorded(CollectiveOp::all_reduce, b.size_bytes(), [&] { do_all_reduce(b.data(), b.size(), ElemType::f64, op); });
}
void Communicator::all_reduce(std::span<int64_t> b, ReduceOp op) {
  recorded(CollectiveOp::all_reduce, b.size_bytes(), [&] { do_all_reduce(b.data(), b.size(), ElemType::i64, op); });
}

void Communicator::reduce_scatter(std::span<const float> in, std::span<float> out) {
  check_chunks("reduce_scatter", in.size(), out.size());
  recorded(CollectiveOp::reduce_scatter, in.size_bytes(),
           [&] { do_reduce_scatter(in.data(), out.data(), out.size(), ElemType::f32); });
}
void Communicator::reduce_scatter(std::span<const double> in, std::span<double> out) {
  check_chunks("reduce_scatter", in.size(), out.size());
  recorded(CollectiveOp::reduce_scatter, in.size_bytes(),
           [&] { do_reduce_scatter(in.data(), out.data(), out.size(), ElemType::f64); });
}

void Communicator::all_gather(std::span<const float> in, std::span<float> out) {
  check_chunks("all_gather", out.size(), in.size());
  recorded(CollectiveOp::all_gather, in.size_bytes(), [&] { do_all_gather(in.data(), out.data(), in.size(), ElemType::f32); });
}
void Communicator::all_gather(std::span<const double> in, std::span<double> out) {
  check_chunks("all_gather", out.size(), in.size());
  recorded(CollectiveOp::all_gather, in.size_bytes(), [&] { do_all_gather(in.data(), out.data(), in.size(), ElemType::f64); });
}
void Communicator::all_gather(std::span<const int64_t> in, std::span<int64_t> out) {
  check_chunks("all_gather", out.size(), in.size());
  recorded(CollectiveOp::all_gather, in.size_bytes(), [&] { do_all_gather(in.data(), out.data(), in.size(), ElemType::i64); });
}

void Communicator::broadcast(std::span<float> b, int root) {
  recorded(CollectiveOp::broadcast, b.size_bytes(), [&] { do_broadcast(b.data(), b.size(), ElemType::f32, root); });
}
void Communicator::broadcast(std::span<double> b, int root) {
  recorded(CollectiveOp::broadcast, b.size_bytes(), [&] { do_broadcast(b.data(), b.size(), ElemType::f64, root); });
}
void Communicator::broadcast(std::span<int64_t> b, int root) {
  recorded(CollectiveOp::broadcast, b.size_bytes(), [&] { do_broadcast(b.data(), b.size(), ElemType::i64, root); });
}
void Communicator::broadcast(std::span<uint8_t> b, int root) {
  recorded(CollectiveOp::broadcast, b.size_bytes(), [&] { do_broadcast(b.data(), b.size(), ElemType::u8, root); });
}

void Communicator::barrier() {
  recorded(CollectiveOp::barrier, 0, [&] { do_barrier(); });
}

namespace {
template <class T>
void tree_all_reduce(Communicator& c, std::span<T> buf) {
  const size_t n = buf.size(), p = static_cast<size_t>(c.size());
  if (p == 1) return;  // one rank: the sum is the value
  const size_t chunk = (n + p - 1) / p;
  std::vector<T> in(chunk * p, T(0)), mine(chunk), all(chunk * p);
  std::copy(buf.begin(), buf.end(), in.begin());
  c.reduce_scatter(std::span<const T>(in), std::span<T>(mine));
  c.all_gather(std::span<const T>(mine), std::span<T>(all));
  std::copy(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), buf.begin());
}
}  // namespace

void Communicator::all_reduce_tree(std::span<float> buf) { tree_all_reduce(*this, buf); }
void Communicator::all_reduce_tree(std::span<double> buf) { tree_all_reduce(*this, buf); }

namespace {
template <class T>
void virtual_sum(Communicator& tp, int pieces, std::span<const T> parts, std::span<T> out) {
  OPDLM_CHECK(pieces >= 1 && parts.size() == size_t(pieces) * out.size(), "virtual_shard_sum: ", parts.size(),
              " values for ", pieces, " pieces of ", out.size());
  std::vector<T> all(parts.size() * size_t(tp.size()));
  tp.all_gather(parts, std::span<T>(all));  // rank r's pieces land at r * pieces: the virtual shard order
  tree_combine_into(all.data(), size_t(pieces) * size_t(tp.size()), out.size(), out.data());
}
}  // namespace

void virtual_shard_sum(Communicator& tp, int pieces, std::span<const float> parts, std::span<float> out) {
  virtual_sum(tp, pieces, parts, out);
}
void virtual_shard_sum(Communicator& tp, int pieces, std::span<const double> parts, std::span<double> out) {
  virtual_sum(tp, pieces, parts, out);
}

// ---- LocalCommunicator --------------------------------------------------------------------------------

LocalCommunicator::LocalCommunicator(int rank, int size) : Communicator("local", flight_recorder()), rank_(rank), size_(size) {
  if (size < 1 || rank < 0 || rank >= size) OPDLM_FAIL("LocalCommunicator: rank ", rank, " of size ", size);
}

void LocalCommunicator::single_rank_only(const char* op) const {
  if (size_ != 1) OPDLM_FAIL("LocalCommunicator of size ", size_, " cannot run ", op, " (it has no other ranks)");
}
void LocalCommunicator::do_all_reduce(void*, size_t, ElemType, ReduceOp) { single_rank_only("all_reduce"); }
void LocalCommunicator::do_reduce_scatter(const void* in, void* out, size_t n, ElemType t) {
  single_rank_only("reduce_scatter");
  std::memcpy(out, in, n * elem_size(t));
}
void LocalCommunicator::do_all_gather(const void* in, void* out, size_t n, ElemType t) {
  single_rank_only("all_gather");
  std::memcpy(out, in, n * elem_size(t));
}
void LocalCommunicator::do_broadcast(void*, size_t, ElemType, int) { single_rank_only("broadcast"); }
void LocalCommunicator::do_barrier() { single_rank_only("barrier"); }

// ---- MPI backend -------------------------------------------------------------------------------------

namespace {

MPI_Datatype mpi_type(ElemType t) {
  switch (t) {
    case ElemType::f32: return MPI_FLOAT;
    case ElemType::f64: return MPI_DOUBLE;
    case ElemType::i64: return MPI_INT64_T;
    case ElemType::u8: return MPI_UINT8_T;
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::sum ? MPI_SUM : MPI_MAX; }

// MPI counts are int: in-place all-reduce and broadcast go in pieces; the gathers need one count.
constexpr size_t kMaxPiece = size_t{1} << 30;

int mpi_count(size_t n, const char* what) {
  if (n > static_cast<size_t>(INT_MAX)) OPDLM_FAIL(what, ": ", n, " elements per rank exceeds MPI's int count");
  return static_cast<int>(n);
}

void finalize_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace

bool MpiRuntime::initialized() {
  int init = 0;
  MPI_Initialized(&init);
  return init != 0;
}

void MpiRuntime::ensure_initialized() {
  if (initialized()) return;
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  std::atexit(finalize_at_exit);
}

void MpiRuntime::abort_if_parallel(int exit_code) {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!initialized() || finalized) return;
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, exit_code);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned, std::string name)
    : Communicator(std::move(name), flight_recorder()), comm_(comm), owned_(owned) {
  MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owned_ && !finalized) MPI_Comm_free(&comm_);
}

std::shared_ptr<MpiCommunicator> MpiCommunicator::world() {
  MpiRuntime::ensure_initialized();
  return std::shared_ptr<MpiCommunicator>(new MpiCommunicator(MPI_COMM_WORLD, false, "world"));
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key, std::string name) {
  MPI_Comm c = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split(comm_, color, key, &c));
  MPI_CHECK(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
  return std::unique_ptr<MpiCommunicator>(new MpiCommunicator(c, true, std::move(name)));
}

void MpiCommunicator::do_all_reduce(void* buf, size_t count, ElemType type, ReduceOp op) {
  auto* p = static_cast<char*>(buf);
  for (size_t off = 0; off < count; off += kMaxPiece) {
    const size_t n = std::min(kMaxPiece, count - off);
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p + off * elem_size(type), static_cast<int>(n), mpi_type(type), mpi_op(op), comm_));
  }
}

// Deterministic: an all-to-all hands each rank every rank's copy of its chunk, which it sums in the
// fixed pairwise tree over ranks (tree_sum.hpp), so the bits do not depend on MPI's algorithm choice
// and match one process summing the same parts by the same tree. Same bytes on the wire as a
// reduce-scatter by pairwise exchange; one extra chunk-sized buffer per rank.
void MpiCommunicator::do_reduce_scatter(const void* in, void* out, size_t count_per_rank, ElemType type) {
  if (size_ == 1) {  // the sum of one part is the part (a one-rank DP group: no model-sized copies)
    std::memcpy(out, in, count_per_rank * elem_size(type));
    return;
  }
  const int n = mpi_count(count_per_rank, "reduce_scatter");
  std::vector<char> parts(static_cast<size_t>(size_) * count_per_rank * elem_size(type));
  MPI_CHECK(MPI_Alltoall(in, n, mpi_type(type), parts.data(), n, mpi_type(type), comm_));
  if (type == ElemType::f32)
    tree_combine_into(reinterpret_cast<const float*>(parts.data()), size_t(size_), count_per_rank, static_cast<float*>(out));
  else if (type == ElemType::f64)
    tree_combine_into(reinterpret_cast<const double*>(parts.data()), size_t(size_), count_per_rank, static_cast<double*>(out));
  else
    OPDLM_FAIL("reduce_scatter supports f32 and f64");
}

void MpiCommunicator::do_all_gather(const void* in, void* out, size_t count_per_rank, ElemType type) {
  if (size_ == 1) {
    std::memcpy(out, in, count_per_rank * elem_size(type));
    return;
  }
  const int n = mpi_count(count_per_rank, "all_gather");
  MPI_CHECK(MPI_Allgather(in, n, mpi_type(type), out, n, mpi_type(type), comm_));
}

void MpiCommunicator::do_broadcast(void* buf, size_t count, ElemType type, int root) {
  if (root < 0 || root >= size_) OPDLM_FAIL("broadcast on '", name(), "': root ", root, " outside [0, ", size_, ")");
  auto* p = static_cast<char*>(buf);
  for (size_t off = 0; off < count; off += kMaxPiece) {
    const size_t n = std::min(kMaxPiece, count - off);
    MPI_CHECK(MPI_Bcast(p + off * elem_size(type), static_cast<int>(n), mpi_type(type), root, comm_));
  }
}

void MpiCommunicator::do_barrier() { MPI_CHECK(MPI_Barrier(comm_)); }

}  // namespace opdlm::parallel
