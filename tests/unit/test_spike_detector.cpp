// SpikeDetector: the window rule, the accept-only baseline and the checkpoint round trip.
#include <gtest/gtest.h>

#include <cmath>

#include "opdlm/base/error.hpp"
#include "opdlm/train/spike_detector.hpp"

using opdlm::train::SpikeDetector;
using opdlm::train::SpikeRule;

TEST(SpikeDetector, SilentUntilTheWindowIsFull) {
  SpikeDetector d(SpikeRule{4, 3, 2});
  for (double v : {1.0, 1.1, 0.9}) {
    EXPECT_FALSE(d.check(1000.0)) << "a spike before the window is full";
    d.push(v);
  }
  d.push(1.0);
  EXPECT_TRUE(d.check(1000.0));
}

TEST(SpikeDetector, ThresholdIsTheLargerOfSigmaAndRatio) {
  // Window {1, 3}: mean 2, std 1 -> sigma 3 gives 5, ratio 2 gives 4: threshold 5.
  SpikeDetector d(SpikeRule{2, 3, 2});
  d.push(1);
  d.push(3);
  EXPECT_FALSE(d.check(5.0)) << "the threshold itself is not a spike";
  auto s = d.check(5.0001);
  ASSERT_TRUE(s);
  EXPECT_DOUBLE_EQ(s->mean, 2.0);
  EXPECT_DOUBLE_EQ(s->stddev, 1.0);
  EXPECT_DOUBLE_EQ(s->threshold, 5.0);
  // A flat window (std 0): the ratio rule keeps ordinary noise from counting.
  SpikeDetector flat(SpikeRule{3, 6, 2});
  for (int i = 0; i < 3; ++i) flat.push(0.5);
  EXPECT_FALSE(flat.check(0.9));
  EXPECT_TRUE(flat.check(1.01));
}

TEST(SpikeDetector, CheckingDoesNotMoveTheBaselineAndTheWindowSlides) {
  SpikeDetector d(SpikeRule{3, 6, 2});
  for (double v : {1.0, 1.0, 1.0}) d.push(v);
  ASSERT_TRUE(d.check(50.0));
  ASSERT_TRUE(d.check(50.0)) << "check() must not add the value";
  d.push(2.0);  // window {1, 1, 2}
  ASSERT_EQ(d.values().size(), 3u);
  EXPECT_EQ(d.values().front(), 1.0);
  EXPECT_EQ(d.values().back(), 2.0);
}

TEST(SpikeDetector, NanIsNeverASpikeAndWindowZeroIsOff) {
  SpikeDetector d(SpikeRule{2, 1, 1});
  d.push(1);
  d.push(1);
  EXPECT_FALSE(d.check(std::nan(""))) << "non-finite values are numerics.on_nonfinite's, not a spike";
  SpikeDetector off(SpikeRule{0, 1, 1});
  off.push(1);
  EXPECT_TRUE(off.values().empty());
  EXPECT_FALSE(off.check(1e30));
}

TEST(SpikeDetector, JsonRoundTripIsExactAndMalformedIsRefused) {
  SpikeDetector a(SpikeRule{4, 6, 2});
  for (double v : {0.1, 1.0 / 3.0, 2.718281828459045, 1e-300}) a.push(v);
  SpikeDetector b(SpikeRule{4, 6, 2});
  b.from_json(nlohmann::json::parse(a.to_json().dump()), "ckpt/state.h5");
  ASSERT_EQ(a.values(), b.values()) << "the window must survive a checkpoint bit for bit";
  try {
    b.from_json(nlohmann::json::parse(R"([1, "x"])"), "ckpt/state.h5");
    FAIL() << "a malformed window was accepted";
  } catch (const opdlm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ckpt/state.h5"), std::string::npos) << e.what();
  }
}
