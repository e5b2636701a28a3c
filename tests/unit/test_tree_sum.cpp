// TreeSum, the canonical pairwise-tree gradient sum: streaming equals the dense recursive tree bit
// for bit (absent leaves, -0, values whose sum depends on the order), any aligned split into blocks
// combined by tree_combine gives the same bits (the DP-layout independence), and the stack stays
// logarithmic.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "opdlm/base/error.hpp"
#include "opdlm/parallel/tree_sum.hpp"

namespace {

using namespace opdlm::parallel;

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Leaves whose float sum depends on the order: magnitudes over 8 decades, some exact -0.
std::vector<std::vector<float>> make_leaves(int64_t n, size_t len, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<int> e(-4, 4);
  std::vector<std::vector<float>> leaves(static_cast<size_t>(n), std::vector<float>(len));
  for (auto& l : leaves)
    for (auto& x : l) x = (gen() % 11 == 0) ? -0.0f : u(gen) * std::pow(10.f, float(e(gen)));
  return leaves;
}

TEST(TreeSum, StreamingEqualsTheDenseTreeForEveryWidthAndAbsentPattern) {
  const size_t len = 33;
  for (int64_t width : {1, 2, 4, 8, 16, 32}) {
    const auto leaves = make_leaves(width, len, uint32_t(width));
    std::mt19937 gen(7 + uint32_t(width));
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<bool> present(static_cast<size_t>(width));
      for (int64_t i = 0; i < width; ++i) present[size_t(i)] = trial == 0 || gen() % 3 != 0;
      if (trial == 1) present.assign(size_t(width), false);  // nothing: +0
      TreeSum ts(len, width);
      for (int64_t i = 0; i < width; ++i)
        if (present[size_t(i)]) ts.add(i, leaves[size_t(i)]);
      const auto got = ts.finish();
      const auto want = tree_sum_reference(leaves, present, len, width);
      ASSERT_TRUE(same_bits(got, want)) << "width " << width << " trial " << trial;
      EXPECT_LE(ts.peak_buffers(), size_t(std::log2(double(width))) + 1);
    }
  }
}

TEST(TreeSum, TheOrderMattersSoTheseTestsCanFail) {
  // A left fold of the same leaves gives other bits: the layout independence is not free.
  const size_t len = 64;
  const auto leaves = make_leaves(8, len, 3);
  std::vector<float> fold(len, 0.0f);
  for (const auto& l : leaves)
    for (size_t k = 0; k < len; ++k) fold[k] += l[k];
  EXPECT_FALSE(same_bits(fold, tree_sum_reference(leaves, std::vector<bool>(8, true), len, 8)));
}

TEST(TreeSum, AlignedBlocksCombinedByTheTreeGiveTheSameBitsAsOneProcess) {
  const size_t len = 17;
  const int64_t width = 16;
  const auto leaves = make_leaves(width, len, 11);
  std::mt19937 gen(5);
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<bool> present(static_cast<size_t>(width));
    for (int64_t i = 0; i < width; ++i) present[size_t(i)] = gen() % 4 != 0;
    if (trial == 1)
      for (int64_t i = width / 2; i < width; ++i) present[size_t(i)] = false;  // a whole block absent
    TreeSum one(len, width);
    for (int64_t i = 0; i < width; ++i)
      if (present[size_t(i)]) one.add(i, leaves[size_t(i)]);
    const auto serial = one.finish();
    for (int64_t dp : {1, 2, 4, 8, 16}) {
      const int64_t block = width / dp;
      std::vector<std::vector<float>> parts;
      for (int64_t d = 0; d < dp; ++d) {
        TreeSum ts(len, block);
        for (int64_t i = 0; i < block; ++i)
          if (present[size_t(d * block + i)]) ts.add(i, leaves[size_t(d * block + i)]);
        parts.push_back(ts.finish());
      }
      std::vector<std::span<const float>> views(parts.begin(), parts.end());
      ASSERT_TRUE(same_bits(tree_combine(views), serial)) << "dp " << dp << " trial " << trial;
    }
  }
}

// A training loop keeps one TreeSum and reuses its buffers: every sum equals a fresh TreeSum's, and
// no more than log2(width) + 1 buffers are ever made.
TEST(TreeSum, OneTreeSumReusedGivesTheBitsOfFreshOnes) {
  const size_t len = 9;
  const int64_t width = 8;
  TreeSum reused(len, width);
  std::mt19937 gen(3);
  for (int round = 0; round < 6; ++round) {
    const auto leaves = make_leaves(width, len, 20 + round);
    std::vector<bool> present(static_cast<size_t>(width));
    for (int64_t i = 0; i < width; ++i) present[size_t(i)] = round == 5 ? false : gen() % 3 != 0;
    for (int64_t i = 0; i < width; ++i)
      if (present[size_t(i)]) reused.add(i, leaves[size_t(i)]);
    std::vector<float> got(len, 7.0f);
    reused.finish_into(got);
    ASSERT_TRUE(same_bits(got, tree_sum_reference(leaves, present, len, width))) << "round " << round;
  }
  EXPECT_LE(reused.peak_buffers(), 4u);
}

TEST(TreeSum, MisuseIsAnError) {
  EXPECT_THROW(TreeSum(4, 3), opdlm::Error);  // not a power of two
  TreeSum ts(2, 4);
  const std::vector<float> leaf = {1.f, 2.f};
  ts.add(1, leaf);
  EXPECT_THROW(ts.add(1, leaf), opdlm::Error);  // not increasing
  EXPECT_THROW(ts.add(4, leaf), opdlm::Error);  // outside the width
  EXPECT_THROW(ts.add(2, std::vector<float>{1.f}), opdlm::Error);  // wrong length
  EXPECT_EQ(tree_width(1), 1);
  EXPECT_EQ(tree_width(5), 8);
  EXPECT_EQ(tree_width(8), 8);
}

}  // namespace
