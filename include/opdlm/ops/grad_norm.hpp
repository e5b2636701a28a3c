// Global gradient norm and clipping as torch.nn.utils.clip_grad_norm_ (L2), with the sum of squares
// exposed separately so a distributed trainer can all-reduce it before taking the root.
#pragma once

#include <array>
#include <cstdint>
#include <span>
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

// The exact sum of squares of f32 values, whatever order they come in: every x^2 is exact in double
// and an integer multiple of 2^-298, so 32-bit digits in int64 lanes (a fixed-point superaccumulator
// from 2^-320) hold the sum without rounding; value() converts the carried digits, one representation
// per sum, so equal sums give equal doubles (a few ulps from the exact one). The deterministic-reduction
// mode's gradient norm (docs/parallel.md): the same bits for every TP and DP layout, because ranks
// add their lanes with an integer all-reduce.
class ExactSquareSum {
 public:
  static constexpr int kDigits = 20;             // 640 bits: squares reach 2^256, counts add headroom
  static constexpr int kLanes = kDigits + 2;     // + the counts of NaN and infinite values
  void add(float x);
  void add(std::span<const float> xs);
  // Normalized lanes (every digit in [0, 2^32)): summing the lanes of several accumulators lane by
  // lane (an MPI int64 sum of up to 2^31 ranks) gives the lanes of the union.
  std::array<int64_t, kLanes> lanes();
  // The sum held by (possibly summed) lanes: NaN if a NaN was added, else +inf if an inf was.
  static double value(std::array<int64_t, kLanes> lanes);
  double value() { return value(lanes()); }

 private:
  void normalize();
  std::array<int64_t, kLanes> lane_{};
  int64_t pending_ = 0;  // adds since the last carry propagation
};

// torch's factor: max_norm / (norm + 1e-6) when that is < 1, else 1; 1 for a non-finite norm
// (the trainer decides what to do with such a step).
double clip_coefficient(double norm, double max_norm);
// g *= scale for every tensor.
void scale_grads(const std::vector<Tensor*>& grads, double scale);

// Scales the grads in place by clip_coefficient(norm, max_norm) and returns the pre-clip norm
// (inf or NaN returned as is, grads untouched). max_norm must be finite and > 0.
double clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm);

}  // namespace opdlm::ops
