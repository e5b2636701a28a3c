// Mask descriptor tests: every (query, key) pair of many small cases against a literal, pair-at-a-time
// transcription of algorithm.md A 1 / B 1.4 / B 1.5 written here, plus range shape and validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "opdlm/base/error.hpp"
#include "opdlm/ops/mask.hpp"

using namespace opdlm;
using ops::KeyRange;
using ops::MaskDescriptor;

namespace opdlm::test {

namespace {
int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The rules before pad handling, for absolute query position q and key k (prose -> code, no ranges).
bool literal_rule(const MaskDescriptor& m, int64_t q, int64_t k) {
  const int64_t b = m.block_size, L0 = m.pad_left + m.prompt_len, L1 = m.response_len;
  // pi(q) = floor((L0-1-q)/b): prompt blocks counted from the right end of the prompt region.
  auto pi = [&](int64_t x) { return floordiv(L0 - 1 - x, b); };
  switch (m.kind) {
    case MaskDescriptor::Kind::causal:
      return k <= q;
    case MaskDescriptor::Kind::block_causal: {
      // A 1's single grid with B 1.4's rule "g(k) <= g(q)": response blocks start at L0 (block
      // (t-L0)/b), prompt blocks are right-aligned to L0 (ordinal -1 - pi(t), the last one is -1).
      auto g = [&](int64_t t) { return t >= L0 ? floordiv(t - L0, b) : -1 - pi(t); };
      return g(k) <= g(q);
    }
    case MaskDescriptor::Kind::training: {
      // B 1.5: regions Pi = [0, L0), C = [L0, L0+L1), X = [L0+L1, N); i(x) = response offset.
      auto inPi = [&](int64_t x) { return x < L0; };
      auto inC = [&](int64_t x) { return x >= L0 && x < L0 + L1; };
      auto inX = [&](int64_t x) { return x >= L0 + L1 && x < L0 + 2 * L1; };
      auto beta = [&](int64_t x) { return floordiv(inC(x) ? x - L0 : x - L0 - L1, b); };
      if (inPi(q)) return inPi(k) && k < L0 - pi(q) * b;
      if (inC(q)) return inPi(k) || (inC(k) && beta(k) <= beta(q));
      return inPi(k) || (inC(k) && beta(k) < beta(q)) || (inX(k) && beta(k) == beta(q));
    }
  }
  return false;
}
}  // namespace

// Allowed keys of absolute query position t: pad columns (k < pad_left) are disallowed for every
// row; a row left with no allowed key attends to itself only.
std::vector<bool> literal_mask_row(const MaskDescriptor& m, int64_t t, int64_t tk) {
  std::vector<bool> row(tk, false);
  bool any = false;
  for (int64_t k = m.pad_left; k < tk; ++k) any |= (row[k] = literal_rule(m, t, k));
  if (!any) row[t] = true;
  return row;
}

}  // namespace opdlm::test

namespace {

// Compares every pair of query rows [0, tq) (absolute q_offset + q) with the literal rule and checks
// that the ranges are non-empty, disjoint, ascending and inside [0, tk).
void expect_matches_literal(const MaskDescriptor& m, int64_t tq, int64_t tk) {
  ASSERT_NO_THROW(m.validate(tq, tk, "m")) << m.describe();
  for (int64_t q = 0; q < tq; ++q) {
    const std::vector<bool> lit = test::literal_mask_row(m, m.q_offset + q, tk);
    KeyRange r[2];
    const int n = m.ranges(q, tk, r);
    ASSERT_TRUE(n == 1 || n == 2) << m.describe() << " row " << q;
    for (int i = 0; i < n; ++i) {
      ASSERT_LT(r[i].begin, r[i].end) << m.describe() << " row " << q << " range " << i;
      ASSERT_GE(r[i].begin, 0);
      ASSERT_LE(r[i].end, tk);
      if (i > 0) ASSERT_LT(r[i - 1].end, r[i].begin) << "ranges must be disjoint, ascending, not adjacent";
    }
    for (int64_t k = 0; k < tk; ++k)
      ASSERT_EQ(m.allowed(q, k, tk), bool(lit[k]))
          << m.describe() << " Tq=" << tq << " Tk=" << tk << " query " << q << " key " << k;
  }
}

}  // namespace

TEST(MaskTraining, EveryPairMatchesLiteralRules) {
  int cases = 0;
  for (int64_t b : {1, 2, 3, 4})
    for (int64_t P : {0, 1, 2, 3, 4, 5, 7, 8})
      for (int64_t pad : {0, 1, 3})
        for (int64_t L1 : {0, 1, 4, 5, 7}) {
          const int64_t n = pad + P + 2 * L1;
          if (n == 0) continue;
          expect_matches_literal(MaskDescriptor::training(b, P, L1, pad), n, n);
          ++cases;
        }
  EXPECT_GT(cases, 400);
}

TEST(MaskTraining, HandCheckedSmallCase) {
  // b=2, one pad, P=1, L1=2: [pad | p | c0 c1 | x0 x1]. The pad row shares the prompt block with p,
  // so it keeps key 1 (B 1.5: only rows left empty self-attend).
  const auto m = MaskDescriptor::training(2, 1, 2, 1);
  const char* want[6] = {"010000", "010000", "011100", "011100", "010011", "010011"};
  for (int q = 0; q < 6; ++q)
    for (int k = 0; k < 6; ++k) EXPECT_EQ(m.allowed(q, k, 6), want[q][k] == '1') << q << "," << k;
  // b=4, three pads, P=2, L1=5: prompt block [1,5) holds pads 1,2; pad row 0 is alone in its block.
  const auto m2 = MaskDescriptor::training(4, 2, 5, 3);
  KeyRange r[2];
  ASSERT_EQ(m2.ranges(0, 15, r), 1);
  EXPECT_EQ(r[0].begin, 0);
  EXPECT_EQ(r[0].end, 1);
  ASSERT_EQ(m2.ranges(1, 15, r), 1);
  EXPECT_EQ(r[0].begin, 3);
  EXPECT_EQ(r[0].end, 5);
  // Noisy row of block 1 (offset 4, the partial last block): prompt + clean block 0, then itself.
  ASSERT_EQ(m2.ranges(5 + 5 + 4, 15, r), 2);
  EXPECT_EQ(r[0].begin, 3);
  EXPECT_EQ(r[0].end, 9);
  EXPECT_EQ(r[1].begin, 14);
  EXPECT_EQ(r[1].end, 15);
}

TEST(MaskBlockCausal, EveryPairMatchesLiteralRulesWithDecodeOffsets) {
  for (int64_t b : {1, 2, 3, 4})
    for (int64_t P : {0, 1, 2, 3, 5, 8})
      for (int64_t pad : {0, 1, 3})
        for (int64_t R : {0, 1, 4, 5, 7}) {
          const int64_t tk = pad + P + R;
          if (tk == 0) continue;
          // Full pass, then every decode layout: queries [q_offset, tk) against keys [0, tk), and
          // single-row and prefix-query layouts with keys past the last query.
          for (int64_t off = 0; off < tk; ++off) {
            expect_matches_literal(MaskDescriptor::block_causal(b, P, pad, off), tk - off, tk);
            expect_matches_literal(MaskDescriptor::block_causal(b, P, pad, off), 1, tk);
          }
          expect_matches_literal(MaskDescriptor::block_causal(b, P, pad, 0), 0, tk);
        }
}

TEST(MaskBlockCausal, PlainGridWithoutPromptIsAlignedToZero) {
  const auto m = MaskDescriptor::block_causal(3, 0);
  for (int64_t q = 0; q < 10; ++q)
    for (int64_t k = 0; k < 10; ++k) EXPECT_EQ(m.allowed(q, k, 10), k / 3 <= q / 3) << q << "," << k;
}

TEST(MaskCausal, EveryPairMatchesLiteralRulesWithDecodeOffsets) {
  for (int64_t pad : {0, 1, 3})
    for (int64_t tk = std::max<int64_t>(pad, 1); tk <= 10; ++tk)
      for (int64_t off = 0; off < tk; ++off) {
        expect_matches_literal(MaskDescriptor::causal(pad, off), tk - off, tk);
        expect_matches_literal(MaskDescriptor::causal(pad, off), 1, tk);
      }
}

namespace {
void expect_rejected(const MaskDescriptor& m, int64_t tq, int64_t tk, const std::vector<std::string>& words) {
  try {
    m.validate(tq, tk, "masks[2]");
    FAIL() << "accepted " << m.describe() << " Tq=" << tq << " Tk=" << tk;
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("masks[2]"), std::string::npos) << w;
    for (const auto& s : words) EXPECT_NE(w.find(s), std::string::npos) << "missing '" << s << "' in: " << w;
  }
}
}  // namespace

TEST(MaskValidate, RejectionsNameTheField) {
  // Training: N = 2 + 3 + 2*4 = 13.
  expect_rejected(MaskDescriptor::training(4, 3, 4, 2), 12, 12, {"response_len", "13", "Tq is 12"});
  expect_rejected(MaskDescriptor::training(4, 3, 4, 2), 13, 14, {"response_len", "Tk is 14"});
  auto tq = MaskDescriptor::training(4, 3, 4, 2);
  tq.q_offset = 1;
  expect_rejected(tq, 13, 13, {"q_offset", "is 1", "expected 0"});
  expect_rejected(MaskDescriptor::training(0, 3, 4), 11, 11, {"block_size", "is 0"});
  expect_rejected(MaskDescriptor::block_causal(4, 3, -1), 2, 2, {"pad_left", "is -1"});
  expect_rejected(MaskDescriptor::training(2, -1, 4), 7, 7, {"prompt_len", "is -1"});
  expect_rejected(MaskDescriptor::causal(0, 5), 4, 8, {"q_offset", "is 5", "exceeds Tk = 8"});
  expect_rejected(MaskDescriptor::block_causal(4, 6, 3), 8, 8, {"prompt_len", "9"});
  expect_rejected(MaskDescriptor::causal(9), 8, 8, {"pad_left", "9"});
  EXPECT_NO_THROW(MaskDescriptor::causal(0, 4).validate(4, 8, "m"));
  EXPECT_NO_THROW(MaskDescriptor::training(4, 3, 4, 2).validate(13, 13, "m"));
}
