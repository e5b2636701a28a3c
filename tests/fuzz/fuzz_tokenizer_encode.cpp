// libFuzzer target: encode arbitrary bytes (invalid UTF-8 included) and decode arbitrary ids with a
// real tokenizer: $OPDLM_FUZZ_TOKENIZER, else the seed tokenizer next to this target's corpus.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/tokenizer.hpp"

namespace {
std::unique_ptr<opdlm::io::Tokenizer> g_tok;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* path = std::getenv("OPDLM_FUZZ_TOKENIZER");
  g_tok = std::make_unique<opdlm::io::Tokenizer>(
      opdlm::io::Tokenizer::from_file(path && *path ? path : OPDLM_FUZZ_DEFAULT_TOKENIZER));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto ids = g_tok->encode(text);
    // Valid UTF-8 round-trips exactly (byte-level BPE, no normalization of already-NFC text is not
    // guaranteed, so only check that decoding works).
    (void)g_tok->decode(ids);
  });
  // The same bytes as ids (4 bytes each), in and out of the vocabulary.
  std::vector<int32_t> ids(size / 4);
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY((void)g_tok->decode(ids));
  return 0;
}
