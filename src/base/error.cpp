// opdlm::Error formatting and the process-wide (rank, step) context merged into every error.
#include "opdlm/base/error.hpp"

#include <atomic>

namespace opdlm {
namespace {
std::atomic<int> g_rank{-1};
std::atomic<int64_t> g_step{-1};

std::string format(const std::string& what, const ErrorContext& c) {
  std::ostringstream os;
  os << what;
  if (!c.file.empty() || !c.field.empty()) {
    os << " [";
    if (!c.file.empty()) os << "file " << c.file;
    if (!c.file.empty() && !c.field.empty()) os << ", ";
    if (!c.field.empty()) os << "field " << c.field;
    os << "]";
  }
  if (c.rank >= 0) os << " (rank " << c.rank;
  if (c.step >= 0) os << (c.rank >= 0 ? ", " : " (") << "step " << c.step;
  if (c.rank >= 0 || c.step >= 0) os << ")";
  if (c.src_file) os << " at " << c.src_file << ":" << c.src_line;
  return os.str();
}

ErrorContext with_globals(ErrorContext c) {
  if (c.rank < 0) c.rank = g_rank.load(std::memory_order_relaxed);
  if (c.step < 0) c.step = g_step.load(std::memory_order_relaxed);
  return c;
}
}  // namespace

Error::Error(std::string what, ErrorContext ctx)
    : std::runtime_error(format(what, with_globals(ctx))), message_(std::move(what)),
      ctx_(with_globals(std::move(ctx))) {}

void set_error_rank(int rank) { g_rank.store(rank, std::memory_order_relaxed); }
void set_error_step(int64_t step) { g_step.store(step, std::memory_order_relaxed); }
int error_rank() { return g_rank.load(std::memory_order_relaxed); }
int64_t error_step() { return g_step.load(std::memory_order_relaxed); }

void throw_error(const char* src_file, int src_line, std::string what, std::string file,
                 std::string field) {
  ErrorContext c;
  c.file = std::move(file);
  c.field = std::move(field);
  c.src_file = src_file;
  c.src_line = src_line;
  throw Error(std::move(what), std::move(c));
}

}  // namespace opdlm
