// The canonical pairwise-tree sum that makes data-parallel gradients bitwise independent of the DP
// layout: W leaves (per-row gradients of one update), padded to a power of two with +0 vectors;
// every internal node = left + right (IEEE float adds, left operand first). Any split of the leaves
// into aligned power-of-two blocks (DP ranks) whose block sums are combined by the same tree gives
// the same bits as one process summing all leaves: each node is computed the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace opdlm::parallel {

// The smallest power of two >= n (n >= 1).
int64_t tree_width(int64_t n);

// Streams leaves in increasing index order through a stack of at most log2(width) + 1 partial sums
// (a binary counter), so per-row gradients need no buffer each. Missing indices are +0 leaves.
class TreeSum {
 public:
  // `len` floats per leaf; leaves are indexed [0, width), width a power of two.
  TreeSum(size_t len, int64_t width);
  // Adds leaf `index` (> every earlier index, < width).
  void add(int64_t index, std::span<const float> leaf);
  // The root: the canonical sum of every leaf (+0 when none was added). Ends the accumulation.
  std::vector<float> finish();
  // The same root written into out (len floats); the TreeSum is then empty and ready for the next
  // sum, keeping its buffers (a training loop reuses one TreeSum: no model-sized allocation per row).
  void finish_into(std::span<float> out);
  size_t peak_buffers() const { return peak_; }  // partial sums held at once, for the memory check

 private:
  struct Node {
    int64_t start;
    int level;
    std::vector<float> value;
  };
  void settle(int64_t next);  // grows and merges the stack knowing no leaf below `next` will come
  std::vector<float> take();  // a len-float buffer from the pool (contents undefined)
  size_t len_;
  int64_t width_;
  int64_t last_ = -1;
  std::vector<Node> stack_;
  std::vector<std::vector<float>> pool_;  // buffers of merged nodes, reused
  size_t peak_ = 0;
};

// The reference: the same tree by recursion over dense leaves (+0 for absent), for tests.
std::vector<float> tree_sum_reference(const std::vector<std::vector<float>>& leaves, const std::vector<bool>& present,
                                      size_t len, int64_t width);

// Combines `parts` (each the TreeSum of an aligned block of width / parts.size() leaves, in block
// order) with the top levels of the same tree: the root of the whole tree. parts.size() must be a
// power of two.
std::vector<float> tree_combine(const std::vector<std::span<const float>>& parts);

// The same pairwise tree over n parts stored back to back (part p at parts + p * len), padded with
// +0 parts to a power of two; writes the root to out. Used by the deterministic reduce-scatter.
template <class T>
void tree_combine_into(const T* parts, size_t n, size_t len, T* out) {
  size_t w = 1;
  while (w < n) w <<= 1;
  std::vector<T> level(w * len, T(0));
  for (size_t i = 0; i < n * len; ++i) level[i] = parts[i];
  for (; w > 1; w /= 2)
    for (size_t i = 0; i < w / 2; ++i)
      for (size_t k = 0; k < len; ++k) level[i * len + k] = level[2 * i * len + k] + level[(2 * i + 1) * len + k];
  for (size_t k = 0; k < len; ++k) out[k] = level[k];
}

}  // namespace opdlm::parallel
