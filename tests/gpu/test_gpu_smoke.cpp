// GPU smoke test: device tensors round-trip, and the CUDA bf16 conversion is bit-identical to the
// CPU twin (Tensor::to on a CUDA tensor and cuda::convert on a stream).
#include <nccl.h>

#include <cstring>

#include "gpu_test_util.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

TEST(GpuSmoke, Bf16ConversionMatchesCpuBitForBit) {
  int version = 0;
  ncclGetVersion(&version);
  std::printf("NCCL %d linked\n", version);
  Tensor x = test::random_tensor({1000, 37}, 1, -300.0, 300.0, DType::f32);
  x.data<float>()[5] = 1.00390625f;  // a tie
  Tensor cpu_bf = x.to(DType::bf16);
  Tensor gpu_bf = x.to(Device::cuda).to(DType::bf16).to(Device::cpu);
  EXPECT_EQ(std::memcmp(cpu_bf.raw_data(), gpu_bf.raw_data(), cpu_bf.nbytes()), 0) << "f32->bf16 GPU differs from CPU";
  Tensor back_cpu = cpu_bf.to(DType::f32);
  Tensor back_gpu = cpu_bf.to(Device::cuda).to(DType::f32).to(Device::cpu);
  EXPECT_EQ(std::memcmp(back_cpu.raw_data(), back_gpu.raw_data(), back_cpu.nbytes()), 0) << "bf16->f32 GPU differs from CPU";
  // The stream form used by the model.
  auto d_in = gpu_test::upload(x, DType::f32);
  gpu_test::DeviceBuffer d_out(size_t(x.numel()) * 2);
  cuda::convert(d_in.get(), DType::f32, d_out.get(), DType::bf16, x.numel(), nullptr);
  Tensor got = Tensor::empty(x.shape(), DType::bf16);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(got.raw_data(), d_out.get(), got.nbytes(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(cpu_bf.raw_data(), got.raw_data(), got.nbytes()), 0) << "cuda::convert differs from CPU";
}

}  // namespace
}  // namespace opdlm
