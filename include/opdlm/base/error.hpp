// opdlm::Error: the one exception type, carrying what went wrong and where (file/field, rank, step,
// source location), plus the OPDLM_CHECK / OPDLM_FAIL macros every layer uses to raise it.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace opdlm {

// Where an error happened. Empty strings / negative numbers mean "not known".
struct ErrorContext {
  std::string file;   // user-visible input the error is about (config, checkpoint, safetensors, ...)
  std::string field;  // key, tensor name or dimension inside that input
  int rank = -1;      // MPI world rank, filled from the process-wide context when not given
  int64_t step = -1;  // training step, idem
  const char* src_file = nullptr;  // C++ source location that raised it
  int src_line = 0;
};

class Error : public std::runtime_error {
 public:
  Error(std::string what, ErrorContext ctx);
  const ErrorContext& context() const { return ctx_; }
  // The bare message without the formatted context.
  const std::string& message() const { return message_; }

 private:
  std::string message_;
  ErrorContext ctx_;
};

// Process-wide context merged into every Error: the trainer sets rank once and the step as it goes.
void set_error_rank(int rank);
void set_error_step(int64_t step);
int error_rank();
int64_t error_step();

// Builds and throws an Error; used by the macros so the call sites stay one line.
[[noreturn]] void throw_error(const char* src_file, int src_line, std::string what,
                              std::string file = {}, std::string field = {});

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace opdlm

// Raise an Error with a streamed message: OPDLM_FAIL("bad value ", v).
#define OPDLM_FAIL(...) ::opdlm::throw_error(__FILE__, __LINE__, ::opdlm::detail::concat(__VA_ARGS__))
// Raise an Error about a named input: OPDLM_FAIL_AT(path, "model.hidden_size", "must be > 0").
#define OPDLM_FAIL_AT(file, field, ...) \
  ::opdlm::throw_error(__FILE__, __LINE__, ::opdlm::detail::concat(__VA_ARGS__), (file), (field))
// Check an invariant; the message is only built when it fails.
#define OPDLM_CHECK(cond, ...)                                                                   \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::opdlm::throw_error(__FILE__, __LINE__,                                                   \
                           ::opdlm::detail::concat("check failed: " #cond ": ", __VA_ARGS__)); \
  } while (0)
