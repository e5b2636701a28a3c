// TreeSum: the canonical pairwise-tree sum of per-row gradients, streamed through a binary counter.
#include "opdlm/parallel/tree_sum.hpp"

#include <algorithm>

#include "opdlm/base/error.hpp"

namespace opdlm::parallel {

int64_t tree_width(int64_t n) {
  OPDLM_CHECK(n >= 1, "tree_width of ", n);
  int64_t w = 1;
  while (w < n) w <<= 1;
  return w;
}

TreeSum::TreeSum(size_t len, int64_t width) : len_(len), width_(width) {
  OPDLM_CHECK(width >= 1 && (width & (width - 1)) == 0, "TreeSum width ", width, " is not a power of two");
}

void TreeSum::add(int64_t index, std::span<const float> leaf) {
  OPDLM_CHECK(index > last_ && index < width_, "TreeSum leaf ", index, " after ", last_, " (width ", width_, ")");
  OPDLM_CHECK(leaf.size() == len_, "TreeSum leaf of ", leaf.size(), " floats, expected ", len_);
  settle(index);
  std::vector<float> buf = take();
  std::copy(leaf.begin(), leaf.end(), buf.begin());
  stack_.push_back({index, 0, std::move(buf)});
  last_ = index;
  peak_ = std::max(peak_, stack_.size());
  settle(index + 1);
}

// A node whose sibling holds no leaf is added to a +0 sibling (x + 0 turns -0 into +0, so the bits
// are those of the dense tree); a node whose sibling is complete on the stack merges with it.
void TreeSum::settle(int64_t next) {
  while (!stack_.empty()) {
    Node& t = stack_.back();
    const int64_t size = int64_t{1} << t.level;
    if (size == width_) return;  // the root
    if ((t.start / size) % 2 == 0) {  // a left child: its right sibling is [start + size, start + 2 size)
      if (next < t.start + 2 * size) return;  // leaves may still come into the sibling
      for (float& x : t.value) x = x + 0.0f;
      ++t.level;
      continue;
    }
    // A right child: its left sibling [start - size, start) is the node below, or held no leaf.
    if (stack_.size() >= 2) {
      Node& b = stack_[stack_.size() - 2];
      if (b.start == t.start - size && b.level == t.level) {
        for (size_t i = 0; i < len_; ++i) b.value[i] = b.value[i] + t.value[i];
        ++b.level;
        pool_.push_back(std::move(t.value));
        stack_.pop_back();
        continue;
      }
      OPDLM_CHECK(b.start + (int64_t{1} << b.level) <= t.start - size, "TreeSum: a partial left sibling");
    }
    for (float& x : t.value) x = 0.0f + x;
    t.start -= size;
    ++t.level;
  }
}

std::vector<float> TreeSum::take() {
  if (pool_.empty()) return std::vector<float>(len_);
  std::vector<float> b = std::move(pool_.back());
  pool_.pop_back();
  return b;
}

void TreeSum::finish_into(std::span<float> out) {
  OPDLM_CHECK(out.size() == len_, "TreeSum::finish_into: ", out.size(), " floats, expected ", len_);
  settle(width_);
  if (stack_.empty()) {
    std::fill(out.begin(), out.end(), 0.0f);
  } else {
    OPDLM_CHECK(stack_.size() == 1 && (int64_t{1} << stack_[0].level) == width_, "TreeSum: unfinished tree");
    std::copy(stack_[0].value.begin(), stack_[0].value.end(), out.begin());
    pool_.push_back(std::move(stack_[0].value));
    stack_.clear();
  }
  last_ = -1;
}

std::vector<float> TreeSum::finish() {
  std::vector<float> out(len_);
  finish_into(out);
  return out;
}

namespace {
std::vector<float> ref_node(const std::vector<std::vector<float>>& leaves, const std::vector<bool>& present, size_t len,
                            int64_t lo, int64_t hi) {
  if (hi - lo == 1) {
    if (lo < static_cast<int64_t>(present.size()) && present[size_t(lo)]) return leaves[size_t(lo)];
    return std::vector<float>(len, 0.0f);
  }
  const int64_t mid = (lo + hi) / 2;
  std::vector<float> a = ref_node(leaves, present, len, lo, mid);
  const std::vector<float> b = ref_node(leaves, present, len, mid, hi);
  for (size_t i = 0; i < len; ++i) a[i] = a[i] + b[i];
  return a;
}
}  // namespace

std::vector<float> tree_sum_reference(const std::vector<std::vector<float>>& leaves, const std::vector<bool>& present,
                                      size_t len, int64_t width) {
  OPDLM_CHECK(width >= 1 && (width & (width - 1)) == 0, "width ", width, " is not a power of two");
  return ref_node(leaves, present, len, 0, width);
}

std::vector<float> tree_combine(const std::vector<std::span<const float>>& parts) {
  OPDLM_CHECK(!parts.empty() && (parts.size() & (parts.size() - 1)) == 0, "tree_combine of ", parts.size(), " parts");
  const size_t len = parts[0].size();
  std::vector<float> flat;
  flat.reserve(parts.size() * len);
  for (const auto& p : parts) {
    OPDLM_CHECK(p.size() == len, "tree_combine: parts of ", p.size(), " and ", len, " floats");
    flat.insert(flat.end(), p.begin(), p.end());
  }
  std::vector<float> out(len);
  tree_combine_into(flat.data(), parts.size(), len, out.data());
  return out;
}

}  // namespace opdlm::parallel
