// safetensors: header validation (every error names the file and the tensor), exact F16/BF16/F32 ->
// f32 conversion from an mmap'ed file, and an atomic F32/BF16 writer.
#include "opdlm/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "opdlm/base/error.hpp"
#include "opdlm/io/file_util.hpp"

static_assert(std::endian::native == std::endian::little, "safetensors is little endian; so is every host we target");

namespace opdlm::io {

namespace {

struct DTypeInfo {
  StDType t;
  const char* name;
  size_t size;
};
// Every dtype the format defines, so files with integer tensors still validate (and error only
// when such a tensor is read as floats).
constexpr DTypeInfo kDTypes[] = {
    {StDType::F64, "F64", 8},   {StDType::F32, "F32", 4},         {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2}, {StDType::I64, "I64", 8},         {StDType::I32, "I32", 4},
    {StDType::I16, "I16", 2},   {StDType::I8, "I8", 1},           {StDType::U64, "U64", 8},
    {StDType::U32, "U32", 4},   {StDType::U16, "U16", 2},         {StDType::U8, "U8", 1},
    {StDType::BOOL, "BOOL", 1}, {StDType::F8_E5M2, "F8_E5M2", 1}, {StDType::F8_E4M3, "F8_E4M3", 1},
};

const DTypeInfo& info(StDType t) {
  for (const auto& d : kDTypes)
    if (d.t == t) return d;
  OPDLM_FAIL("invalid StDType ", static_cast<int>(t));
}

std::string shape_text(const nlohmann::json& shape) { return shape.dump(); }

std::string offsets_text(uint64_t b, uint64_t e) {
  return detail::concat("[", b, ", ", e, "]");
}

}  // namespace

const char* st_dtype_name(StDType t) { return info(t).name; }
size_t st_dtype_size(StDType t) { return info(t).size; }
bool st_dtype_is_float(StDType t) { return t == StDType::F32 || t == StDType::BF16 || t == StDType::F16; }

float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf (mant 0) or NaN with its payload
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    u = sign;  // +-0
  } else {
    // Subnormal: mant * 2^-24. Shift the leading one up to the implicit-bit position (bit 10);
    // each shift lowers the exponent by one, starting from 2^-14 (biased 113).
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    u = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(u);
}

uint16_t f32_to_bf16_storage(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0xffffu) == 0) return static_cast<uint16_t>(u >> 16);  // exactly a bf16 value (NaNs too)
  return f32_to_bf16_bits(f);
}

// ---- reader -------------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) OPDLM_FAIL_AT(path, "", "cannot open safetensors file: ", std::strerror(errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) OPDLM_FAIL_AT(path, "", "cannot stat: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) OPDLM_FAIL_AT(path, "", "not a regular file");
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ < 8)
      OPDLM_FAIL_AT(path, "header", "file is ", size_, " bytes, too short for the 8-byte header length");
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (m == MAP_FAILED) OPDLM_FAIL_AT(path, "", "mmap failed: ", std::strerror(errno));
    map_ = static_cast<const uint8_t*>(m);

    uint64_t n = 0;
    std::memcpy(&n, map_, 8);
    if (n > kSafetensorsMaxHeader)
      OPDLM_FAIL_AT(path, "header", "header length ", n, " is absurd (limit ", kSafetensorsMaxHeader,
                    " bytes): not a safetensors file or corrupt");
    if (n > size_ - 8)
      OPDLM_FAIL_AT(path, "header", "header length ", n, " exceeds the file (", size_, " bytes): truncated?");
    if (n < 2 || map_[8] != '{') OPDLM_FAIL_AT(path, "header", "header JSON must start with '{'");
    data_start_ = 8 + n;
    const uint64_t data_len = size_ - data_start_;

    // Duplicate names would silently shadow each other in the parsed object: catch them here.
    std::set<std::string> seen;
    std::string dup;
    auto cb = [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
      if (ev == nlohmann::json::parse_event_t::key && depth == 1) {
        std::string k = parsed.get<std::string>();
        if (!seen.insert(k).second && dup.empty()) dup = k;
      }
      return true;
    };
    nlohmann::json h;
    try {
      h = nlohmann::json::parse(map_ + 8, map_ + 8 + n, cb);
    } catch (const nlohmann::json::exception& e) {
      OPDLM_FAIL_AT(path, "header", "bad header JSON: ", e.what());
    }
    if (!h.is_object()) OPDLM_FAIL_AT(path, "header", "header JSON must be an object");
    if (!dup.empty()) OPDLM_FAIL_AT(path, dup, "tensor '", dup, "' appears twice in the header");

    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) OPDLM_FAIL_AT(path, name, "__metadata__ must be an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            OPDLM_FAIL_AT(path, "__metadata__." + m.key(), "metadata values must be strings, got ", m.value().dump());
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) OPDLM_FAIL_AT(path, name, "tensor '", name, "': entry must be an object");
      StEntry e;
      e.name = name;
      // dtype
      if (!v.contains("dtype") || !v["dtype"].is_string())
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': missing or non-string dtype");
      const std::string dt = v["dtype"].get<std::string>();
      const DTypeInfo* di = nullptr;
      for (const auto& d : kDTypes)
        if (dt == d.name) di = &d;
      if (!di) OPDLM_FAIL_AT(path, name, "tensor '", name, "': unknown dtype '", dt, "'");
      e.dtype = di->t;
      // shape: non-negative integers; the element count is computed overflow-safe.
      if (!v.contains("shape") || !v["shape"].is_array())
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': missing or non-array shape");
      const auto& sh = v["shape"];
      uint64_t numel = 1;
      bool overflow = false;
      for (const auto& d : sh) {
        if (!d.is_number_integer())
          OPDLM_FAIL_AT(path, name, "tensor '", name, "': shape ", shape_text(sh), " has a non-integer dimension");
        if (!d.is_number_unsigned())
          OPDLM_FAIL_AT(path, name, "tensor '", name, "': shape ", shape_text(sh), " has a negative dimension");
        const uint64_t x = d.get<uint64_t>();
        if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          OPDLM_FAIL_AT(path, name, "tensor '", name, "': shape ", shape_text(sh), " has an absurd dimension");
        e.shape.push_back(static_cast<int64_t>(x));
        overflow = overflow || __builtin_mul_overflow(numel, x, &numel);
      }
      uint64_t nbytes = 0;
      overflow = overflow || __builtin_mul_overflow(numel, static_cast<uint64_t>(di->size), &nbytes);
      // data_offsets: [begin, end] into the data section.
      if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
          !v["data_offsets"][0].is_number_unsigned() || !v["data_offsets"][1].is_number_unsigned())
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': data_offsets must be two non-negative integers, got ",
                      v.contains("data_offsets") ? v["data_offsets"].dump() : std::string("nothing"));
      e.begin = v["data_offsets"][0].get<uint64_t>();
      e.end = v["data_offsets"][1].get<uint64_t>();
      if (e.end < e.begin)
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': data_offsets ", offsets_text(e.begin, e.end), " end before they begin");
      if (overflow || nbytes != e.end - e.begin)
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': shape ", shape_text(sh), " of ", dt, " needs ",
                      overflow ? std::string("more than 2^64") : std::to_string(nbytes), " bytes but data_offsets ",
                      offsets_text(e.begin, e.end), " span ", e.end - e.begin);
      if (e.end > data_len)
        OPDLM_FAIL_AT(path, name, "tensor '", name, "': data_offsets ", offsets_text(e.begin, e.end),
                      " reach past the end of the data section (", data_len, " bytes): file truncated?");
      entries_.push_back(std::move(e));
    }

    // The tensors must tile the data section exactly, in offset order (the format's rule).
    std::sort(entries_.begin(), entries_.end(), [](const StEntry& a, const StEntry& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.name < b.name;
    });
    uint64_t expect = 0;
    const StEntry* prev = nullptr;
    for (const auto& e : entries_) {
      if (e.begin < expect)
        OPDLM_FAIL_AT(path, e.name, "tensor '", e.name, "': data_offsets ", offsets_text(e.begin, e.end),
                      " overlap tensor '", prev->name, "' ", offsets_text(prev->begin, prev->end));
      if (e.begin > expect)
        OPDLM_FAIL_AT(path, e.name, "tensor '", e.name, "': data_offsets ", offsets_text(e.begin, e.end),
                      " leave a gap of ", e.begin - expect, " bytes after ",
                      prev ? "tensor '" + prev->name + "'" : std::string("the start of the data"));
      expect = e.end;
      prev = &e;
    }
    if (expect != data_len)
      OPDLM_FAIL_AT(path, prev ? prev->name : std::string("header"), data_len - expect,
                    " bytes after the last tensor", prev ? " '" + prev->name + "'" : std::string(),
                    " belong to no tensor (data section ", data_len, " bytes)");
    for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
  } catch (...) {
    close();
    throw;
  }
}

void SafetensorsFile::close() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
  if (fd_ >= 0) ::close(fd_);
  map_ = nullptr;
  fd_ = -1;
}

SafetensorsFile::~SafetensorsFile() { close(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    close();
    path_ = std::move(o.path_);
    fd_ = std::exchange(o.fd_, -1);
    map_ = std::exchange(o.map_, nullptr);
    size_ = std::exchange(o.size_, 0);
    data_start_ = o.data_start_;
    entries_ = std::move(o.entries_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

bool SafetensorsFile::has(const std::string& name) const { return index_.count(name) != 0; }

const StEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) OPDLM_FAIL_AT(path_, name, "no tensor '", name, "' in this file");
  return entries_[it->second];
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const { return map_ + data_start_ + entry(name).begin; }

void SafetensorsFile::read_into(const std::string& name, Tensor& out) const {
  const StEntry& e = entry(name);
  if (!st_dtype_is_float(e.dtype))
    OPDLM_FAIL_AT(path_, name, "tensor '", name, "' has dtype ", st_dtype_name(e.dtype),
                  "; only F32, BF16 and F16 convert to floats");
  if (!out.defined() || out.device() != Device::cpu || (out.dtype() != DType::f32 && out.dtype() != DType::bf16) ||
      out.shape() != e.shape)
    OPDLM_FAIL_AT(path_, name, "tensor '", name, "' (", st_dtype_name(e.dtype), shape_str(e.shape),
                  ") cannot be read into ", out.defined() ? out.describe() : std::string("an undefined tensor"));
  const uint8_t* src = map_ + data_start_ + e.begin;
  const int64_t n = out.numel();
  auto half = [&](int64_t i) {  // the data section need not be 2-byte aligned
    uint16_t b;
    std::memcpy(&b, src + 2 * i, 2);
    return b;
  };
  if (out.dtype() == DType::f32) {
    float* o = out.data<float>();
    // n > 0: an empty tensor has no storage, and memcpy from or to a null pointer is undefined
    // even for 0 bytes (UBSan).
    if (e.dtype == StDType::F32) {
      if (n > 0) std::memcpy(o, src, static_cast<size_t>(n) * 4);
    }
    else if (e.dtype == StDType::BF16) for (int64_t i = 0; i < n; ++i) o[i] = bf16_bits_to_f32(half(i));
    else for (int64_t i = 0; i < n; ++i) o[i] = f16_bits_to_f32(half(i));
  } else {
    bf16* o = out.data<bf16>();
    if (e.dtype == StDType::BF16) {
      if (n > 0) std::memcpy(o, src, static_cast<size_t>(n) * 2);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        float x;
        if (e.dtype == StDType::F32) std::memcpy(&x, src + 4 * i, 4);
        else x = f16_bits_to_f32(half(i));
        o[i].bits = f32_to_bf16_storage(x);  // round to nearest even
      }
    }
  }
}

Tensor SafetensorsFile::read_f32(const std::string& name) const { return read(name, DType::f32); }

Tensor SafetensorsFile::read(const std::string& name, DType dtype) const {
  if (dtype != DType::f32 && dtype != DType::bf16)
    OPDLM_FAIL_AT(path_, name, "can read tensors as f32 or bf16, not ", dtype_name(dtype));
  Tensor t = Tensor::empty(entry(name).shape, dtype);
  read_into(name, t);
  return t;
}

// ---- writer -------------------------------------------------------------------------------------

uint64_t safetensors_data_bytes(const std::vector<model::NamedTensor>& tensors, StoreDType dtype) {
  uint64_t n = 0;
  for (const auto& t : tensors) n += static_cast<uint64_t>(t.value.numel()) * (dtype == StoreDType::f32 ? 4 : 2);
  return n;
}

void write_safetensors(const std::string& path, const std::vector<model::NamedTensor>& tensors, StoreDType dtype,
                       const std::map<std::string, std::string>& metadata) {
  const size_t esize = dtype == StoreDType::f32 ? 4 : 2;
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t off = 0;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      OPDLM_FAIL_AT(path, t.name, "invalid tensor name '", t.name, "'");
    if (!names.insert(t.name).second) OPDLM_FAIL_AT(path, t.name, "tensor '", t.name, "' given twice");
    if (!t.value.defined() || t.value.device() != Device::cpu ||
        (t.value.dtype() != DType::f32 && t.value.dtype() != DType::bf16))
      OPDLM_FAIL_AT(path, t.name, "tensor '", t.name, "' must be a CPU f32 or bf16 tensor, got ",
                    t.value.defined() ? t.value.describe() : std::string("undefined"));
    const uint64_t n = static_cast<uint64_t>(t.value.numel()) * esize;
    h[t.name] = {{"dtype", dtype == StoreDType::f32 ? "F32" : "BF16"},
                 {"shape", t.value.shape()},
                 {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string header;
  try {
    header = h.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not valid UTF-8
    OPDLM_FAIL_AT(path, "header", "cannot encode header: ", e.what());
  }
  while (header.size() % 8 != 0) header.push_back(' ');  // data starts 8-byte aligned

  atomic_write_file(path, [&](const std::string& tmp) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(tmp.c_str(), "wb"), &std::fclose);
    if (!f) OPDLM_FAIL_AT(tmp, "", "cannot create file: ", std::strerror(errno));
    auto put = [&](const void* p, size_t n, const std::string& what) {
      if (n && std::fwrite(p, 1, n, f.get()) != n)
        OPDLM_FAIL_AT(path, what, "write failed: ", std::strerror(errno));
    };
    const uint64_t hl = header.size();
    put(&hl, 8, "header");
    put(header.data(), header.size(), "header");
    std::vector<uint8_t> buf;
    constexpr int64_t kChunk = 1 << 16;  // elements converted per write
    for (const auto& t : tensors) {
      const Tensor& v = t.value;
      const int64_t n = v.numel();
      const bool same = (dtype == StoreDType::f32) == (v.dtype() == DType::f32);
      if (same) {
        put(v.raw_data(), static_cast<size_t>(n) * esize, t.name);
        continue;
      }
      buf.resize(static_cast<size_t>(std::min(n, kChunk)) * esize);
      for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t m = std::min(kChunk, n - i0);
        if (dtype == StoreDType::bf16) {
          const float* src = v.data<float>() + i0;
          for (int64_t i = 0; i < m; ++i) {
            const uint16_t b = f32_to_bf16_storage(src[i]);
            std::memcpy(buf.data() + 2 * i, &b, 2);
          }
        } else {
          const bf16* src = v.data<bf16>() + i0;
          for (int64_t i = 0; i < m; ++i) {
            const float x = bf16_bits_to_f32(src[i].bits);
            std::memcpy(buf.data() + 4 * i, &x, 4);
          }
        }
        put(buf.data(), static_cast<size_t>(m) * esize, t.name);
      }
    }
    if (std::fclose(f.release()) != 0) OPDLM_FAIL_AT(path, "", "close failed: ", std::strerror(errno));
  });
}

}  // namespace opdlm::io
