// Helpers shared by the libFuzzer targets: a private scratch folder, the input as a file, and the one
// outcome a parser may have besides success: an opdlm::Error (a clear message naming file and field).
// Anything else (a crash, a sanitizer report, another exception, a hang, an allocation past
// -malloc_limit_mb) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace opdlm::fuzz {

// A folder of this process for the inputs (created once, under $TMPDIR or /tmp).
const std::string& scratch_dir();
// Writes bytes to scratch_dir()/name and returns the path.
std::string write_input(const std::string& name, const uint8_t* data, size_t size);
std::string write_input(const std::string& name, std::string_view bytes);

// Splits the input at the first occurrence of `sep` (a multi-byte marker unlikely in seeds): the
// parts of structured targets. Missing separators give empty tails.
std::string_view take_part(std::string_view& rest, std::string_view sep = "\n@@@\n");

}  // namespace opdlm::fuzz

// Runs the parser body; an opdlm::Error is the expected way to refuse an input.
#define OPDLM_FUZZ_EXPECT_ERRORS_ONLY(body) \
  try {                                     \
    body;                                   \
  } catch (const ::opdlm::Error&) {         \
  }
