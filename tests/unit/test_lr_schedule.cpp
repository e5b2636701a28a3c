// Tests for the warm-up + cosine schedule against the reference formula (algorithm.md B 6.4).
#include <gtest/gtest.h>

#include <cmath>

#include "opdlm/train/lr_schedule.hpp"
#include "test_util.hpp"

using opdlm::train::LrSchedule;

TEST(LrSchedule, MatchesThePaperLauncherFormula) {
  // H = 16 * 483 + 1 = 7729, W = 80, lr 1e-5 cosine to 1e-6.
  LrSchedule s{1e-5, 80, 7729, 0.1};
  EXPECT_DOUBLE_EQ(s.at(0), 0.0);
  EXPECT_DOUBLE_EQ(s.at(40), 0.5e-5);
  EXPECT_DOUBLE_EQ(s.at(80), 1e-5);
  for (int64_t n : {81, 1000, 4000, 7728}) {
    const double ref = 1e-5 * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * double(n - 80) / double(7729 - 80))));
    EXPECT_NEAR(s.at(n), ref, 1e-18) << n;
  }
  EXPECT_NEAR(s.at(7729), 1e-6, 1e-18);
  EXPECT_NEAR(s.at(100000), 1e-6, 1e-18);  // clamped at the floor past the horizon
  // Monotone decay after warm-up.
  for (int64_t n = 80; n < 7729; n += 97) EXPECT_GE(s.at(n), s.at(n + 97));
}

TEST(LrSchedule, ValidationNamesTheKey) {
  EXPECT_ERROR_HAS((LrSchedule{0, 0, 10, 0.1}.validate()), "optim.lr");
  EXPECT_ERROR_HAS((LrSchedule{1e-3, 10, 10, 0.1}.validate()), "optim.max_steps");
  EXPECT_ERROR_HAS((LrSchedule{1e-3, 0, 10, 1.5}.validate()), "optim.min_lr_ratio");
}
