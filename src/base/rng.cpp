// Philox4x32-10 and the keyed draws built on it (uniforms, unbiased integers, Gumbel, categorical).
#include "opdlm/base/rng.hpp"

#include <cmath>
#include <limits>

#include "opdlm/base/error.hpp"

namespace opdlm {

namespace {
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

inline void round_once(PhiloxCounter& c, const PhiloxKey& k) {
  uint64_t p0 = static_cast<uint64_t>(kMul0) * c[0];
  uint64_t p1 = static_cast<uint64_t>(kMul1) * c[2];
  c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
       static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
}
}  // namespace

PhiloxCounter philox4x32_10(PhiloxCounter c, PhiloxKey k) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k[0] += kWeyl0;
      k[1] += kWeyl1;
    }
    round_once(c, k);
  }
  return c;
}

uint32_t CounterRng::u32(uint32_t i) const {
  PhiloxCounter ctr{i >> 2, key_.position, key_.sample_id, key_.step};
  PhiloxKey k{key_.seed, static_cast<uint32_t>(key_.purpose)};
  return philox4x32_10(ctr, k)[i & 3u];
}

float CounterRng::uniform(uint32_t i) const {
  return static_cast<float>(u32(i) >> 8) * (1.0f / 16777216.0f);
}

float CounterRng::uniform_open(uint32_t i) const {
  return (static_cast<float>(u32(i) >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

double CounterRng::uniform_open_f64(uint32_t i) const {
  uint64_t hi = u32(2 * i) >> 6;  // 26 bits
  uint64_t lo = u32(2 * i + 1) >> 5;  // 27 bits
  uint64_t m = (hi << 27) | lo;  // 53 bits
  return (static_cast<double>(m) + 0.5) * (1.0 / 9007199254740992.0);
}

double CounterRng::gumbel(uint32_t i) const { return -std::log(-std::log(uniform_open_f64(i))); }

double CounterRng::normal(uint32_t i) const {
  const double u1 = uniform_open_f64(2 * i), u2 = uniform_open_f64(2 * i + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

uint32_t CounterRng::Cursor::below(uint32_t n) {
  OPDLM_CHECK(n > 0, "below(0) has no valid result");
  uint64_t m = static_cast<uint64_t>(u32()) * n;
  uint32_t low = static_cast<uint32_t>(m);
  if (low < n) {
    const uint32_t threshold = static_cast<uint32_t>(-n) % n;  // 2^32 mod n
    while (low < threshold) {
      m = static_cast<uint64_t>(u32()) * n;
      low = static_cast<uint32_t>(m);
    }
  }
  return static_cast<uint32_t>(m >> 32);
}

int64_t categorical_gumbel(const CounterRng& rng, const float* logits, int64_t n, uint32_t vocab_offset,
                           double* winner_score) {
  int64_t best = -1;
  double best_score = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < n; ++v) {
    if (logits[v] == -std::numeric_limits<float>::infinity()) continue;  // filtered out
    double s = static_cast<double>(logits[v]) + rng.gumbel(vocab_offset + static_cast<uint32_t>(v));
    if (s > best_score) {
      best_score = s;
      best = v;
    }
  }
  if (winner_score) *winner_score = best_score;
  return best;
}

int64_t categorical_inverse_cdf(const CounterRng& rng, const float* weights, int64_t n, uint32_t index) {
  double total = 0;
  for (int64_t v = 0; v < n; ++v) {
    if (!(weights[v] >= 0)) OPDLM_FAIL("categorical weight ", v, " is ", weights[v], " (must be >= 0)");
    total += weights[v];
  }
  if (total <= 0) return -1;
  double u = rng.uniform_open_f64(index) * total, acc = 0;
  int64_t last = -1;
  for (int64_t v = 0; v < n; ++v) {
    if (weights[v] <= 0) continue;
    last = v;
    acc += weights[v];
    if (u < acc) return v;
  }
  return last;  // u within rounding of the total
}

}  // namespace opdlm
