// Mask descriptors: construction, validation against Tq/Tk, and the per-row allowed key ranges
// that the attention kernels iterate over (algorithm.md A 1 block grid, B 1.5 training layout).
#include "opdlm/ops/mask.hpp"

#include <sstream>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/mask_rules.hpp"

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

// The rules live in ops/mask_rules.hpp, shared with the CUDA kernels.
static_assert(static_cast<int>(MaskDescriptor::Kind::causal) == kMaskCausal &&
                  static_cast<int>(MaskDescriptor::Kind::block_causal) == kMaskBlockCausal &&
                  static_cast<int>(MaskDescriptor::Kind::training) == kMaskTraining,
              "mask_rules.hpp kind values must match MaskDescriptor::Kind");

int MaskDescriptor::ranges(int64_t q, int64_t tk, KeyRange out[2]) const {
  int64_t beg[2] = {0, 0}, end[2] = {0, 0};
  const int n = mask_ranges(static_cast<int>(kind), block_size, pad_left, prompt_len, response_len, q_offset, q,
                            tk, beg, end);
  for (int i = 0; i < n; ++i) out[i] = {beg[i], end[i]};
  return n;
}

bool MaskDescriptor::allowed(int64_t q, int64_t k, int64_t tk) const {
  KeyRange r[2];
  const int n = ranges(q, tk, r);
  for (int i = 0; i < n; ++i)
    if (k >= r[i].begin && k < r[i].end) return true;
  return false;
}

}  // namespace opdlm::ops
