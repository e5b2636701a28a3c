// The fixed pairwise tree over ranks on the GPU (tree_combine_into's order, bit for bit): one thread
// per element walks the n parts in index order through a binary-counter stack of partial sums.
#include "tree_combine.hpp"

#include <cuda_runtime.h>

#include <algorithm>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"

namespace opdlm::parallel::cuda {

namespace {

// Deep enough for 2^40 parts; the host checks n against it.
constexpr int kMaxLevels = 41;

// Leaves 0..w-1 (w = n rounded up to a power of two; leaves >= n are +0) pushed in order; whenever the
// two top entries have the same level they merge as (left + right). That is the same aligned binary
// tree as tree_combine_into, node by node, so each add sees the same operands in the same order.
template <class T>
__global__ void tree_combine_kernel(const T* __restrict__ parts, size_t n, size_t w, size_t len, T* __restrict__ out) {
  T value[kMaxLevels];
  int level[kMaxLevels];
  for (size_t k = size_t(blockIdx.x) * blockDim.x + threadIdx.x; k < len; k += size_t(gridDim.x) * blockDim.x) {
    int top = 0;  // entries on the stack
    for (size_t i = 0; i < w; ++i) {
      T v = i < n ? parts[i * len + k] : T(0);
      int lv = 0;
      while (top > 0 && level[top - 1] == lv) {
        v = value[top - 1] + v;  // left (earlier leaves) first
        --top;
        ++lv;
      }
      value[top] = v;
      level[top] = lv;
      ++top;
    }
    out[k] = value[0];  // w a power of two: exactly one entry, the root
  }
}

template <class T>
void launch(const void* parts, size_t n, size_t w, size_t len, void* out, cudaStream_t stream) {
  const int threads = 256;
  const size_t want = (len + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<size_t>(want, 65535));
  tree_combine_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(parts), n, w, len, static_cast<T*>(out));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void tree_combine_device(const void* parts, size_t n, size_t len, void* out, ElemType type, cudaStream_t stream) {
  OPDLM_CHECK(n >= 1, "tree_combine_device: no parts");
  OPDLM_CHECK(n <= (size_t(1) << (kMaxLevels - 1)), "tree_combine_device: ", n, " parts is too many");
  if (len == 0) return;
  size_t w = 1;
  while (w < n) w <<= 1;
  switch (type) {
    case ElemType::f32: return launch<float>(parts, n, w, len, out, stream);
    case ElemType::f64: return launch<double>(parts, n, w, len, out, stream);
    default: OPDLM_FAIL("tree_combine_device: element type ", int(type), " is not supported (f32 or f64)");
  }
}

}  // namespace opdlm::parallel::cuda
