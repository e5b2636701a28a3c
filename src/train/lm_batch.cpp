// Pretraining windows and SFT rows for autoregressive training.
#include "opdlm/train/lm_batch.hpp"

#include <algorithm>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/cross_entropy.hpp"

namespace opdlm::train {

ShardWindows::ShardWindows(const io::TokenShard& shard, int64_t seq_len) : tokens_(&shard.tokens()), seq_len_(seq_len) {
  if (seq_len < 1) OPDLM_FAIL_AT("", "data.seq_len", "must be >= 1, got ", seq_len);
  const int64_t n = static_cast<int64_t>(tokens_->size());
  num_windows_ = n > seq_len ? (n - 1) / seq_len : 0;
  if (num_windows_ == 0)
    OPDLM_FAIL_AT("", "data.seq_len", "the shard has ", n, " tokens, fewer than one window of ", seq_len + 1);
}

int64_t ShardWindows::window_of_sample(uint64_t g, uint32_t seed) const {
  const uint64_t n = static_cast<uint64_t>(num_windows_);
  const uint64_t epoch = g / n;
  auto it = perms_.find(epoch);
  if (it == perms_.end()) {
    if (perms_.size() > 2) perms_.erase(perms_.begin());  // keep memory bounded on long runs
    it = perms_.emplace(epoch, io::shuffle_permutation(n, seed, static_cast<uint32_t>(epoch))).first;
  }
  return static_cast<int64_t>(it->second[g % n]);
}

LmBatch ShardWindows::batch(uint64_t first, int64_t batch_size, uint32_t seed, bool shuffle) const {
  const int64_t T = seq_len_;
  LmBatch b;
  b.ids = Tensor::empty({batch_size, T}, DType::i32);
  b.positions = Tensor::empty({batch_size, T}, DType::i32);
  b.targets = Tensor::empty({batch_size * T}, DType::i32);
  int32_t* ids = b.ids.data<int32_t>();
  int32_t* pos = b.positions.data<int32_t>();
  int32_t* tgt = b.targets.data<int32_t>();
  for (int64_t r = 0; r < batch_size; ++r) {
    const uint64_t g = first + static_cast<uint64_t>(r);
    const int64_t w = shuffle ? window_of_sample(g, seed) : static_cast<int64_t>(g % static_cast<uint64_t>(num_windows_));
    const int32_t* src = window(w);
    for (int64_t t = 0; t < T; ++t) {
      ids[r * T + t] = src[t];
      pos[r * T + t] = static_cast<int32_t>(t);
      tgt[r * T + t] = src[t + 1];
    }
  }
  b.masks = {ops::MaskDescriptor::causal()};
  b.num_targets = batch_size * T;
  return b;
}

LmBatch sft_batch(const std::vector<const SftExample*>& rows, int32_t pad_id, int64_t max_len) {
  OPDLM_CHECK(!rows.empty(), "empty SFT batch");
  int64_t T = 1;
  for (const auto* r : rows) T = std::max<int64_t>(T, static_cast<int64_t>(r->prompt.size() + r->response.size()));
  T = std::min(T, max_len);
  const int64_t B = static_cast<int64_t>(rows.size());
  LmBatch b;
  b.ids = Tensor::full({B, T}, pad_id, DType::i32);
  b.positions = Tensor::empty({B, T}, DType::i32);
  b.targets = Tensor::full({B * T}, ops::kIgnoreIndex, DType::i32);
  int32_t* ids = b.ids.data<int32_t>();
  int32_t* pos = b.positions.data<int32_t>();
  int32_t* tgt = b.targets.data<int32_t>();
  for (int64_t r = 0; r < B; ++r) {
    std::vector<int32_t> seq(rows[r]->prompt);
    seq.insert(seq.end(), rows[r]->response.begin(), rows[r]->response.end());
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(seq.size()), T);
    const int64_t P = static_cast<int64_t>(rows[r]->prompt.size());
    for (int64_t t = 0; t < T; ++t) pos[r * T + t] = static_cast<int32_t>(t);
    for (int64_t t = 0; t < n; ++t) ids[r * T + t] = seq[static_cast<size_t>(t)];
    // Position t predicts token t + 1; only response tokens are targets.
    for (int64_t t = 0; t + 1 < n; ++t)
      if (t + 1 >= P) {
        tgt[r * T + t] = seq[static_cast<size_t>(t + 1)];
        ++b.num_targets;
      }
  }
  b.masks = {ops::MaskDescriptor::causal()};
  return b;
}

}  // namespace opdlm::train
