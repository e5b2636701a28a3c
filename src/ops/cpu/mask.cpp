// Mask descriptors: construction, validation against Tq/Tk, and the per-row allowed key ranges
// that the attention kernels iterate over (algorithm.md A 1 block grid, B 1.5 training layout).
#include "opdlm/ops/mask.hpp"

#include <algorithm>
#include <sstream>

#include "opdlm/base/error.hpp"

namespace opdlm::ops {

const char* mask_kind_name(MaskDescriptor::Kind kind) {
  switch (kind) {
    case MaskDescriptor::Kind::causal: return "causal";
    case MaskDescriptor::Kind::block_causal: return "block_causal";
    case MaskDescriptor::Kind::training: return "training";
  }
  return "?";
}

MaskDescriptor MaskDescriptor::causal(int64_t pad_left, int64_t q_offset) {
  MaskDescriptor m;
  m.kind = Kind::causal;
  m.pad_left = pad_left;
  m.q_offset = q_offset;
  return m;
}

MaskDescriptor MaskDescriptor::block_causal(int64_t b, int64_t prompt_len, int64_t pad_left,
                                            int64_t q_offset) {
  MaskDescriptor m;
  m.kind = Kind::block_causal;
  m.block_size = b;
  m.pad_left = pad_left;
  m.prompt_len = prompt_len;
  m.q_offset = q_offset;
  return m;
}

MaskDescriptor MaskDescriptor::training(int64_t b, int64_t prompt_len, int64_t response_len,
                                        int64_t pad_left) {
  MaskDescriptor m;
  m.kind = Kind::training;
  m.block_size = b;
  m.pad_left = pad_left;
  m.prompt_len = prompt_len;
  m.response_len = response_len;
  return m;
}

std::string MaskDescriptor::describe() const {
  std::ostringstream os;
  os << mask_kind_name(kind) << "(b=" << block_size << ", pad_left=" << pad_left
     << ", prompt_len=" << prompt_len << ", response_len=" << response_len
     << ", q_offset=" << q_offset << ")";
  return os.str();
}

void MaskDescriptor::validate(int64_t tq, int64_t tk, const std::string& name) const {
  auto fail = [&](const char* field, const auto&... what) {
    OPDLM_FAIL("mask descriptor '", name, "' ", describe(), ": field ", field, " ", what...);
  };
  if (kind != Kind::causal && kind != Kind::block_causal && kind != Kind::training)
    fail("kind", "has unknown value ", int(kind));
  if (block_size < 1) fail("block_size", "is ", block_size, ", expected >= 1");
  if (pad_left < 0) fail("pad_left", "is ", pad_left, ", expected >= 0");
  if (prompt_len < 0) fail("prompt_len", "is ", prompt_len, ", expected >= 0");
  if (response_len < 0) fail("response_len", "is ", response_len, ", expected >= 0");
  if (q_offset < 0) fail("q_offset", "is ", q_offset, ", expected >= 0");
  const int64_t L0 = pad_left + prompt_len;
  if (kind == Kind::training) {
    if (q_offset != 0) fail("q_offset", "is ", q_offset, ", expected 0 for a training row");
    const int64_t n = L0 + 2 * response_len;
    if (tq != n || tk != n)
      fail("response_len", "gives N = pad_left + prompt_len + 2*response_len = ", n,
           ", expected Tq = Tk = N but Tq is ", tq, " and Tk is ", tk);
    return;
  }
  if (q_offset + tq > tk)
    fail("q_offset", "is ", q_offset, ": q_offset + Tq = ", q_offset + tq, " exceeds Tk = ", tk);
  if (L0 > tk)
    fail(prompt_len > 0 ? "prompt_len" : "pad_left", "gives pad_left + prompt_len = ", L0,
         ", more than Tk = ", tk);
}

int MaskDescriptor::ranges(int64_t q, int64_t tk, KeyRange out[2]) const {
  const int64_t b = block_size;
  const int64_t L0 = pad_left + prompt_len;
  const int64_t t = q_offset + q;
  switch (kind) {
    case Kind::causal:
      // A pad row's causal keys are all pads, which are removed: it attends to itself.
      if (t < pad_left) {
        out[0] = {t, t + 1};
        return 1;
      }
      out[0] = {pad_left, t + 1};
      return 1;
    case Kind::block_causal:
    case Kind::training: {
      if (t < L0) {  // prompt or pad row: right-aligned prompt blocks, the last one ends at L0
        const int64_t pi = (L0 - 1 - t) / b;
        const int64_t end = L0 - pi * b;
        // A pad row whose block holds no real prompt token is left empty: it attends to itself.
        if (end <= pad_left) {
          out[0] = {t, t + 1};
          return 1;
        }
        out[0] = {pad_left, end};
        return 1;
      }
      if (kind == Kind::block_causal) {
        const int64_t beta = (t - L0) / b;
        out[0] = {pad_left, std::min(L0 + (beta + 1) * b, tk)};
        return 1;
      }
      const int64_t L1 = response_len;
      if (t < L0 + L1) {  // clean row: prompt + clean blocks <= beta
        const int64_t beta = (t - L0) / b;
        out[0] = {pad_left, std::min(L0 + (beta + 1) * b, L0 + L1)};
        return 1;
      }
      // Noisy row: prompt + clean blocks < beta (one range), then its own noisy block.
      const int64_t beta = (t - L0 - L1) / b;
      const KeyRange own{L0 + L1 + beta * b, std::min(L0 + L1 + (beta + 1) * b, L0 + 2 * L1)};
      const int64_t ctx_end = L0 + beta * b;
      if (ctx_end > pad_left) {
        out[0] = {pad_left, ctx_end};
        out[1] = own;
        return 2;
      }
      out[0] = own;
      return 1;
    }
  }
  return 0;
}

bool MaskDescriptor::allowed(int64_t q, int64_t k, int64_t tk) const {
  KeyRange r[2];
  const int n = ranges(q, tk, r);
  for (int i = 0; i < n; ++i)
    if (k >= r[i].begin && k < r[i].end) return true;
  return false;
}

}  // namespace opdlm::ops
