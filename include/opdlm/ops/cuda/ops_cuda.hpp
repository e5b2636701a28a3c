// CUDA twins of the CPU ops (ops/*.hpp) on raw device pointers: RMSNorm, RoPE, SwiGLU, embedding,
// residual, log-softmax, cross-entropy, the KL family, AdamW on fp32 master weights, and helpers.
// Every function enqueues on `stream` and returns without synchronising; none allocates device
// memory (scratch comes from the caller, e.g. a DeviceArena). tests/gpu compares each against its CPU
// twin on the same inputs.
#pragma once

#include <cstdint>

#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/tensor/tensor.hpp"

// Same typedef as cuda_runtime_api.h (a repeated identical typedef is legal), so host code that
// only calls these functions need not include CUDA headers.
typedef struct CUstream_st* cudaStream_t;

namespace opdlm::cuda {

// Conventions (as the CPU ops, ops/matmul.hpp):
//   * `dt` is the storage dtype of activations and of their gradients: DType::f32 or DType::bf16;
//     arithmetic is f32 (reductions f32 or wider), one rounding per store.
//   * parameter gradients (dw, dtable) are f32 and ACCUMULATED (+=); input gradients are OVERWRITTEN.
//   * row statistics (rstd, lse, per-row losses) are f32.
//   * reductions are deterministic: a fixed order per launch configuration, no float atomics.
//   * nullable outputs may be nullptr (not computed).

// ---- dtype conversion ------------------------------------------------------------------------------
// out[i] = in[i] converted (f32 <-> bf16 round-to-nearest-even, f32 -> f32 copy), n elements.
void convert(const void* in, DType in_dt, void* out, DType out_dt, int64_t n, cudaStream_t stream);

// ---- RMSNorm (ops/rmsnorm.hpp) -------------------------------------------------------------------
// x [rows, D], w [D] (both dt) -> y [rows, D] (dt); rstd [rows] (f32, nullable).
void rmsnorm_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t D, double eps,
                     DType dt, cudaStream_t stream);
// dx [rows, D] (dt, overwritten, nullable); dw [D] (f32, accumulated, nullable). With `scratch` (at
// least rmsnorm_backward_scratch_bytes(rows, D) bytes, 8-byte aligned) dw is summed row-parallel in
// two stages, which the per-head q/k norms (rows = tokens * heads, D = head_dim) need to fill the GPU;
// without it one block per few columns walks every row. Both orders are fixed (deterministic).
size_t rmsnorm_backward_scratch_bytes(int64_t rows, int64_t D);
void rmsnorm_backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* dw,
                      int64_t rows, int64_t D, DType dt, cudaStream_t stream, void* scratch = nullptr);

// ---- RoPE (ops/rope.hpp) -------------------------------------------------------------------------
// cos/sin [tokens, head_dim/2] (f32) for positions i32 [tokens]; angles in double as the CPU table.
void rope_table(const int32_t* positions, int64_t tokens, int64_t head_dim, double theta, float* cos, float* sin,
                cudaStream_t stream);
// x [tokens, heads, head_dim] (dt) rotated in place; inverse = true is the backward.
void rope_inplace(void* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t head_dim,
                  bool inverse, DType dt, cudaStream_t stream);

// ---- SwiGLU (ops/swiglu.hpp) ---------------------------------------------------------------------
// h = silu(gate) * up, n elements (dt).
void swiglu_forward(const void* gate, const void* up, void* h, int64_t n, DType dt, cudaStream_t stream);
// dgate, dup (dt, overwritten, nullable).
void swiglu_backward(const void* gate, const void* up, const void* dh, void* dgate, void* dup, int64_t n, DType dt,
                     cudaStream_t stream);

// ---- embedding (ops/embedding.hpp) ---------------------------------------------------------------
// out [n, D] = table[ids] (dt). Ids must lie in [0, V): the caller checks them on the host.
void embedding_forward(const void* table, const int32_t* ids, void* out, int64_t n, int64_t V, int64_t D, DType dt,
                       cudaStream_t stream);
// dtable [V, D] (f32) += dy [n, D] (dt) scattered by ids, summed in token order (deterministic).
void embedding_backward(const int32_t* ids, const void* dy, float* dtable, int64_t n, int64_t V, int64_t D, DType dt,
                        cudaStream_t stream);

// ---- residual and elementwise ----------------------------------------------------------------------
// x += delta (dt), n elements.
void add_inplace(void* x, const void* delta, int64_t n, DType dt, cudaStream_t stream);
// acc (f32) += x (dt) * scale, n elements.
void accumulate_f32(float* acc, const void* x, float scale, int64_t n, DType dt, cudaStream_t stream);
// x (dt) *= scale.
void scale_inplace(void* x, float scale, int64_t n, DType dt, cudaStream_t stream);
// out[0] (f64) = sum_i x[i]^2 over n f32 elements (deterministic; for the gradient norm).
// `scratch` holds at least sum_squares_scratch_bytes(n) bytes.
size_t sum_squares_scratch_bytes(int64_t n);
void sum_squares(const float* x, int64_t n, double* out, void* scratch, cudaStream_t stream);

// ---- log-softmax and cross-entropy (ops/softmax.hpp, ops/cross_entropy.hpp) ------------------------
// lse [n] (f32) of x [n, V] (dt).
void logsumexp_rows(const void* x, float* lse, int64_t n, int64_t V, DType dt, cudaStream_t stream);
// y = x - lse(x) row by row (dt; y may equal x).
void log_softmax_forward(const void* x, void* y, int64_t n, int64_t V, DType dt, cudaStream_t stream);
// loss [n] (f32) = w * (lse - logits[target]), 0 where target == ignore_index; weight [n] f32 nullable;
// lse [n] f32 (nullable). Targets must lie in [0, V) or equal ignore_index (checked by the caller).
void cross_entropy_forward(const void* logits, const int32_t* targets, const float* weight, float* loss, float* lse,
                           int64_t n, int64_t V, int32_t ignore_index, DType dt, cudaStream_t stream);
// dlogits [n, V] (dt, overwritten) = dloss * w * (softmax - onehot), 0 for ignored rows.
void cross_entropy_backward(const void* logits, const int32_t* targets, const float* weight, const float* lse,
                            const float* dloss, void* dlogits, int64_t n, int64_t V, int32_t ignore_index, DType dt,
                            cudaStream_t stream);

// ---- the KL family (ops/kl.hpp) ------------------------------------------------------------------
// Same definitions and -inf rules as ops::divergence_forward/backward. teacher_logp and
// student_logits [n, V] (dt); D [n] (f32); student_lse [n] (f32, nullable in forward).
// topk_forward_kl: ties at the K-th value go to the lower index, as the CPU op.
// `scratch` holds at least divergence_scratch_bytes(n, V, spec) bytes (may be 0).
size_t divergence_scratch_bytes(int64_t n, int64_t V, const ops::DivergenceSpec& spec);
void divergence_forward(const void* teacher_logp, const void* student_logits, const ops::DivergenceSpec& spec,
                        float* D, float* student_lse, int64_t n, int64_t V, void* scratch, DType dt,
                        cudaStream_t stream);
// dstudent [n, V] (dt, overwritten) = dloss[i] * dD_i / dstudent_logits[i, :].
void divergence_backward(const void* teacher_logp, const void* student_logits, const float* student_lse,
                         const float* dloss, const ops::DivergenceSpec& spec, void* dstudent, int64_t n, int64_t V,
                         void* scratch, DType dt, cudaStream_t stream);

// ---- AdamW (ops/adamw.hpp) -----------------------------------------------------------------------
// The torch.optim.AdamW update on n f32 master weights, math in double as adamw_step_range (so
// the bits match the CPU's); when `param_bf16` is non-null it receives the updated weights rounded
// to bf16 (the compute copy of the mixed-precision model).
void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                const ops::AdamWConfig& cfg, void* param_bf16, cudaStream_t stream);

}  // namespace opdlm::cuda
