// libFuzzer target: the training config as users write it: an INI file (the input up to a "\n@@@\n"
// line) and command-line overrides (one per following line), resolved against the conversion schema
// and turned into OpdTrainOptions (every range and enum check).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "opdlm/base/config.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/train/opd_trainer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  const std::string ini = opdlm::fuzz::write_input("run.ini", opdlm::fuzz::take_part(rest));
  std::vector<std::string> overrides;
  while (!rest.empty()) {
    const size_t nl = rest.find('\n');
    overrides.emplace_back(rest.substr(0, nl));
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
  }
  static const auto schema = opdlm::train::OpdTrainOptions::schema();
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    const auto cfg = opdlm::load_config(schema, ini, overrides);
    (void)opdlm::train::OpdTrainOptions::from_config(cfg, opdlm::train::ConversionMode::opd);
  });
  return 0;
}
