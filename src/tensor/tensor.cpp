// Tensor storage, views, dtype conversion and the shape checks every op uses.
#include "opdlm/tensor/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace opdlm {

// CUDA storage lives in src/tensor/cuda/ and only exists in CUDA builds.
namespace detail {
void* cuda_alloc(size_t nbytes);
void cuda_free(void* p);
void cuda_memset0(void* p, size_t nbytes);
void cuda_copy(void* dst, Device dd, const void* src, Device sd, size_t nbytes);
void cuda_convert_f32_to_bf16(const void* in, void* out, int64_t n);
void cuda_convert_bf16_to_f32(const void* in, void* out, int64_t n);
}  // namespace detail

#ifndef OPDLM_HAVE_CUDA
namespace detail {
[[noreturn]] static void no_cuda() { OPDLM_FAIL("this opdlm was built without CUDA (configure with nvcc on PATH and -DOPDLM_CUDA=ON)"); }
void* cuda_alloc(size_t) { no_cuda(); }
void cuda_free(void*) {}
void cuda_memset0(void*, size_t) { no_cuda(); }
void cuda_copy(void*, Device, const void*, Device, size_t) { no_cuda(); }
void cuda_convert_f32_to_bf16(const void*, void*, int64_t) { no_cuda(); }
void cuda_convert_bf16_to_f32(const void*, void*, int64_t) { no_cuda(); }
}  // namespace detail
#endif

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::i32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// ---- host block cache -----------------------------------------------------------------------------
namespace {

class HostBlockCache {
 public:
  HostBlockCache() {
    if (const char* e = std::getenv("OPDLM_HOST_CACHE_MB")) {
      char* end = nullptr;
      const unsigned long long mb = std::strtoull(e, &end, 10);
      if (end == e || *end != '\0')
        OPDLM_FAIL("environment variable OPDLM_HOST_CACHE_MB: '", e, "' is not a whole number of MiB");
      limit_ = static_cast<size_t>(mb) << 20;
    }
  }
  // A cached block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end()) {
      ++misses_;
      return nullptr;
    }
    void* p = it->second;
    free_.erase(it);
    cached_ -= bytes;
    ++hits_;
    return p;
  }
  // Keeps `p` if it fits under the limit; false: the caller frees it.
  bool give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cached_ + bytes > limit_) return false;
    free_.emplace(bytes, p);
    cached_ += bytes;
    return true;
  }
  void configure(size_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [bytes, p] : free_) std::free(p);
    free_.clear();
    cached_ = 0;
    limit_ = limit;
  }
  HostCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_, misses_, cached_, limit_};
  }

 private:
  std::mutex mu_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_ = 0, limit_ = size_t{2} << 30;
  uint64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors with static storage duration may die after any other static.
HostBlockCache& host_cache() {
  static HostBlockCache* c = new HostBlockCache();
  return *c;
}

}  // namespace

HostCacheStats host_cache_stats() { return host_cache().stats(); }
void host_cache_configure(size_t limit_bytes) { host_cache().configure(limit_bytes); }

// ---- Storage ------------------------------------------------------------------------------------
static size_t host_rounded(size_t nbytes) { return (nbytes + 63) / 64 * 64; }

Storage::Storage(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  if (nbytes == 0) return;
  if (device == Device::cpu) {
    const size_t rounded = host_rounded(nbytes);
    if (rounded >= kHostCacheMinBytes) ptr_ = host_cache().take(rounded);
    if (!ptr_) ptr_ = std::aligned_alloc(64, rounded);
    if (!ptr_) OPDLM_FAIL("out of host memory allocating ", nbytes, " bytes");
  } else {
    ptr_ = detail::cuda_alloc(nbytes);
  }
}

Storage::~Storage() {
  if (!ptr_) return;
  if (device_ == Device::cpu) {
    const size_t rounded = host_rounded(nbytes_);
    if (rounded < kHostCacheMinBytes || !host_cache().give(ptr_, rounded)) std::free(ptr_);
  } else {
    detail::cuda_free(ptr_);
  }
}

// ---- Tensor -------------------------------------------------------------------------------------
static void validate_shape(const Shape& s) {
  for (size_t i = 0; i < s.size(); ++i)
    if (s[i] < 0) OPDLM_FAIL("tensor shape ", shape_str(s), " has a negative dimension ", i);
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  validate_shape(shape);
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = std::make_shared<Storage>(t.nbytes(), device);
  return t;
}

Tensor::Tensor(Shape shape, DType dtype, Device device) {
  *this = empty(std::move(shape), dtype, device);
  zero();
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) { return Tensor(std::move(shape), dtype, device); }

Tensor Tensor::full(Shape shape, double value, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  t.fill(value);
  return t;
}

template <class T>
static Tensor from_vec(const std::vector<T>& v, Shape shape) {
  if (static_cast<int64_t>(v.size()) != shape_numel(shape))
    OPDLM_FAIL("from_vector: ", v.size(), " values do not fill shape ", shape_str(shape));
  Tensor t = Tensor::empty(std::move(shape), dtype_of<T>());
  if (!v.empty()) std::memcpy(t.raw_data(), v.data(), v.size() * sizeof(T));
  return t;
}
Tensor Tensor::from_vector(const std::vector<float>& v, Shape s) { return from_vec(v, std::move(s)); }
Tensor Tensor::from_vector(const std::vector<double>& v, Shape s) { return from_vec(v, std::move(s)); }
Tensor Tensor::from_vector(const std::vector<int32_t>& v, Shape s) { return from_vec(v, std::move(s)); }

int64_t Tensor::size(int d) const {
  int n = ndim();
  int dd = d < 0 ? d + n : d;
  if (dd < 0 || dd >= n) OPDLM_FAIL("dimension ", d, " out of range for tensor ", describe());
  return shape_[static_cast<size_t>(dd)];
}

void* Tensor::raw_data() {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_;
}
const void* Tensor::raw_data() const {
  if (!storage_) return nullptr;
  return static_cast<const char*>(storage_->data()) + offset_;
}

template <class T>
T* Tensor::data() {
  if (dtype_ != dtype_of<T>())
    OPDLM_FAIL("tensor ", describe(), " accessed as ", dtype_name(dtype_of<T>()));
  if (device_ != Device::cpu) OPDLM_FAIL("tensor ", describe(), " is not on the CPU");
  return static_cast<T*>(raw_data());
}
template <class T>
const T* Tensor::data() const {
  return const_cast<Tensor*>(this)->data<T>();
}
template float* Tensor::data<float>();
template double* Tensor::data<double>();
template bf16* Tensor::data<bf16>();
template int32_t* Tensor::data<int32_t>();
template const float* Tensor::data<float>() const;
template const double* Tensor::data<double>() const;
template const bf16* Tensor::data<bf16>() const;
template const int32_t* Tensor::data<int32_t>() const;

Tensor Tensor::view(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) OPDLM_FAIL("view ", shape_str(shape), ": more than one -1");
      infer = static_cast<int>(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel() % known != 0)
      OPDLM_FAIL("view ", shape_str(shape), " does not fit tensor ", describe());
    shape[static_cast<size_t>(infer)] = numel() / known;
  }
  validate_shape(shape);
  if (shape_numel(shape) != numel())
    OPDLM_FAIL("view ", shape_str(shape), " has ", shape_numel(shape), " elements, tensor ",
               describe(), " has ", numel());
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  if (ndim() < 1) OPDLM_FAIL("slice of a 0-d tensor");
  if (begin < 0 || end < begin || end > shape_[0])
    OPDLM_FAIL("slice [", begin, ", ", end, ") out of range for tensor ", describe());
  Tensor t = *this;
  int64_t row = numel() / std::max<int64_t>(shape_[0], 1);
  t.offset_ += static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::columns(int64_t begin, int64_t end) const {
  if (ndim() != 2 || device_ != Device::cpu) OPDLM_FAIL("columns of tensor ", describe(), ": a 2-D CPU tensor expected");
  if (begin < 0 || end < begin || end > shape_[1])
    OPDLM_FAIL("columns [", begin, ", ", end, ") out of range for tensor ", describe());
  Tensor t = empty({shape_[0], end - begin}, dtype_);
  const size_t es = dtype_size(dtype_), w = static_cast<size_t>(end - begin) * es;
  const auto* src = static_cast<const char*>(raw_data());
  auto* dst = static_cast<char*>(t.raw_data());
  // w == 0: an empty block has no storage (memcpy on null pointers is undefined even for 0 bytes).
  for (int64_t i = 0; i < shape_[0] && w > 0; ++i) std::memcpy(dst + size_t(i) * w, src + size_t(i * shape_[1] + begin) * es, w);
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  if (nbytes() == 0) return t;
  if (device_ == Device::cpu && nbytes() > 0) std::memcpy(t.raw_data(), raw_data(), nbytes());
  else detail::cuda_copy(t.raw_data(), device_, raw_data(), device_, nbytes());
  return t;
}

double Tensor::item(int64_t i) const {
  if (i < 0 || i >= numel()) OPDLM_FAIL("item ", i, " out of range for tensor ", describe());
  if (device_ != Device::cpu) OPDLM_FAIL("item() of tensor ", describe(), " not on the CPU");
  const void* p = raw_data();
  switch (dtype_) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f64: return static_cast<const double*>(p)[i];
    case DType::bf16: return to_f32(static_cast<const bf16*>(p)[i]);
    case DType::i32: return static_cast<const int32_t*>(p)[i];
  }
  return 0;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  if (device_ == Device::cuda) {
    // The GPU keeps f32 and bf16 only; the kernels are twins of the CPU conversion below.
    Tensor out = empty(shape_, dtype, Device::cuda);
    if (dtype_ == DType::f32 && dtype == DType::bf16) detail::cuda_convert_f32_to_bf16(raw_data(), out.raw_data(), numel());
    else if (dtype_ == DType::bf16 && dtype == DType::f32) detail::cuda_convert_bf16_to_f32(raw_data(), out.raw_data(), numel());
    else OPDLM_FAIL("dtype conversion ", dtype_name(dtype_), " -> ", dtype_name(dtype), " of ", describe(),
                    " is not supported on the GPU (f32 <-> bf16 only)");
    return out;
  }
  Tensor out = empty(shape_, dtype);
  const int64_t n = numel();
  if (dtype == DType::bf16) {
    auto* o = out.data<bf16>();
    for (int64_t i = 0; i < n; ++i) o[i] = to_bf16(static_cast<float>(item(i)));
  } else if (dtype == DType::f32) {
    auto* o = out.data<float>();
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(item(i));
  } else if (dtype == DType::f64) {
    auto* o = out.data<double>();
    for (int64_t i = 0; i < n; ++i) o[i] = item(i);
  } else {
    auto* o = out.data<int32_t>();
    for (int64_t i = 0; i < n; ++i) {
      double v = item(i);
      if (!std::isfinite(v) || v != std::nearbyint(v) || std::fabs(v) > 2147483647.0)
        OPDLM_FAIL("converting ", describe(), " to i32: element ", i, " = ", v, " is not an i32 value");
      o[i] = static_cast<int32_t>(v);
    }
  }
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == device_) return clone();
  Tensor t = empty(shape_, dtype_, device);
  if (nbytes()) detail::cuda_copy(t.raw_data(), device, raw_data(), device_, nbytes());
  return t;
}

void Tensor::fill(double v) {
  if (device_ != Device::cpu) OPDLM_FAIL("fill() of tensor ", describe(), " not on the CPU");
  const int64_t n = numel();
  switch (dtype_) {
    case DType::f32: std::fill_n(data<float>(), n, static_cast<float>(v)); break;
    case DType::f64: std::fill_n(data<double>(), n, v); break;
    case DType::bf16: std::fill_n(data<bf16>(), n, to_bf16(static_cast<float>(v))); break;
    case DType::i32: std::fill_n(data<int32_t>(), n, static_cast<int32_t>(v)); break;
  }
}

void Tensor::zero() {
  if (!storage_ || nbytes() == 0) return;
  if (device_ == Device::cpu) std::memset(raw_data(), 0, nbytes());
  else detail::cuda_memset0(raw_data(), nbytes());
}

std::vector<float> Tensor::to_f32_vector() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) v[static_cast<size_t>(i)] = static_cast<float>(item(i));
  return v;
}
std::vector<double> Tensor::to_f64_vector() const {
  std::vector<double> v(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) v[static_cast<size_t>(i)] = item(i);
  return v;
}

std::string Tensor::describe() const {
  if (!defined()) return "<undefined>";
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + " " + device_name(device_);
}

// ---- validation helpers -------------------------------------------------------------------------
void expect_defined(const Tensor& t, const char* name) {
  if (!t.defined()) OPDLM_FAIL("tensor '", name, "' is undefined (no storage)");
}

void expect_cpu(const Tensor& t, const char* name) {
  expect_defined(t, name);
  if (t.device() != Device::cpu)
    OPDLM_FAIL("tensor '", name, "' ", t.describe(), " must be on the CPU for this op");
}

void expect_dtype(const Tensor& t, const char* name, std::initializer_list<DType> allowed) {
  expect_defined(t, name);
  for (DType d : allowed)
    if (t.dtype() == d) return;
  std::string list;
  for (DType d : allowed) list += std::string(list.empty() ? "" : " or ") + dtype_name(d);
  OPDLM_FAIL("tensor '", name, "' ", t.describe(), " has unsupported dtype ", dtype_name(t.dtype()),
             "; expected ", list);
}

void expect_ndim(const Tensor& t, const char* name, int ndim) {
  expect_defined(t, name);
  if (t.ndim() != ndim)
    OPDLM_FAIL("tensor '", name, "' ", t.describe(), " has ", t.ndim(), " dimensions, expected ", ndim);
}

void expect_dim(const Tensor& t, const char* name, int dim, int64_t expected, const std::string& why) {
  expect_defined(t, name);
  if (t.size(dim) != expected)
    OPDLM_FAIL("tensor '", name, "' ", t.describe(), " dimension ", dim, " is ", t.size(dim),
               ", expected ", expected, why.empty() ? "" : " (", why, why.empty() ? "" : ")");
}

void expect_shape(const Tensor& t, const char* name, const Shape& expected, const std::string& why) {
  expect_ndim(t, name, static_cast<int>(expected.size()));
  for (size_t i = 0; i < expected.size(); ++i) expect_dim(t, name, static_cast<int>(i), expected[i], why);
}

void expect_same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  if (a.dtype() != b.dtype())
    OPDLM_FAIL("tensor '", bn, "' ", b.describe(), " must have the dtype of '", an, "' (",
               dtype_name(a.dtype()), ")");
}

void expect_float_cpu(const Tensor& t, const char* name) {
  expect_cpu(t, name);
  expect_dtype(t, name, {DType::f32, DType::f64});
}

void prepare_output(Tensor& t, const char* name, const Shape& shape, DType dtype) {
  if (!t.defined()) {
    t = Tensor::empty(shape, dtype);
    return;
  }
  expect_cpu(t, name);
  expect_dtype(t, name, {dtype});
  expect_shape(t, name, shape);
}

void prepare_accumulator(Tensor& t, const char* name, const Shape& shape, DType dtype) {
  if (!t.defined()) {
    t = Tensor::zeros(shape, dtype);
    return;
  }
  prepare_output(t, name, shape, dtype);
}

}  // namespace opdlm
