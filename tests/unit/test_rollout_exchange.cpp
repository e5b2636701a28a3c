// The wire format of all_gather_rollouts: pack/unpack round-trips every field (failed rollouts and
// their error text included), and a truncated, padded or corrupted array is an Error, never a crash.
#include <gtest/gtest.h>

#include "opdlm/base/error.hpp"
#include "opdlm/diffusion/rollout_exchange.hpp"

namespace {

using namespace opdlm::diffusion;

std::vector<Rollout> sample_rollouts() {
  Rollout a;
  a.sample_id = 7;
  a.prompt = {1, 2, 3};
  a.response = {4, 5, 2};
  a.step_map = {1, 1, 2};
  a.stopped_at_eos = true;
  a.denoise_forwards = 2;
  a.commit_forwards = 0;
  Rollout b;
  b.sample_id = 0xFFFFFFFFu;  // the largest id
  b.status = RolloutStatus::empty_prompt;
  b.error = "empty prompt: nothing to condition on \xE2\x9C\x97";  // non-ASCII bytes survive
  Rollout c;
  c.sample_id = 3;
  c.prompt = {9};
  c.response = {8, 8, 8, 8, 8};
  c.step_map = {1, 2, 3, 4, 5};
  c.denoise_forwards = 5;
  c.commit_forwards = 1;
  return {a, b, c};
}

TEST(RolloutExchange, PackUnpackRoundTripsEveryField) {
  const auto rs = sample_rollouts();
  const auto packed = pack_rollouts(rs);
  EXPECT_EQ(unpack_rollouts(packed), rs);
  EXPECT_TRUE(unpack_rollouts(pack_rollouts({})).empty());
}

TEST(RolloutExchange, MalformedArraysAreErrors) {
  auto packed = pack_rollouts(sample_rollouts());
  auto truncated = packed;
  truncated.pop_back();
  EXPECT_THROW(unpack_rollouts(truncated), opdlm::Error);
  auto padded = packed;
  padded.push_back(0);
  EXPECT_THROW(unpack_rollouts(padded), opdlm::Error);
  auto negative = packed;
  negative[1 + 5] = -1;  // the first rollout's prompt length
  EXPECT_THROW(unpack_rollouts(negative), opdlm::Error);
  auto bad_status = packed;
  bad_status[1 + 1] = 99;
  EXPECT_THROW(unpack_rollouts(bad_status), opdlm::Error);
  auto bad_id = packed;
  bad_id[1] = -3;
  EXPECT_THROW(unpack_rollouts(bad_id), opdlm::Error);
  EXPECT_THROW(unpack_rollouts(std::vector<int64_t>{}), opdlm::Error);
}

}  // namespace
