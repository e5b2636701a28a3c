// Internal: the device twin of tree_combine_into (tree_sum.hpp), used by NcclCommunicator's
// deterministic reduce-scatter and called directly by the GPU tests.
#pragma once

#include <cstddef>

#include "opdlm/parallel/communicator.hpp"

typedef struct CUstream_st* cudaStream_t;

namespace opdlm::parallel::cuda {

// out [len] <- the fixed pairwise tree over the n parts stored back to back at `parts` (part p at
// parts + p * len; device memory), padded with +0 parts to a power of two, left operand first: the
// same bits as tree_combine_into on the host. type f32 or f64; n >= 1; len == 0 is a no-op. `out`
// must not overlap `parts`. Enqueued on `stream`, no synchronisation.
void tree_combine_device(const void* parts, size_t n, size_t len, void* out, ElemType type, cudaStream_t stream);

}  // namespace opdlm::parallel::cuda
