// libFuzzer target: a token shard (.bin: magic, version, dtype, counts, tokenizer hash, CRCs,
// document offsets, ids).
#include <cstdint>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/token_shard.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = opdlm::fuzz::write_input("shard.bin", data, size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto s = opdlm::io::TokenShard::read(path);
    for (uint64_t i = 0; i < s.num_documents() && i < 64; ++i) (void)s.document(i);
  });
  return 0;
}
