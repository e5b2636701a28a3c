// GPU smoke test: device tensors round-trip, and the CUDA bf16 conversion is bit-identical to the
// CPU twin. Exits 77 (ctest "Skipped") when no CUDA device is present.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>

#include "opdlm/tensor/tensor.hpp"
#include "test_util.hpp"

int main() {
  int version = 0;
  ncclGetVersion(&version);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("gpu_smoke: no CUDA device (NCCL %d linked): skipped\n", version);
    return 77;
  }
  using namespace opdlm;
  int failures = 0;
  Tensor x = test::random_tensor({1000, 37}, 1, -300.0, 300.0, DType::f32);
  x.data<float>()[5] = 1.00390625f;  // a tie
  Tensor cpu_bf = x.to(DType::bf16);
  Tensor gpu_bf = x.to(Device::cuda).to(DType::bf16).to(Device::cpu);
  if (std::memcmp(cpu_bf.raw_data(), gpu_bf.raw_data(), cpu_bf.nbytes()) != 0) {
    std::printf("FAIL: f32->bf16 GPU differs from CPU\n");
    ++failures;
  }
  Tensor back_cpu = cpu_bf.to(DType::f32);
  Tensor back_gpu = cpu_bf.to(Device::cuda).to(DType::f32).to(Device::cpu);
  if (std::memcmp(back_cpu.raw_data(), back_gpu.raw_data(), back_cpu.nbytes()) != 0) {
    std::printf("FAIL: bf16->f32 GPU differs from CPU\n");
    ++failures;
  }
  std::printf("%d passed, %d failed\n", 2 - failures, failures);
  return failures ? 1 : 0;
}
