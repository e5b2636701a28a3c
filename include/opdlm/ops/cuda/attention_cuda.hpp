// Scaled dot-product attention on the GPU with grouped-query heads and the mask descriptors of
// ops/mask.hpp, flash-attention style: tiles of queries against tiles of keys with an online softmax,
// tiles that no row of the query tile may see are skipped, and no mask is ever materialised.
#pragma once

#include <cstdint>
#include <span>

#include "opdlm/ops/mask.hpp"
#include "opdlm/tensor/tensor.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace opdlm::cuda {

// Plain-data copy of ops::MaskDescriptor for device memory (the rules are the CPU's, shared through
// ops/mask_rules.hpp).
struct DeviceMask {
  int32_t kind = 0;  // ops::MaskDescriptor::Kind
  int32_t unused = 0;
  int64_t block_size = 1, pad_left = 0, prompt_len = 0, response_len = 0, q_offset = 0;
};
DeviceMask to_device_mask(const ops::MaskDescriptor& m);
// Copies host descriptors into `dev` (device memory of at least masks.size() DeviceMasks), on `stream`:
// they travel as kernel arguments (64 per launch, copied at launch), so the caller may reuse `masks`
// at once and no pinned staging is needed.
void upload_masks(std::span<const ops::MaskDescriptor> masks, DeviceMask* dev, cudaStream_t stream);

// q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D] (dt: f32 or bf16), Hq % Hkv == 0; masks: device array of
// n_masks = B descriptors (row b uses masks[b]) or 1 (shared). o [B, Tq, Hq, D] (dt); lse
// [B, Hq, Tq] (f32) as ops::attention_forward. Descriptors must be valid for (Tq, Tk): the caller
// validates them on the host (ops::MaskDescriptor::validate).
void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse, int64_t B, int64_t Tq,
                       int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks,
                       double scale, DType dt, cudaStream_t stream);

// dq, dk, dv (dt, OVERWRITTEN) for upstream dout; probabilities recomputed from q, k and lse.
// `scratch` holds at least attention_backward_scratch_bytes(...) bytes: the row terms
// delta = sum_d dout * o (B * Hq * Tq floats); dk/dv sums over a GQA group stay in registers.
size_t attention_backward_scratch_bytes(int64_t B, int64_t Tq, int64_t Tk, int64_t Hq, int64_t Hkv, int64_t D);
void attention_backward(const void* q, const void* k, const void* v, const void* o, const float* lse,
                        const void* dout, void* dq, void* dk, void* dv, int64_t B, int64_t Tq, int64_t Tk, int64_t Hq,
                        int64_t Hkv, int64_t D, const DeviceMask* masks, int64_t n_masks, double scale,
                        void* scratch, DType dt, cudaStream_t stream);

}  // namespace opdlm::cuda
