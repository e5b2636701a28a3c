// Data-parallel rollouts: each DP rank decodes its share of a step's prompts, then every rank needs
// every rollout (to build the same training rows). all_gather_rollouts packs a rank's rollouts (ok
// or not, with the error text) into one int64 array, all-gathers them and returns all of them
// ordered by global sample id, identical on every rank.
#pragma once

#include <span>
#include <vector>

#include "opdlm/diffusion/sampler.hpp"
#include "opdlm/parallel/communicator.hpp"

namespace opdlm::diffusion {

// Every rank's rollouts, sorted by sample_id. A sample id present on two ranks is an Error.
std::vector<Rollout> all_gather_rollouts(std::span<const Rollout> local, parallel::Communicator& comm);

// The packing used on the wire (exposed for tests): a count, then per rollout its fields and arrays.
std::vector<int64_t> pack_rollouts(std::span<const Rollout> rs);
// The inverse; `source` names the data in errors (a malformed array).
std::vector<Rollout> unpack_rollouts(std::span<const int64_t> packed, const char* source = "packed rollouts");

}  // namespace opdlm::diffusion
