// Scratch files and input splitting for the fuzz targets (see fuzz_util.hpp).
#include "fuzz_util.hpp"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace opdlm::fuzz {

const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/opdlm_fuzz.XXXXXX";
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    // Removed at exit: a fuzz run must not leave its scratch files behind.
    static std::string keep = tmpl;
    std::atexit([] { std::error_code ec; std::filesystem::remove_all(keep, ec); });
    return tmpl;
  }();
  return dir;
}

std::string write_input(const std::string& name, std::string_view bytes) {
  const std::string path = scratch_dir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  return write_input(name, std::string_view(reinterpret_cast<const char*>(data), size));
}

std::string_view take_part(std::string_view& rest, std::string_view sep) {
  const size_t at = rest.find(sep);
  std::string_view part = rest.substr(0, at);
  rest = at == std::string_view::npos ? std::string_view() : rest.substr(at + sep.size());
  return part;
}

}  // namespace opdlm::fuzz
