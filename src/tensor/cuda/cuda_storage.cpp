// CUDA device memory for Tensor storage (CUDA builds only): allocation, zeroing and copies.
#include <cuda_runtime_api.h>

#include "opdlm/base/check.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::detail {

void* cuda_alloc(size_t nbytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, nbytes));
  return p;
}

void cuda_free(void* p) { cudaFree(p); }  // never throws from a destructor

void cuda_memset0(void* p, size_t nbytes) { CUDA_CHECK(cudaMemset(p, 0, nbytes)); }

void cuda_copy(void* dst, Device dd, const void* src, Device sd, size_t nbytes) {
  cudaMemcpyKind kind = dd == Device::cuda ? (sd == Device::cuda ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                           : (sd == Device::cuda ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  CUDA_CHECK(cudaMemcpy(dst, src, nbytes, kind));
}

}  // namespace opdlm::detail
