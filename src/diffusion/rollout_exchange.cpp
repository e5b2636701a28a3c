// all_gather_rollouts: pack, all-gather (sizes first, then one padded array), unpack, sort by id.
#include "opdlm/diffusion/rollout_exchange.hpp"

#include <algorithm>

#include "opdlm/base/error.hpp"

namespace opdlm::diffusion {

std::vector<int64_t> pack_rollouts(std::span<const Rollout> rs) {
  std::vector<int64_t> out = {static_cast<int64_t>(rs.size())};
  for (const Rollout& r : rs) {
    out.insert(out.end(), {static_cast<int64_t>(r.sample_id), static_cast<int64_t>(r.status), r.stopped_at_eos ? 1 : 0,
                           r.denoise_forwards, r.commit_forwards, static_cast<int64_t>(r.prompt.size()),
                           static_cast<int64_t>(r.response.size()), static_cast<int64_t>(r.step_map.size()),
                           static_cast<int64_t>(r.error.size())});
    out.insert(out.end(), r.prompt.begin(), r.prompt.end());
    out.insert(out.end(), r.response.begin(), r.response.end());
    out.insert(out.end(), r.step_map.begin(), r.step_map.end());
    for (unsigned char c : r.error) out.push_back(c);
  }
  return out;
}

std::vector<Rollout> unpack_rollouts(std::span<const int64_t> p, const char* source) {
  size_t at = 0;
  auto take = [&](size_t n) {
    if (at + n > p.size()) OPDLM_FAIL(source, ": truncated at element ", at, " (needs ", n, " more of ", p.size(), ")");
    const size_t s = at;
    at += n;
    return p.subspan(s, n);
  };
  auto count = [&](int64_t v, const char* what) {
    if (v < 0) OPDLM_FAIL(source, ": negative ", what, " ", v);
    return static_cast<size_t>(v);
  };
  const size_t n = count(take(1)[0], "rollout count");
  std::vector<Rollout> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const auto h = take(9);
    Rollout r;
    if (h[0] < 0 || h[0] > int64_t{0xFFFFFFFF}) OPDLM_FAIL(source, ": sample id ", h[0], " out of range");
    r.sample_id = static_cast<uint32_t>(h[0]);
    if (h[1] < 0 || h[1] > static_cast<int64_t>(RolloutStatus::bad_token_id))
      OPDLM_FAIL(source, ": rollout status ", h[1], " out of range");
    r.status = static_cast<RolloutStatus>(h[1]);
    r.stopped_at_eos = h[2] != 0;
    r.denoise_forwards = h[3];
    r.commit_forwards = h[4];
    for (int64_t v : take(count(h[5], "prompt length"))) r.prompt.push_back(static_cast<int32_t>(v));
    for (int64_t v : take(count(h[6], "response length"))) r.response.push_back(static_cast<int32_t>(v));
    for (int64_t v : take(count(h[7], "step map length"))) r.step_map.push_back(static_cast<int32_t>(v));
    for (int64_t v : take(count(h[8], "error length"))) r.error.push_back(static_cast<char>(v));
    out.push_back(std::move(r));
  }
  if (at != p.size()) OPDLM_FAIL(source, ": ", p.size() - at, " trailing elements");
  return out;
}

std::vector<Rollout> all_gather_rollouts(std::span<const Rollout> local, parallel::Communicator& comm) {
  const std::vector<int64_t> mine = pack_rollouts(local);
  const size_t n = static_cast<size_t>(comm.size());
  std::vector<int64_t> len = {static_cast<int64_t>(mine.size())}, lens(n);
  comm.all_gather(std::span<const int64_t>(len), std::span<int64_t>(lens));
  const size_t width = static_cast<size_t>(*std::max_element(lens.begin(), lens.end()));
  std::vector<int64_t> padded(width, 0), all(width * n);
  std::copy(mine.begin(), mine.end(), padded.begin());
  comm.all_gather(std::span<const int64_t>(padded), std::span<int64_t>(all));
  std::vector<Rollout> out;
  for (size_t q = 0; q < n; ++q) {
    auto part = unpack_rollouts(std::span<const int64_t>(all).subspan(q * width, static_cast<size_t>(lens[q])),
                                "all_gather_rollouts");
    out.insert(out.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
  }
  std::stable_sort(out.begin(), out.end(), [](const Rollout& a, const Rollout& b) { return a.sample_id < b.sample_id; });
  for (size_t i = 1; i < out.size(); ++i)
    if (out[i].sample_id == out[i - 1].sample_id)
      OPDLM_FAIL("all_gather_rollouts: sample id ", out[i].sample_id, " was decoded on two ranks");
  return out;
}

}  // namespace opdlm::diffusion
