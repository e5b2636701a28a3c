// bfloat16 <-> float32 conversion with round-to-nearest-even (NaN stays NaN, quiet).
#pragma once

#include <cstdint>
#include <cstring>

namespace opdlm {

struct bf16 {
  uint16_t bits = 0;
};

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // ties go to the even upper half
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 to_bf16(float f) { return bf16{f32_to_bf16_bits(f)}; }
inline float to_f32(bf16 b) { return bf16_bits_to_f32(b.bits); }

}  // namespace opdlm
