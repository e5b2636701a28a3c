// libFuzzer target: a Hugging Face config.json for Qwen3 (JSON text -> Qwen3Config, then the
// derived sizes a model would allocate from).
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string_view>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/model/qwen3_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) return 0;  // not JSON: nlohmann's own parser is not ours to fuzz
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto c = opdlm::model::Qwen3Config::from_json(j, "config.json");
    volatile int64_t sink = c.num_params();
    (void)sink;
    (void)c.to_json();
  });
  return 0;
}
