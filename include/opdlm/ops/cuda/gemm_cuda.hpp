// Dense matrix products on the GPU through cuBLASLt: bf16 (or f32) inputs, fp32 accumulation, f32 or
// bf16 outputs, row-major operands as ops::matmul, plus the bias-free Linear forward/backward.
#pragma once

#include <cstddef>
#include <cstdint>

#include "opdlm/tensor/tensor.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace opdlm::cuda {

// One cuBLASLt handle and its workspace (device memory allocated once, at construction); one per
// rank and stream. Not thread-safe.
class BlasLt {
 public:
  explicit BlasLt(size_t workspace_bytes = size_t(32) << 20);
  ~BlasLt();
  BlasLt(const BlasLt&) = delete;
  BlasLt& operator=(const BlasLt&) = delete;

  // Row-major, as ops::matmul: C [M, N] = alpha * op(A) @ op(B) + beta * C, op(A) [M, K] (A stored
  // [M, K], or [K, M] when trans_a), op(B) [K, N] (B stored [K, N], or [N, K] when trans_b).
  // A and B share ab_dt (f32 or bf16); C has c_dt (f32 or bf16); accumulation is fp32 (for f32
  // inputs: exact fp32, no TF32). batch > 1: strided batches (element strides; a stride of 0 shares
  // the operand). beta != 0 reads C. Errors (opdlm::Error) name the shape and the cuBLASLt status.
  void gemm(const void* A, bool trans_a, const void* B, bool trans_b, void* C, int64_t M, int64_t N, int64_t K,
            DType ab_dt, DType c_dt, float alpha, float beta, cudaStream_t stream, int64_t batch = 1,
            int64_t stride_a = 0, int64_t stride_b = 0, int64_t stride_c = 0);

  // y [n, out] = x [n, in] @ w^T, w [out, in]; x, w, y in dt.
  void linear_forward(const void* x, const void* w, void* y, int64_t n, int64_t in, int64_t out, DType dt,
                      cudaStream_t stream);
  // dx [n, in] = dy @ w (dt, overwritten; nullable); dw [out, in] += dy^T @ x (f32, ACCUMULATED;
  // nullable).
  void linear_backward(const void* x, const void* w, const void* dy, void* dx, float* dw, int64_t n, int64_t in,
                       int64_t out, DType dt, cudaStream_t stream);

  size_t workspace_bytes() const { return workspace_bytes_; }

 private:
  void* handle_ = nullptr;  // internal state: the cublasLtHandle_t and the cache of matmul plans
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

}  // namespace opdlm::cuda
