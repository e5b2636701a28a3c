// Qwen3Model: the Qwen3 decoder built from the CPU ops: a training forward that saves what its
// backward needs, the backward (parameter gradients accumulated), and incremental forward with a KV cache.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>
#include <vector>

#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/ops/rope.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::parallel {
class Communicator;
struct VocabSlice;
}

namespace opdlm::model {

// Tensor parallelism (Megatron layout, model/tp_layout.hpp): the model holds one TP rank's shard of
// the weights (shard_weights; the weights' config is shard_config) and sums partial results over the
// TP group with Communicator::all_reduce_tree, so every rank of the group holds the same bits:
// forward after the vocab-parallel embedding, o_proj and down_proj; backward after the LM head, the
// gate/up and the q/k/v input gradients, and for the q/k norm gains (shared by heads on every rank).
// Logits stay vocab-parallel: rank r returns the columns [vocab_begin, vocab_begin + vocab_real).
struct TensorParallel {
  parallel::Communicator* comm = nullptr;  // the TP group; nullptr: the whole model on one rank
  Qwen3Config full;                        // the unsharded config (vocabulary, special token ids)
  int64_t vocab_begin = 0, vocab_real = 0;
  // The deterministic-reduction mode (docs/parallel.md; TpPlan::pieces): > 0 cuts this rank's shard
  // into `pieces` virtual shards whose products are computed one by one (the gemm shapes of a
  // pieces * tp way layout) and summed by parallel::virtual_shard_sum, so every bit of the forward and
  // backward is the same for every tp with the same pieces * tp. 0: off (all_reduce_tree sums).
  int pieces = 0;
};

// What one decoder layer's backward needs (n = B*T token rows). Cheap intermediates (the two norm
// outputs, the SwiGLU product) are recomputed in the backward instead of kept.
struct Qwen3LayerActivations {
  Tensor x_in;           // residual stream entering the layer [n, H]
  Tensor rstd_in;        // input_layernorm rstd [n]
  Tensor q_pre, k_pre;   // projections before the per-head norms [n*Hq, hd], [n*Hkv, hd]
  Tensor q_rstd, k_rstd; // per-head norm rstd [n*Hq], [n*Hkv]
  Tensor q, k, v;        // attention inputs after norm + RoPE [B, T, Hq|Hkv, hd]
  Tensor attn, lse;      // attention output [B, T, Hq, hd] and log-sum-exp [B, Hq, T]
  Tensor x_mid;          // stream after the attention residual [n, H]
  Tensor rstd_mid;       // post_attention_layernorm rstd [n]
  Tensor gate, up;       // MLP projections [n, I]
};

// Everything a training forward saves; owned by the caller, reusable across steps (overwritten).
struct Qwen3Activations {
  int64_t batch = 0, tokens = 0;
  Tensor ids;                              // i32 [B*T]
  ops::RopeTable rope;                     // for the B*T position ids
  std::vector<ops::MaskDescriptor> masks;  // 1 or B
  std::vector<Qwen3LayerActivations> layers;
  Tensor rows;                             // i32 [n_rows] logit rows (into B*T), undefined = all
  Tensor x_final;                          // stream before the final norm, logit rows only [n_rows, H]
  Tensor rstd_final;                       // [n_rows]
  Tensor h_final;                          // final-norm output = LM-head input [n_rows, H]
};

// K and V of every layer for B sequences on one shared time axis [0, max_len): slot t of row b holds
// the key of absolute position t (left pads included, so rows of different prompt lengths align).
class KVCache {
 public:
  KVCache() = default;
  KVCache(const Qwen3Config& config, int64_t batch, int64_t max_len, DType dtype = DType::f32);

  int64_t batch() const { return batch_; }
  int64_t max_len() const { return max_len_; }
  int64_t num_layers() const { return static_cast<int64_t>(k_.size()); }
  DType dtype() const { return dtype_; }
  // Committed slots: queries of the next forward_cached start here (their masks' q_offset).
  int64_t length() const { return length_; }
  // Forget committed slots from `length` on (length <= length()): e.g. rewind, or reset with 0.
  void truncate(int64_t length);
  void reset() { truncate(0); }
  Tensor& k(int64_t layer);  // [B, max_len, Hkv, hd]
  Tensor& v(int64_t layer);

 private:
  friend class Qwen3Model;
  std::vector<Tensor> k_, v_;
  int64_t batch_ = 0, max_len_ = 0, length_ = 0;
  DType dtype_ = DType::f32;
};

class Qwen3Model {
 public:
  // Takes `weights` (handles: the model shares their storage; work on them through weights()).
  // trainable = false: a frozen teacher, no gradient buffers. trainable = true: a student whose
  // gradients (zeros_like of the weights) are ACCUMULATED by backward() until zero_grads().
  Qwen3Model(Qwen3Weights weights, bool trainable, TensorParallel tp = {});
  static Qwen3Model teacher(Qwen3Weights weights) { return Qwen3Model(std::move(weights), false); }
  static Qwen3Model student(Qwen3Weights weights) { return Qwen3Model(std::move(weights), true); }

  // The weights' config: the shard's under tensor parallelism (heads, FFN, vocabulary per rank).
  const Qwen3Config& config() const { return weights_.config(); }
  // The whole model's config (= config() without tensor parallelism).
  const Qwen3Config& full_config() const { return tp_.comm ? tp_.full : weights_.config(); }
  const TensorParallel& tensor_parallel() const { return tp_; }
  // Where this rank's logit columns sit in the vocabulary, with the deterministic mode's pieces.
  parallel::VocabSlice vocab_slice() const;
  // Logit columns this rank returns: the real vocabulary rows of its shard (all of them without TP).
  int64_t logit_columns() const { return tp_.comm ? tp_.vocab_real : config().vocab_size; }
  DType dtype() const { return weights_.dtype(); }
  Qwen3Weights& weights() { return weights_; }
  const Qwen3Weights& weights() const { return weights_; }
  bool trainable() const { return trainable_; }
  // The gradient buffers (same names as the weights; the tied head's gradient is the embedding's).
  // Error on a frozen model.
  Qwen3Weights& grads();
  void zero_grads();
  // Every gradient back to back in tensor order (the tensors of grads() are views of it); f32.
  std::span<float> flat_grads();

  // Full-sequence forward. ids, positions: i32 [B, T] (explicit position ids: the training row
  // repeats them); masks: B descriptors or 1 shared, each valid for Tq = Tk = T; rows: optional
  // i32 [n_rows] indices into the B*T token rows (row b*T + t) at which to compute logits
  // (undefined = all, in order). Returns logits [n_rows, V] in the weights' dtype; row i's logits
  // are the LM head of token i's final hidden state (no shift). When `acts` is non-null it receives
  // what backward() needs.
  Tensor forward(const Tensor& ids, const Tensor& positions, std::span<const ops::MaskDescriptor> masks,
                 const Tensor& rows = Tensor(), Qwen3Activations* acts = nullptr) const;
  // dlogits [n_rows, V] for the logits of the forward that filled `acts`: ACCUMULATES every
  // parameter gradient (embedding scatter-add; with a tied head the LM-head gradient goes into the
  // same embedding gradient). Error on a frozen model.
  void backward(const Qwen3Activations& acts, const Tensor& dlogits);

  // Incremental forward: ids, positions i32 [B, Tq] for new query tokens at cache slots
  // [length, length + Tq), attending to the committed slots and to each other as `masks` say
  // (B or 1 descriptors of kind causal or block_causal, q_offset = cache.length(); per-row pad_left
  // for left-padded rows). Their K/V are written into those slots; commit = true advances
  // cache.length() by Tq, commit = false leaves it (a denoising step that will be recomputed and
  // overwritten). rows as in forward(), indices into B*Tq (last_rows() for one per sequence).
  // Returns logits [n_rows, V].
  Tensor forward_cached(const Tensor& ids, const Tensor& positions,
                        std::span<const ops::MaskDescriptor> masks, KVCache& cache, bool commit,
                        const Tensor& rows = Tensor()) const;
  // i32 [batch]: the last token row b*tokens + tokens-1 of every sequence.
  static Tensor last_rows(int64_t batch, int64_t tokens);

 private:
  using LayerIdx = Qwen3TensorIndex::Layer;
  // Forward of both kinds: cache == nullptr for a full sequence.
  Tensor run(const Tensor& ids, const Tensor& positions, std::span<const ops::MaskDescriptor> masks,
             const Tensor& rows, Qwen3Activations* acts, KVCache* cache, bool commit) const;
  const Tensor& w(int64_t i) const { return weights_.tensors()[size_t(i)].value; }

  // Tensor parallelism: sums `t` (f32/f64) over the TP group in place; nothing without TP.
  void tp_sum(Tensor& t) const;
  // The shard-local ids of `ids` (0 for ids outside this rank's vocabulary rows) and which are inside.
  Tensor local_ids(const Tensor& ids, std::vector<uint8_t>& inside) const;

  // The products of a shard, in one call or (deterministic mode) virtual shard by virtual shard.
  int pieces() const { return tp_.comm ? tp_.pieces : 0; }
  // y [n, real_rows] = x @ w[:real_rows]^T for a column-parallel weight (output rows split over TP).
  Tensor column_forward(const Tensor& x, const Tensor& w, int64_t real_rows) const;
  // y = x @ w^T summed over TP for a row-parallel weight (input columns split over TP).
  Tensor row_forward(const Tensor& x, const Tensor& w) const;
  // Column-parallel projections sharing the input x: g_j[:real_rows] += dy_j^T @ x and the returned
  // dx = sum_j dy_j @ w_j[:real_rows], summed over TP.
  struct ColumnGrad {
    const Tensor* dy;
    int64_t w;  // the weight's index, which is also its gradient's
  };
  Tensor column_backward(const Tensor& x, std::initializer_list<ColumnGrad> terms, int64_t real_rows = -1);
  // Row-parallel: g_w += dy^T @ x, *dx = dy @ w (this rank's input columns; no sum).
  void row_backward(const Tensor& x, int64_t w, const Tensor& dy, Tensor* dx);
  // The gradient of a q/k norm gain shared by `heads` heads per row of x [n*heads, hd], summed over TP.
  Tensor norm_gain_grad(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, int64_t heads) const;

  Qwen3Weights weights_;
  Qwen3Weights grads_;  // empty (no tensors) when frozen
  Tensor flat_grads_;   // the storage of every gradient tensor
  bool trainable_ = false;
  TensorParallel tp_;
  // Indices into tensors() (not handles): a tensor replaced by a loader is seen by the next call.
  std::vector<LayerIdx> layer_idx_;
  int64_t embed_idx_ = 0, norm_idx_ = 0, head_idx_ = 0;
};

// ---- FLOP accounting (algorithm.md A 7: budgets are counted) -----------------------------------
// Convention (as torch_qwen3_ref.py): 2 FLOPs per multiply-add, matmuls only. Per token:
//   2 * N_mm + 4 * L * Hq * hd * context,
// N_mm = every Linear weight (q, k, v, o, gate, up, down of each layer) plus the LM head V*H (a tied
// head counted once, as the head); embedding lookups, norms, RoPE and softmax are excluded;
// `context` = keys the token attends to (4*hd per key and head: q.k and p.v). with_head = false
// drops the 2*V*H head term (rows whose logits are not computed).
double forward_flops_per_token(const Qwen3Config& config, double context, bool with_head = true);
// Training = forward + backward = 3x forward (the backward's two matmuls per forward matmul).
inline double training_flops_per_token(const Qwen3Config& config, double context, bool with_head = true) {
  return 3 * forward_flops_per_token(config, context, with_head);
}
// Exact forward FLOPs of one call: B = masks or `batch` rows of Tq queries and Tk keys, counting
// only the (query, key) pairs each descriptor allows, and the LM head on `logit_rows` rows.
double forward_flops(const Qwen3Config& config, std::span<const ops::MaskDescriptor> masks, int64_t batch,
                     int64_t tq, int64_t tk, int64_t logit_rows);

}  // namespace opdlm::model
