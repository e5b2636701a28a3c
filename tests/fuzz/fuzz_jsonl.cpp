// libFuzzer target: a conversion-prompt JSONL dataset (one record per line: id, prompt, response).
#include <cstdint>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/jsonl_dataset.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = opdlm::fuzz::write_input("prompts.jsonl", data, size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto ds = opdlm::io::load_prompt_jsonl(path);
    for (const auto& r : ds.records) (void)opdlm::io::prompt_record_to_json(r);
  });
  return 0;
}
