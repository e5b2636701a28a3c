// The sampler's per-step work on the GPU (ops/sampling.hpp): temperature, top-k and top-p filters, a
// Gumbel-max draw from the same Philox counter RNG as the CPU (base/rng.hpp), and the confidence of
// the drawn token, for many rows of logits at once.
#pragma once

#include <cstdint>

#include "opdlm/base/rng.hpp"
#include "opdlm/ops/sampling.hpp"
#include "opdlm/tensor/tensor.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace opdlm::cuda {

// Plain-data RngKey for device memory.
struct DeviceRngKey {
  uint32_t seed = 0, purpose = 0, step = 0, sample_id = 0, position = 0;
};
DeviceRngKey to_device_key(const RngKey& k);

// For each row r of logits [rows, V] (dt: f32 or bf16; bf16 rows are widened to f32 first, as the
// CPU caller does): tokens[r] and confidence[r] as ops::sample_token(row, V, params, CounterRng(keys[r])).
// keys: device array [rows]. `scratch` holds at least sample_scratch_bytes(rows, V, params) bytes.
// params are validated on the host by the caller.
size_t sample_scratch_bytes(int64_t rows, int64_t V, const ops::SamplingParams& params);
void sample_tokens(const void* logits, int64_t rows, int64_t V, const ops::SamplingParams& params,
                   const DeviceRngKey* keys, int32_t* tokens, float* confidence, void* scratch, DType dt,
                   cudaStream_t stream);

}  // namespace opdlm::cuda
