// CPU embedding gather and its deterministic scatter-add backward.
#include "opdlm/ops/embedding.hpp"

#include <algorithm>
#include <cstring>

namespace opdlm::ops {
namespace {

// Validates every id before anything is written, so a bad id leaves outputs untouched.
void check_ids(const Tensor& ids, int64_t vocab, const char* table_name) {
  expect_cpu(ids, "ids");
  expect_dtype(ids, "ids", {DType::i32});
  expect_ndim(ids, "ids", 1);
  const int32_t* p = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    if (p[i] < 0 || p[i] >= vocab)
      OPDLM_FAIL("tensor 'ids' element ", i, " is ", p[i], ", outside the vocabulary [0, ", vocab, ") of '",
                 table_name, "'");
}

template <class T>
void gather(const Tensor& table, const int32_t* ids, int64_t n, Tensor& out) {
  const int64_t d = table.size(1);
  const T* tab = table.data<T>();
  T* o = out.data<T>();
#pragma omp parallel for schedule(static) if (n * d > (1 << 15))
  for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * d, tab + ids[i] * d, static_cast<size_t>(d) * sizeof(T));
}

template <class T>
void scatter_add(const int32_t* ids, int64_t n, const Tensor& dy, Tensor& dtable) {
  const int64_t d = dtable.size(1);
  const T* g = dy.data<T>();
  T* dt = dtable.data<T>();
  // Threads own disjoint column blocks and walk the tokens in order: no races, and each element's
  // sum has the same order whatever the thread count.
  constexpr int64_t kCols = 64;
  const int64_t nblk = (d + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * d > (1 << 15))
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kCols, c1 = std::min(d, c0 + kCols);
    for (int64_t i = 0; i < n; ++i) {
      const T* src = g + i * d;
      T* dst = dt + static_cast<int64_t>(ids[i]) * d;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace

Tensor embedding_forward(const Tensor& table, const Tensor& ids) {
  expect_float_cpu(table, "table");
  expect_ndim(table, "table", 2);
  check_ids(ids, table.size(0), "table");
  const int64_t n = ids.size(0);
  Tensor out = Tensor::empty({n, table.size(1)}, table.dtype());
  if (table.dtype() == DType::f32) gather<float>(table, ids.data<int32_t>(), n, out);
  else gather<double>(table, ids.data<int32_t>(), n, out);
  return out;
}

void embedding_backward(const Tensor& ids, const Tensor& dy, Tensor& dtable) {
  expect_float_cpu(dy, "dy");
  expect_ndim(dy, "dy", 2);
  expect_ndim(ids, "ids", 1);
  expect_dim(dy, "dy", 0, ids.size(0), "number of 'ids'");
  if (!dtable.defined())
    OPDLM_FAIL("embedding_backward: tensor 'dtable' is undefined; it must be [V, D] (its V is the vocabulary)");
  expect_float_cpu(dtable, "dtable");
  expect_ndim(dtable, "dtable", 2);
  expect_same_dtype(dtable, "dtable", dy, "dy");
  expect_dim(dy, "dy", 1, dtable.size(1), "embedding width of 'dtable'");
  check_ids(ids, dtable.size(0), "dtable");
  if (dy.dtype() == DType::f32) scatter_add<float>(ids.data<int32_t>(), ids.size(0), dy, dtable);
  else scatter_add<double>(ids.data<int32_t>(), ids.size(0), dy, dtable);
}

}  // namespace opdlm::ops
