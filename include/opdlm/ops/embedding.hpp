// Token embedding on the CPU: forward gathers rows of the table, backward scatter-adds into the
// table gradient (deterministic, repeated ids add up).
#pragma once

#include "opdlm/tensor/tensor.hpp"

namespace opdlm::ops {

// Gradient convention (all of opdlm::ops): input gradients are overwritten, parameter gradients are
// ACCUMULATED (+=); an undefined output Tensor is allocated (zero-filled when accumulated).

// out [n, D] = table[ids]; table [V, D] f32/f64, ids i32 [n]. An id outside [0, V) is an Error naming
// 'ids', the index and the value.
Tensor embedding_forward(const Tensor& table, const Tensor& ids);
// dtable [V, D] += sum over i of dy[i] at row ids[i] (ACCUMULATED; dtable must be defined, since V
// cannot be inferred). Deterministic: each column is summed by one thread in token order, so the
// result does not depend on the thread count.
void embedding_backward(const Tensor& ids, const Tensor& dy, Tensor& dtable);

}  // namespace opdlm::ops
