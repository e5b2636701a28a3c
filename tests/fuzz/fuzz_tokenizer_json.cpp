// libFuzzer target: a tokenizer.json (the model, merges, added tokens, pre-tokenizer regex), then
// an encode and a decode of every id with the tokenizer it describes.
#include <cstdint>
#include <string_view>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto tok = opdlm::io::Tokenizer::from_json_string(text, "tokenizer.json");
    const auto ids = tok.encode("Hello, world! 3+4=7 <|endoftext|> ünïcödé\n\t  x");
    (void)tok.decode(ids);
    std::vector<int32_t> all;
    for (int64_t i = 0; i < tok.vocab_size() && i < 4096; ++i) all.push_back(static_cast<int32_t>(i));
    (void)tok.decode(all);
  });
  return 0;
}
