// safetensors reader and writer (the Hugging Face weight format): an 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
// {str: str}}, then the tensor bytes. The reader validates the whole header before any data is
// touched (every error names the file and the tensor) and reads through mmap, never out of bounds.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::io {

// Headers larger than this are rejected as corrupt (real ones are a few hundred KB at most).
inline constexpr uint64_t kSafetensorsMaxHeader = 100ull << 20;

// Element type of one stored tensor. The reader accepts every safetensors dtype for validation;
// it converts F32, BF16 and F16 to float (others error when read as floats).
enum class StDType : uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, F8_E5M2, F8_E4M3 };
const char* st_dtype_name(StDType t);
size_t st_dtype_size(StDType t);
bool st_dtype_is_float(StDType t);  // F32, BF16, F16: convertible to f32 exactly

// IEEE binary16 -> binary32, exact for every input (subnormals normalised, inf kept, NaN payload
// kept in the high mantissa bits without quieting, as numpy does).
float f16_bits_to_f32(uint16_t h);
// f32 -> bf16 for storage: truncation when the low 16 bits are zero (bitwise exact for anything
// that came from bf16, signalling NaNs included), round-to-nearest-even otherwise.
uint16_t f32_to_bf16_storage(float f);

struct StEntry {
  std::string name;
  StDType dtype = StDType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

// A validated, memory-mapped safetensors file. Construction checks: header length sane and inside
// the file; header JSON an object without duplicate names; each entry with a known dtype, a
// non-negative integer shape and offsets whose span equals numel * dtype size (overflow-safe);
// the entries, sorted by offset, tile the data section exactly (no overlap, gap or trailing
// bytes); __metadata__ a {str: str} object. The file must not change while it is open (mmap).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& o) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& o) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Entries in data order (sorted by offset).
  const std::vector<StEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const;
  const StEntry& entry(const std::string& name) const;  // Error naming file and tensor when absent

  // Raw little-endian bytes of a tensor (inside the mapping; valid while this object lives).
  const uint8_t* raw(const std::string& name) const;
  // F32, BF16 or F16 converted exactly to an f32 tensor.
  Tensor read_f32(const std::string& name) const;
  // F32/BF16/F16 as a tensor of `dtype` (f32 or bf16): BF16 -> bf16 and F32 -> f32 are bit copies,
  // F32 -> bf16 rounds to nearest even.
  Tensor read(const std::string& name, DType dtype) const;
  // The same into an existing CPU f32 or bf16 tensor of the stored shape (no extra copy).
  void read_into(const std::string& name, Tensor& out) const;

 private:
  void close();
  std::string path_;
  int fd_ = -1;
  const uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;  // 8 + header length
  std::vector<StEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

enum class StoreDType : uint8_t { f32, bf16 };

// Bytes `tensors` take when stored as `dtype`.
uint64_t safetensors_data_bytes(const std::vector<model::NamedTensor>& tensors, StoreDType dtype);

// Writes `tensors` (CPU f32 or bf16) in the given order as F32 or BF16, atomically (temp + rename).
// The header is padded with spaces to a multiple of 8 bytes (as the reference writer does) and
// carries `metadata` as __metadata__ ({"format": "pt"} is what transformers expects).
void write_safetensors(const std::string& path, const std::vector<model::NamedTensor>& tensors,
                       StoreDType dtype, const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace opdlm::io
