// The OPD divergence family (algorithm.md B 6.1) between a frozen teacher, given as log-probs, and
// the student, given as logits: per-row values [n] and gradients w.r.t. the student logits only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// t = teacher probs, u = softmax(student logits), both over the full vocabulary.
enum class Divergence : uint8_t {
  forward_kl,       // KL(t || u) = sum_v t (log t - log u)
  reverse_kl,       // KL(u || t) = sum_v u (log u - log t)
  mixture,          // (1 - w) KL(t || u) + w KL(u || t), w = reverse_weight in [0, 1]
  jsd,              // m = a t + (1 - a) u: a KL(t || m) + (1 - a) KL(u || m), a = jsd_alpha in (0, 1)
  topk_forward_kl,  // sum over the teacher's top-K tokens of t (log t - log u), no renormalisation
};

struct DivergenceSpec {
  Divergence kind = Divergence::forward_kl;
  double reverse_weight = 0.0;  // mixture only
  double jsd_alpha = 0.5;       // jsd only
  int64_t topk = 16;            // topk_forward_kl only: 1 <= topk <= V
};

// "forward_kl", "reverse_kl", "mixture", "jsd", "topk_forward_kl" (config spelling).
const char* divergence_name(Divergence d);
Divergence parse_divergence(const std::string& name);

// Per-row divergence D [n] for teacher_logp and student_logits [n, V] (same dtype, f32 or f64).
//
// Teacher entries may be -inf (probability 0, e.g. masked vocabulary padding); such tokens count 0
// in every term, so value and gradient stay finite and NaN-free. For KL(t || u) that is the exact
// value. For the reverse KL (and the reverse part of `mixture`) it is a deliberate restriction: the
// sum runs over the teacher's support only (the true KL(u || t) would be +inf whenever the student
// puts mass where the teacher has none). JSD is finite either way.
// Top-K: the K largest teacher log-probs of each row; ties at the K-th value go to the lower token
// index (deterministic on every layout; torch.topk leaves that order unspecified).
// When `student_lse` is non-null it receives the student's row log-sum-exp [n] for the backward.
Tensor divergence_forward(const Tensor& teacher_logp, const Tensor& student_logits, const DivergenceSpec& spec,
                          Tensor* student_lse);
// dstudent_logits [n, V] = dloss[i] * dD_i / dstudent_logits[i, :] (the teacher is frozen).
Tensor divergence_backward(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& student_lse,
                           const Tensor& dloss, const DivergenceSpec& spec);

// ---- building blocks of the vocab-parallel divergences (parallel/vocab_parallel.hpp) ----------------

// The terms of `spec` over a slice of the vocabulary (teacher_logp and student_logits [n, V_slice]),
// given the student's log-sum-exp over the WHOLE vocabulary `lse` [n] (same dtype) and, for top-K,
// `keep` [n * V_slice] (1 = the token is in its row's global top-K). Returns the slice's part of D [n]
// (f64); when g is non-null it receives g [n, V_slice] (f64) = dD/d(student log-prob) per token. The
// parts of every slice sum to D; divergence_backward's dD/ds = g - softmax * sum(g) needs the sum
// over every slice.
Tensor divergence_slice(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& lse,
                        const DivergenceSpec& spec, const std::vector<uint8_t>* keep, Tensor* g);

// Each row's K best teacher log-probs of this slice, ordered (value desc, index asc), as pairs
// (value, column index within the slice) in a flat [n, K, 2] array; (-inf, -1) when the slice has
// fewer than K columns. NaN counts as -inf (as divergence_forward's top-K).
std::vector<double> topk_candidates(const Tensor& teacher_logp, int64_t K);

}  // namespace opdlm::ops
