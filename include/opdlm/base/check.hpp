// Check macros for library calls that return status codes (MPI, HDF5, CUDA, NCCL): each turns a
// failure into an opdlm::Error that names the call, the library's own message, and file:line.
#pragma once

#include <string>

#include "opdlm/base/error.hpp"

namespace opdlm::detail {
[[noreturn]] void mpi_fail(int code, const char* call, const char* file, int line);
[[noreturn]] void hdf5_fail(long long code, const char* call, const char* file, int line);
}  // namespace opdlm::detail

// MPI: any return other than MPI_SUCCESS (0) is an error; MPI_ERRORS_RETURN must be set on the
// communicator for MPI to return instead of aborting (parallel/ does that).
#define MPI_CHECK(call)                                                          \
  do {                                                                           \
    int opdlm_mpi_rc_ = (call);                                                  \
    if (opdlm_mpi_rc_ != 0) [[unlikely]]                                         \
      ::opdlm::detail::mpi_fail(opdlm_mpi_rc_, #call, __FILE__, __LINE__);       \
  } while (0)

// HDF5: negative herr_t / hid_t is an error. The value of the call is passed through.
#define HDF5_CHECK(call)                                                                      \
  ([&]() {                                                                                    \
    auto opdlm_h5_rc_ = (call);                                                               \
    if (opdlm_h5_rc_ < 0) [[unlikely]]                                                        \
      ::opdlm::detail::hdf5_fail(static_cast<long long>(opdlm_h5_rc_), #call, __FILE__, __LINE__); \
    return opdlm_h5_rc_;                                                                      \
  }())

#ifdef OPDLM_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
namespace opdlm::detail {
[[noreturn]] void cuda_fail(cudaError_t code, const char* call, const char* file, int line);
[[noreturn]] void nccl_fail(ncclResult_t code, const char* call, const char* file, int line);
}  // namespace opdlm::detail
#define CUDA_CHECK(call)                                                      \
  do {                                                                        \
    cudaError_t opdlm_cuda_rc_ = (call);                                      \
    if (opdlm_cuda_rc_ != cudaSuccess) [[unlikely]]                           \
      ::opdlm::detail::cuda_fail(opdlm_cuda_rc_, #call, __FILE__, __LINE__);  \
  } while (0)
#define NCCL_CHECK(call)                                                      \
  do {                                                                        \
    ncclResult_t opdlm_nccl_rc_ = (call);                                     \
    if (opdlm_nccl_rc_ != ncclSuccess) [[unlikely]]                           \
      ::opdlm::detail::nccl_fail(opdlm_nccl_rc_, #call, __FILE__, __LINE__);  \
  } while (0)
#endif
