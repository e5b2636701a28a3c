// Language-model batches for autoregressive training: fixed windows over a token shard (pretraining)
// and prompt/response rows with loss on the response only (SFT). Samples are chosen by global
// sample id through the counter RNG, so a batch is the same on any layout and after a restart.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "opdlm/io/token_shard.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/tensor/tensor.hpp"

namespace opdlm::train {

// A causal-LM batch: row b predicts targets[b*T + t] from ids[b, 0..t].
struct LmBatch {
  Tensor ids;        // i32 [B, T]
  Tensor positions;  // i32 [B, T]
  Tensor targets;    // i32 [B*T], ops::kIgnoreIndex where no loss
  std::vector<ops::MaskDescriptor> masks;  // one causal descriptor shared by all rows
  int64_t num_targets = 0;                 // rows that carry loss
};

// Non-overlapping windows of seq_len + 1 tokens over the shard's concatenated token stream (the
// last seq_len tokens of one window are the targets; consecutive windows share one boundary token).
class ShardWindows {
 public:
  ShardWindows(const io::TokenShard& shard, int64_t seq_len);
  int64_t num_windows() const { return num_windows_; }
  int64_t seq_len() const { return seq_len_; }
  // Tokens of window w (w < num_windows()).
  const int32_t* window(int64_t w) const { return tokens_->data() + w * seq_len_; }
  // The window of global sample g: epoch g / num_windows(), a keyed permutation of the windows per
  // epoch (seed, data_shuffle, epoch).
  int64_t window_of_sample(uint64_t g, uint32_t seed) const;
  // B consecutive global samples starting at `first` (shuffled), or windows [first, first + B)
  // in order when seed-less evaluation is wanted (shuffle = false).
  LmBatch batch(uint64_t first, int64_t batch_size, uint32_t seed, bool shuffle = true) const;

 private:
  const std::vector<int32_t>* tokens_;
  int64_t seq_len_, num_windows_;
  mutable std::map<uint64_t, std::vector<uint64_t>> perms_;  // epoch -> permutation (cached)
};

// One SFT example: loss on the response tokens only.
struct SftExample {
  std::vector<int32_t> prompt, response;
};
// Rows prompt ⊕ response, right-padded with `pad_id` to the longest row (at most max_len tokens,
// longer rows truncated on the right); targets are the next token where that token belongs to the
// response, kIgnoreIndex elsewhere (prompt and padding).
LmBatch sft_batch(const std::vector<const SftExample*>& rows, int32_t pad_id, int64_t max_len);

}  // namespace opdlm::train
