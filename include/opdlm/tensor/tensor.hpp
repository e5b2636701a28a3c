// Tensor: dtype (f32, f64, bf16, i32), shape, device tag and shared owning storage; always dense
// row-major. f64 exists for CPU reference and gradient checks; GPU work is bf16/f32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/tensor/bf16.hpp"

namespace opdlm {

enum class DType : uint8_t { f32, f64, bf16, i32 };
enum class Device : uint8_t { cpu, cuda };

using Shape = std::vector<int64_t>;

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }

// Raw device buffer; CPU memory is 64-byte aligned, CUDA memory comes from cudaMalloc.
class Storage {
 public:
  Storage(size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() { return ptr_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
};

// Host memory of large tensors (>= kHostCacheMinBytes) is kept when a tensor dies and handed to the
// next tensor of the same rounded size. A training or decoding step allocates the same shapes every
// step; without the cache each big allocation is a fresh mmap whose pages fault and are zeroed on first
// touch (10 % of a medium-model training step). At most limit_bytes are kept (default 2 GiB, or the
// environment's OPDLM_HOST_CACHE_MB); a block that does not fit is freed as before.
inline constexpr size_t kHostCacheMinBytes = size_t{1} << 20;
struct HostCacheStats {
  uint64_t hits = 0, misses = 0;  // large host allocations served from the cache / by the system
  size_t cached_bytes = 0, limit_bytes = 0;
};
HostCacheStats host_cache_stats();
// Frees every cached block and sets the limit (0 turns caching off).
void host_cache_configure(size_t limit_bytes);

class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor.
  Tensor(Shape shape, DType dtype = DType::f32, Device device = Device::cpu);

  static Tensor zeros(Shape shape, DType dtype = DType::f32, Device device = Device::cpu);
  // Uninitialised storage: for outputs that a kernel overwrites completely.
  static Tensor empty(Shape shape, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor full(Shape shape, double value, DType dtype = DType::f32);
  static Tensor from_vector(const std::vector<float>& v, Shape shape);
  static Tensor from_vector(const std::vector<double>& v, Shape shape);
  static Tensor from_vector(const std::vector<int32_t>& v, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  // Size of dimension d; negative d counts from the end.
  int64_t size(int d) const;
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  // Typed CPU access; throws if T does not match the dtype or the tensor is not on the CPU.
  template <class T> T* data();
  template <class T> const T* data() const;
  void* raw_data();
  const void* raw_data() const;

  // Same storage, new shape (one -1 may be inferred).
  Tensor view(Shape shape) const;
  // Rows [begin, end) of dimension 0, sharing storage.
  Tensor slice(int64_t begin, int64_t end) const;
  // Columns [begin, end) of a 2-D CPU tensor, copied into a new contiguous tensor.
  Tensor columns(int64_t begin, int64_t end) const;
  Tensor clone() const;
  // Converts between f32, f64 and bf16 (round-to-nearest-even), and i32 <-> floating.
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  void fill(double value);
  void zero();
  // Element i (flat index) as double, for tests and diagnostics (CPU only).
  double item(int64_t i) const;
  std::vector<float> to_f32_vector() const;
  std::vector<double> to_f64_vector() const;
  // "f32[2, 3] cpu".
  std::string describe() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes into storage_
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
};

// ---- argument validation for ops: errors name the tensor and the dimension ---------------------
void expect_defined(const Tensor& t, const char* name);
void expect_cpu(const Tensor& t, const char* name);
void expect_dtype(const Tensor& t, const char* name, std::initializer_list<DType> allowed);
void expect_ndim(const Tensor& t, const char* name, int ndim);
// Dimension `dim` of `t` must equal `expected`; `why` says where the expectation comes from.
void expect_dim(const Tensor& t, const char* name, int dim, int64_t expected, const std::string& why = {});
void expect_shape(const Tensor& t, const char* name, const Shape& expected, const std::string& why = {});
void expect_same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn);
// Floating CPU tensor (f32 or f64): the CPU ops compute in the tensor's own precision.
void expect_float_cpu(const Tensor& t, const char* name);
// An op's overwritten output: allocated (uninitialised) when undefined, else it must already be a
// CPU tensor of exactly this dtype and shape.
void prepare_output(Tensor& t, const char* name, const Shape& shape, DType dtype);
// An accumulated gradient (+=): zero-allocated when undefined, else checked like prepare_output.
void prepare_accumulator(Tensor& t, const char* name, const Shape& shape, DType dtype);

}  // namespace opdlm
