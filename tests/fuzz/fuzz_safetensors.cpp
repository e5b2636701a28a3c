// libFuzzer target: a safetensors file (8-byte header length, JSON header, tensor table, data):
// opened, every tensor read (float ones converted), raw bytes touched.
#include <cstdint>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = opdlm::fuzz::write_input("model.safetensors", data, size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY({
    opdlm::io::SafetensorsFile f(path);
    volatile uint8_t sink = 0;
    for (const auto& e : f.entries()) {
      const uint8_t* raw = f.raw(e.name);
      if (e.end > e.begin) sink = sink + raw[0] + raw[e.end - e.begin - 1];
      if (e.dtype == opdlm::io::StDType::F32 || e.dtype == opdlm::io::StDType::BF16 || e.dtype == opdlm::io::StDType::F16)
        (void)f.read_f32(e.name);
    }
    (void)f.metadata();
  });
  return 0;
}
