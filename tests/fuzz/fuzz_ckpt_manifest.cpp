// libFuzzer target: a checkpoint's MANIFEST.json, verified against a directory that holds one real
// small file ("state.h5" is not HDF5 here: the manifest's names, sizes and checksums are the input).
#include <cstdint>
#include <filesystem>
#include <fstream>

#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = opdlm::fuzz::scratch_dir() + "/step_00000001";
    std::filesystem::create_directories(d);
    std::ofstream(d + "/shard_tp0.bin") << "0123456789";
    return d;
  }();
  opdlm::fuzz::write_input(std::string("step_00000001/") + opdlm::io::kCheckpointManifest, data, size);
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY((void)opdlm::io::verify_checkpoint(dir));
  return 0;
}
