// DeviceArena: one device allocation per rank, sized up front and carved by a bump pointer, so the
// step loop never calls cudaMalloc. Marks and releases give stack-like scopes (per layer, per step).
#pragma once

#include <cstddef>
#include <string>

namespace opdlm::cuda {

class DeviceArena {
 public:
  // One cudaMalloc of `capacity` bytes on the current device. `name` appears in errors and reports.
  explicit DeviceArena(size_t capacity, std::string name = "arena");
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // `bytes` rounded up to `align` (a power of two, >= 1); Error naming the arena, the request, what is
  // used and the capacity when it does not fit. The memory is not zeroed.
  void* alloc(size_t bytes, size_t align = 256, const char* what = "");
  template <class T> T* alloc_n(size_t n, const char* what = "") {
    return static_cast<T*>(alloc(n * sizeof(T), alignof(T) < 256 ? 256 : alignof(T), what));
  }
  size_t mark() const { return used_; }
  // Frees everything allocated after `mark` (mark <= used()).
  void release(size_t mark);
  void reset() { release(0); }

  size_t used() const { return used_; }
  size_t capacity() const { return capacity_; }
  size_t high_water() const { return high_water_; }
  const std::string& name() const { return name_; }
  // "arena: 1.50 GiB of 2.00 GiB used (high water 1.75 GiB)".
  std::string report() const;

 private:
  std::string name_;
  char* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0, high_water_ = 0;
};

}  // namespace opdlm::cuda
