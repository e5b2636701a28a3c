// Attention mask descriptors: a few integers that say which keys each query row may attend
// (causal, opdlm's block grid, the doubled training row), so no op ever materialises an N x N mask.
#pragma once

#include <cstdint>
#include <string>

namespace opdlm::ops {

// Half-open key interval [begin, end).
struct KeyRange {
  int64_t begin, end;
};

// Rules (L0 = pad_left + prompt_len, absolute query position t = q_offset + q; algorithm.md A 1, B 1.5):
//   causal:       keys [pad_left, t+1).
//   block_causal: one block grid: response blocks start at L0, prompt blocks are right-aligned to L0;
//                 a row sees every non-pad key of its own and earlier blocks (clipped to Tk).
//   training:     S = [pads | prompt (P) | x0 (L1) | xt (L1)], N = L0 + 2*L1: prompt rows as in
//                 block_causal; clean row of block beta: prompt + clean blocks <= beta; noisy row of
//                 block beta: prompt + clean blocks < beta + its own noisy block.
//   Every kind: the pad_left leading keys are disallowed for all rows, and a row left with no key
//   attends to itself only. (B 1.5 taken literally: a pad row inside the partial leftmost prompt
//   block keeps that block's real prompt keys, as opd_ref.build_training_mask does; its output is
//   never read, since no row attends a pad key.)
struct MaskDescriptor {
  enum class Kind : uint8_t { causal, block_causal, training };
  Kind kind = Kind::causal;
  int64_t block_size = 1;    // b (block_causal, training)
  int64_t pad_left = 0;      // leading pad keys: disallowed for every row (see the pad rule above)
  int64_t prompt_len = 0;    // P real prompt tokens after the pads (block_causal, training)
  int64_t response_len = 0;  // L1 (training)
  int64_t q_offset = 0;      // absolute key position of query row 0 (KV-cache decoding; 0 for training)

  static MaskDescriptor causal(int64_t pad_left = 0, int64_t q_offset = 0);
  static MaskDescriptor block_causal(int64_t b, int64_t prompt_len, int64_t pad_left = 0,
                                     int64_t q_offset = 0);
  static MaskDescriptor training(int64_t b, int64_t prompt_len, int64_t response_len,
                                 int64_t pad_left = 0);

  // Throws opdlm::Error naming `name` (e.g. "masks[2]") and the field that contradicts Tq / Tk.
  void validate(int64_t tq, int64_t tk, const std::string& name) const;
  // Allowed keys of query row q (0 <= q < Tq of a validated descriptor): writes 1 or 2 non-empty,
  // disjoint, ascending ranges and returns how many.
  int ranges(int64_t q, int64_t tk, KeyRange out[2]) const;
  bool allowed(int64_t q, int64_t k, int64_t tk) const;
  // "training(b=4, pad_left=2, prompt_len=5, response_len=6, q_offset=0)" for messages.
  std::string describe() const;
};

const char* mask_kind_name(MaskDescriptor::Kind kind);

}  // namespace opdlm::ops
