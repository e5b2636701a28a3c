// Failure paths of the MPI / HDF5 / CUDA / NCCL check macros: fetch the library's own message.
#include "opdlm/base/check.hpp"

#include <mpi.h>
#include <hdf5.h>

#include <cstdio>

namespace opdlm::detail {

void mpi_fail(int code, const char* call, const char* file, int line) {
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) std::snprintf(msg, sizeof msg, "unknown");
  throw_error(file, line, concat("MPI call failed: ", call, ": ", msg, " (code ", code, ")"));
}

namespace {
herr_t collect_h5_error(unsigned n, const H5E_error2_t* e, void* out) {
  auto* s = static_cast<std::string*>(out);
  if (n == 0 && e && e->desc) *s = e->desc;  // innermost frame says what actually failed
  return 0;
}
}  // namespace

void hdf5_fail(long long code, const char* call, const char* file, int line) {
  std::string desc;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_h5_error, &desc);
  H5Eclear2(H5E_DEFAULT);
  throw_error(file, line, concat("HDF5 call failed: ", call, ": ",
                                 desc.empty() ? std::string("no HDF5 error message") : desc,
                                 " (code ", code, ")"));
}

#ifdef OPDLM_HAVE_CUDA
void cuda_fail(cudaError_t code, const char* call, const char* file, int line) {
  throw_error(file, line, concat("CUDA call failed: ", call, ": ", cudaGetErrorName(code), ": ",
                                 cudaGetErrorString(code)));
}
void nccl_fail(ncclResult_t code, const char* call, const char* file, int line) {
  throw_error(file, line, concat("NCCL call failed: ", call, ": ", ncclGetErrorString(code),
                                 " (code ", static_cast<int>(code), ")"));
}
#endif

}  // namespace opdlm::detail
