// Global gradient norm and clipping as torch.nn.utils.clip_grad_norm_ (L2), with the sum of squares
// exposed separately so a distributed trainer can all-reduce it before taking the root.
#pragma once

#include <vector>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// The chunk of the fixed summation order: per tensor, chunk c = elements [c K, min(N, (c + 1) K)).
constexpr int64_t kGradNormChunk = int64_t{1} << 14;
// sum of g^2 over one chunk (at most kGradNormChunk elements), in double, in element order.
double chunk_sq_sum(const float* p, int64_t n);
double chunk_sq_sum(const double* p, int64_t n);
// sum of g^2 over all tensors (f32 or f64): per tensor the chunk sums added in chunk order, then the
// tensor sums in tensor order. The result is bitwise the same for any OpenMP thread count, and a
// ZeRO-1 shard owner can compute its chunks' sums alone (parallel/zero1).
double grad_sq_sum(const std::vector<const Tensor*>& grads);
// sqrt(grad_sq_sum(grads)).
double global_grad_norm(const std::vector<const Tensor*>& grads);

// torch's factor: max_norm / (norm + 1e-6) when that is < 1, else 1; 1 for a non-finite norm
// (the trainer decides what to do with such a step).
double clip_coefficient(double norm, double max_norm);
// g *= scale for every tensor.
void scale_grads(const std::vector<Tensor*>& grads, double scale);

// Scales the grads in place by clip_coefficient(norm, max_norm) and returns the pre-clip norm
// (inf or NaN returned as is, grads untouched). max_norm must be finite and > 0.
double clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm);

}  // namespace opdlm::ops
