// The mask descriptor rules as one plain-data function callable from host and device code, so the CPU
// (ops::MaskDescriptor::ranges) and the CUDA kernels share a single implementation of "which keys may
// query row q see" (algorithm.md A 1 block grid, B 1.5 training layout; ops/mask.hpp states the rules).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define OPDLM_HD __host__ __device__
#else
#define OPDLM_HD
#endif

namespace opdlm::ops {

// Values of ops::MaskDescriptor::Kind (mask.hpp static_asserts that they agree).
inline constexpr int kMaskCausal = 0;
inline constexpr int kMaskBlockCausal = 1;
inline constexpr int kMaskTraining = 2;

namespace detail {
OPDLM_HD inline int64_t mask_min(int64_t a, int64_t b) { return a < b ? a : b; }
}  // namespace detail

// Allowed keys of query row q (0 <= q < Tq of a validated descriptor): writes 1 or 2 non-empty,
// disjoint, ascending half-open ranges [out_begin[i], out_end[i]) and returns how many (0 for an
// unknown kind).
OPDLM_HD inline int mask_ranges(int kind, int64_t block_size, int64_t pad_left, int64_t prompt_len,
                                int64_t response_len, int64_t q_offset, int64_t q, int64_t tk, int64_t out_begin[2],
                                int64_t out_end[2]) {
  const int64_t b = block_size;
  const int64_t L0 = pad_left + prompt_len;
  const int64_t t = q_offset + q;
  if (kind == kMaskCausal) {
    // A pad row's causal keys are all pads, which are removed: it attends to itself.
    out_begin[0] = t < pad_left ? t : pad_left;
    out_end[0] = t + 1;
    return 1;
  }
  if (kind != kMaskBlockCausal && kind != kMaskTraining) return 0;
  if (t < L0) {  // prompt or pad row: right-aligned prompt blocks, the last one ends at L0
    const int64_t pi = (L0 - 1 - t) / b;
    const int64_t end = L0 - pi * b;
    // A pad row whose block holds no real prompt token is left empty: it attends to itself.
    if (end <= pad_left) {
      out_begin[0] = t;
      out_end[0] = t + 1;
      return 1;
    }
    out_begin[0] = pad_left;
    out_end[0] = end;
    return 1;
  }
  if (kind == kMaskBlockCausal) {
    const int64_t beta = (t - L0) / b;
    out_begin[0] = pad_left;
    out_end[0] = detail::mask_min(L0 + (beta + 1) * b, tk);
    return 1;
  }
  const int64_t L1 = response_len;
  if (t < L0 + L1) {  // clean row: prompt + clean blocks <= beta
    const int64_t beta = (t - L0) / b;
    out_begin[0] = pad_left;
    out_end[0] = detail::mask_min(L0 + (beta + 1) * b, L0 + L1);
    return 1;
  }
  // Noisy row: prompt + clean blocks < beta (one range), then its own noisy block.
  const int64_t beta = (t - L0 - L1) / b;
  const int64_t own_begin = L0 + L1 + beta * b;
  const int64_t own_end = detail::mask_min(L0 + L1 + (beta + 1) * b, L0 + 2 * L1);
  const int64_t ctx_end = L0 + beta * b;
  if (ctx_end > pad_left) {
    out_begin[0] = pad_left;
    out_end[0] = ctx_end;
    out_begin[1] = own_begin;
    out_end[1] = own_end;
    return 2;
  }
  out_begin[0] = own_begin;
  out_end[0] = own_end;
  return 1;
}

}  // namespace opdlm::ops
