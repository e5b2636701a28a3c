// DeviceArena: one cudaMalloc per arena at construction, carved by a bump pointer with stack-like
// marks, so the training step never allocates device memory; errors and reports in GiB/MiB.
#include "opdlm/tensor/cuda/device_arena.hpp"

#include <cuda_runtime_api.h>

#include <cstdio>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"

namespace opdlm::cuda {

namespace {

// "1.50 GiB" at or above 1 GiB, "12.3 MiB" below (and "512 B" under a KiB, for tiny arenas).
std::string human_bytes(size_t b) {
  char buf[64];
  if (b >= (size_t(1) << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", double(b) / double(size_t(1) << 30));
  else if (b >= (size_t(1) << 10))
    std::snprintf(buf, sizeof buf, "%.2f MiB", double(b) / double(size_t(1) << 20));
  else
    std::snprintf(buf, sizeof buf, "%zu B", b);
  return buf;
}

}  // namespace

// ---- lifetime -------------------------------------------------------------------------------------------

DeviceArena::DeviceArena(size_t capacity, std::string name) : name_(std::move(name)), capacity_(capacity) {
  if (capacity_ == 0) return;  // an empty arena: every non-empty alloc reports the overflow
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, capacity_);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so a later CUDA_CHECK is not blamed for it
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    OPDLM_FAIL("device arena '", name_, "': cudaMalloc of ", human_bytes(capacity_), " (", capacity_,
               " bytes) failed: ", cudaGetErrorString(e), " (device has ", human_bytes(free_b), " free of ",
               human_bytes(total_b), ")");
  }
  base_ = static_cast<char*>(p);
}

DeviceArena::~DeviceArena() {
  if (base_) cudaFree(base_);  // never throws from a destructor
}

// ---- carving --------------------------------------------------------------------------------------------

void* DeviceArena::alloc(size_t bytes, size_t align, const char* what) {
  OPDLM_CHECK(align >= 1 && (align & (align - 1)) == 0, "device arena '", name_, "': alignment ", align,
              " for '", what ? what : "", "' is not a power of two");
  // cudaMalloc memory is 256-byte aligned, so offsets aligned to `align` (<= 256) give aligned
  // addresses; for larger alignments align the address itself.
  const uintptr_t base = reinterpret_cast<uintptr_t>(base_);
  const uintptr_t start = (base + used_ + (align - 1)) & ~uintptr_t(align - 1);
  const size_t offset = size_t(start - base);
  const size_t rounded = (bytes + (align - 1)) & ~(align - 1);
  if (rounded < bytes || offset < used_ || offset > capacity_ || rounded > capacity_ - offset)
    OPDLM_FAIL("device arena '", name_, "': out of memory for '", what ? what : "", "': ", human_bytes(bytes), " (",
               bytes, " bytes) requested, ", human_bytes(used_), " of ", human_bytes(capacity_),
               " used (high water ", human_bytes(high_water_), "); raise the arena size");
  used_ = offset + rounded;
  if (used_ > high_water_) high_water_ = used_;
  return base_ + offset;
}

void DeviceArena::release(size_t mark) {
  OPDLM_CHECK(mark <= used_, "device arena '", name_, "': release to mark ", mark, " above the ", used_,
              " bytes in use");
  used_ = mark;
}

std::string DeviceArena::report() const {
  return name_ + ": " + human_bytes(used_) + " of " + human_bytes(capacity_) + " used (high water " +
         human_bytes(high_water_) + ")";
}

}  // namespace opdlm::cuda
