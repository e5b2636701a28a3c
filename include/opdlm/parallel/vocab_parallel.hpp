// Vocab-parallel softmax statistics and losses over a TP group (Megatron): every rank holds the
// logit columns [vocab_begin, vocab_begin + V_r) of the same rows, as the tensor-parallel model's LM
// head returns them. Row maxima are all-reduced with max (exact), sums with all_reduce_tree (the same
// bits on every rank); full logits are never gathered. With a group of one rank these are the ops of
// ops/softmax.hpp, ops/kl.hpp and ops/cross_entropy.hpp up to the order of additions.
#pragma once

#include <cstdint>
#include <vector>

#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/ops/sampling.hpp"
#include "opdlm/base/rng.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::parallel {

// Where this rank's columns sit in the whole vocabulary.
struct VocabSlice {
  int64_t begin = 0;  // first column's token id
  int64_t total = 0;  // the whole vocabulary (top-K checks K against it)
  // The deterministic-reduction mode (Qwen3Model TensorParallel::pieces): row sums over the vocabulary
  // are taken per virtual shard of piece_cols columns and combined by virtual_shard_sum, so their bits
  // do not depend on the TP size. 0: off (all_reduce_tree of this rank's sums).
  int pieces = 0;
  int64_t piece_cols = 0;
};

// Row log-sum-exp over the whole vocabulary, [n] f64 (-inf for a row of -inf logits).
std::vector<double> vp_logsumexp(const Tensor& logits, Communicator& tp, VocabSlice slice = {});
// log_softmax over the whole vocabulary, of this rank's columns [n, V_r] (logits' dtype).
Tensor vp_log_softmax(const Tensor& logits, Communicator& tp, VocabSlice slice = {});

// ops::divergence_forward / _backward on vocab-parallel teacher log-probs and student logits. Top-K
// takes the K best teacher tokens of the whole vocabulary (ties to the lower token id, as one
// process): each rank offers its K best, all-gathered, and keeps those in its columns.
Tensor vp_divergence_forward(const Tensor& teacher_logp, const Tensor& student_logits, const ops::DivergenceSpec& spec,
                             Tensor* student_lse, Communicator& tp, VocabSlice slice);
Tensor vp_divergence_backward(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& student_lse,
                              const Tensor& dloss, const ops::DivergenceSpec& spec, Communicator& tp, VocabSlice slice);

// ops::cross_entropy_forward / _backward with targets given as token ids of the whole vocabulary.
Tensor vp_cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& weight, Tensor* lse,
                                Communicator& tp, VocabSlice slice, int32_t ignore_index = ops::kIgnoreIndex);
Tensor vp_cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& weight, const Tensor& lse,
                                 const Tensor& dloss, Communicator& tp, VocabSlice slice,
                                 int32_t ignore_index = ops::kIgnoreIndex);

// Softmax facts of each row of vocab-parallel f32 logits over the whole vocabulary (temperature 1,
// in double): the maximum, log sum exp(x - max) and, when asked, the entropy in nats.
struct RowSoftmaxStats {
  std::vector<double> max, log_z, entropy;
};
RowSoftmaxStats vp_row_stats(const Tensor& logits, Communicator& tp, bool with_entropy, VocabSlice slice = {});

// ops::sample_token for every row of vocab-parallel logits [n, V_r] (f32), row i keyed by rngs[i]:
// the same filtering (temperature; greedy keeps the global maximum; top-k keeps logits >= the k-th
// largest of the whole row, from each rank's k best all-gathered), then Gumbel-max with the noise of
// token id v at stream index v: each rank offers its best (score, id), all-gathered, the highest score
// wins (ties to the lower id, as one process scans). Tokens are those of one process on the same
// logits; the confidence (the token's probability under the unfiltered softmax) comes from
// vp_logsumexp. top_p < 1 is refused (its sorted cumulative mass is not vocab-parallel yet).
// Collectives are batched: a handful per call, whatever n.
std::vector<ops::TokenDraw> vp_sample_tokens(const Tensor& logits, const std::vector<CounterRng>& rngs,
                                             const ops::SamplingParams& params, Communicator& tp, VocabSlice slice);

}  // namespace opdlm::parallel
