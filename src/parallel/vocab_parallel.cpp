// Vocab-parallel log-softmax, divergence family and cross-entropy over a TP group: local terms from
// the ops, global maxima by MPI max, global sums by the deterministic tree all-reduce.
#include "opdlm/parallel/vocab_parallel.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "opdlm/base/error.hpp"

namespace opdlm::parallel {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Per row over the whole vocabulary, in double: the maximum, z = sum exp(x - max) and, when asked,
// s = sum exp(x - max) (x - max). Rows of -inf logits keep max = -inf and z = s = 0.
struct RowSums {
  std::vector<double> max, z, s;
};

// Row sums over the whole vocabulary: partial(c0, c1, out) adds the terms of this rank's columns
// [c0, c1) into out (len values). Summed over TP by the tree all-reduce or, in the deterministic mode,
// taken per virtual shard and combined by virtual_shard_sum.
template <class F>
std::vector<double> vocab_sum(Communicator& tp, const VocabSlice& slice, int64_t V, size_t len, F&& partial) {
  std::vector<double> out(len, 0.0);
  if (!slice.pieces) {
    partial(int64_t{0}, V, out.data());
    tp.all_reduce_tree(std::span<double>(out));
    return out;
  }
  OPDLM_CHECK(slice.piece_cols > 0 && slice.pieces * slice.piece_cols >= V, "vocab-parallel: ", slice.pieces,
              " virtual shards of ", slice.piece_cols, " columns do not cover the ", V, " logit columns");
  std::vector<double> parts(len * size_t(slice.pieces), 0.0);
  for (int64_t j = 0; j < slice.pieces; ++j) {
    const int64_t c0 = j * slice.piece_cols, c1 = std::min(V, c0 + slice.piece_cols);
    if (c1 > c0) partial(c0, c1, parts.data() + size_t(j) * len);
  }
  virtual_shard_sum(tp, slice.pieces, std::span<const double>(parts), std::span<double>(out));
  return out;
}

template <class T>
RowSums row_sums_kernel(const Tensor& x, Communicator& tp, bool with_s, const VocabSlice& slice) {
  const int64_t n = x.size(0), V = x.size(1);
  const T* p = x.data<T>();
  RowSums out;
  out.max.assign(size_t(n), kNegInf);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v) out.max[size_t(i)] = std::max(out.max[size_t(i)], static_cast<double>(p[i * V + v]));
  tp.all_reduce(std::span<double>(out.max), ReduceOp::max);
  // Per row: z, s (one reduction for both).
  const std::vector<double> zs = vocab_sum(tp, slice, V, size_t(2 * n), [&](int64_t c0, int64_t c1, double* zs) {
    for (int64_t i = 0; i < n; ++i) {
      if (out.max[size_t(i)] == kNegInf) continue;
      for (int64_t v = c0; v < c1; ++v) {
        const double d = static_cast<double>(p[i * V + v]) - out.max[size_t(i)];
        const double e = std::exp(d);
        zs[size_t(2 * i)] += e;
        if (with_s) zs[size_t(2 * i + 1)] += e * d;
      }
    }
  });
  out.z.resize(size_t(n));
  out.s.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) out.z[size_t(i)] = zs[size_t(2 * i)], out.s[size_t(i)] = zs[size_t(2 * i + 1)];
  return out;
}

RowSums row_sums(const Tensor& logits, Communicator& tp, bool with_s, const VocabSlice& slice) {
  return logits.dtype() == DType::f32 ? row_sums_kernel<float>(logits, tp, with_s, slice)
                                      : row_sums_kernel<double>(logits, tp, with_s, slice);
}

// The row log-sum-exp rounded to the logits' dtype (as ops::divergence_forward stores it).
Tensor lse_tensor(const Tensor& logits, Communicator& tp, const VocabSlice& slice) {
  const std::vector<double> l = vp_logsumexp(logits, tp, slice);
  return Tensor::from_vector(l, {int64_t(l.size())}).to(logits.dtype());
}

void check_2d(const Tensor& t, const char* name) {
  expect_float_cpu(t, name);
  expect_ndim(t, name, 2);
}

// Top-K membership of this rank's columns: the K best (value desc, token id asc) of the whole row.
std::vector<uint8_t> topk_keep(const Tensor& teacher, int64_t K, Communicator& tp, VocabSlice slice) {
  const int64_t n = teacher.size(0), V = teacher.size(1);
  if (K < 1 || K > slice.total)
    OPDLM_FAIL("vp_divergence: 'topk' is ", K, ", must be in [1, ", slice.total, "] (the whole vocabulary)");
  std::vector<double> mine = ops::topk_candidates(teacher, K);  // (value, slice column)
  constexpr double kNone = 1e300;                                // sorts after every real token id
  for (size_t j = 0; j < mine.size(); j += 2) mine[j + 1] = mine[j + 1] < 0 ? kNone : mine[j + 1] + double(slice.begin);
  std::vector<double> all(mine.size() * size_t(tp.size()));
  tp.all_gather(std::span<const double>(mine), std::span<double>(all));
  std::vector<uint8_t> keep(size_t(n * V), 0);
  std::vector<std::pair<double, double>> row;
  for (int64_t i = 0; i < n; ++i) {
    row.clear();
    for (int r = 0; r < tp.size(); ++r)
      for (int64_t k = 0; k < K; ++k) {
        const double* c = all.data() + ((size_t(r) * size_t(n) + size_t(i)) * size_t(K) + size_t(k)) * 2;
        row.emplace_back(c[0], c[1]);
      }
    std::sort(row.begin(), row.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int64_t k = 0; k < K; ++k) {
      const double id = row[size_t(k)].second;
      if (id >= double(slice.begin) && id < double(slice.begin + V)) keep[size_t(i * V + int64_t(id) - slice.begin)] = 1;
    }
  }
  return keep;
}

// The keep mask's columns [c0, c1) (top-K), or null.
const std::vector<uint8_t>* keep_columns(const std::vector<uint8_t>& keep, int64_t n, int64_t V, int64_t c0, int64_t c1,
                                         std::vector<uint8_t>& buf) {
  if (keep.empty()) return nullptr;
  if (c0 == 0 && c1 == V) return &keep;
  buf.clear();
  for (int64_t i = 0; i < n; ++i) buf.insert(buf.end(), keep.begin() + i * V + c0, keep.begin() + i * V + c1);
  return &buf;
}

}  // namespace

std::vector<double> vp_logsumexp(const Tensor& logits, Communicator& tp, VocabSlice slice) {
  check_2d(logits, "logits");
  const RowSums r = row_sums(logits, tp, false, slice);
  std::vector<double> lse(r.max.size());
  for (size_t i = 0; i < lse.size(); ++i) lse[i] = r.max[i] == kNegInf ? kNegInf : r.max[i] + std::log(r.z[i]);
  return lse;
}

Tensor vp_log_softmax(const Tensor& logits, Communicator& tp, VocabSlice slice) {
  const std::vector<double> lse = vp_logsumexp(logits, tp, slice);
  const Tensor x = logits.to(DType::f64);
  Tensor y = Tensor::empty(x.shape(), DType::f64);
  const int64_t n = x.size(0), V = x.size(1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v) y.data<double>()[i * V + v] = x.data<double>()[i * V + v] - lse[size_t(i)];
  return y.to(logits.dtype());
}

Tensor vp_divergence_forward(const Tensor& teacher_logp, const Tensor& student_logits, const ops::DivergenceSpec& spec,
                             Tensor* student_lse, Communicator& tp, VocabSlice slice) {
  check_2d(student_logits, "student_logits");
  const int64_t n = student_logits.size(0), V = student_logits.size(1);
  const Tensor lse = lse_tensor(student_logits, tp, slice);
  std::vector<uint8_t> keep, buf;
  if (spec.kind == ops::Divergence::topk_forward_kl) keep = topk_keep(teacher_logp, spec.topk, tp, slice);
  const std::vector<double> D = vocab_sum(tp, slice, V, size_t(n), [&](int64_t c0, int64_t c1, double* out) {
    const bool whole = c0 == 0 && c1 == V;
    const Tensor d = ops::divergence_slice(whole ? teacher_logp : teacher_logp.columns(c0, c1),
                                          whole ? student_logits : student_logits.columns(c0, c1), lse, spec,
                                          keep_columns(keep, n, V, c0, c1, buf), nullptr);
    for (int64_t i = 0; i < n; ++i) out[i] += d.data<double>()[i];
  });
  if (student_lse) *student_lse = lse;
  return Tensor::from_vector(D, {n}).to(student_logits.dtype());
}

Tensor vp_divergence_backward(const Tensor& teacher_logp, const Tensor& student_logits, const Tensor& student_lse,
                              const Tensor& dloss, const ops::DivergenceSpec& spec, Communicator& tp, VocabSlice slice) {
  check_2d(student_logits, "student_logits");
  const int64_t n = student_logits.size(0), V = student_logits.size(1);
  expect_shape(dloss, "dloss", {n}, "rows of 'student_logits'");
  std::vector<uint8_t> keep;
  if (spec.kind == ops::Divergence::topk_forward_kl) keep = topk_keep(teacher_logp, spec.topk, tp, slice);
  Tensor g;
  ops::divergence_slice(teacher_logp, student_logits, student_lse, spec, &keep, &g);
  // dD/ds_j = g_j - u_j * sum over the whole vocabulary of g.
  const std::vector<double> G = vocab_sum(tp, slice, V, size_t(n), [&](int64_t c0, int64_t c1, double* out) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t v = c0; v < c1; ++v) out[i] += g.data<double>()[i * V + v];
  });
  const Tensor s = student_logits.to(DType::f64), e = student_lse.to(DType::f64), c = dloss.to(DType::f64);
  Tensor ds = Tensor::empty({n, V}, DType::f64);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v)
      ds.data<double>()[i * V + v] =
          c.data<double>()[i] * (g.data<double>()[i * V + v] -
                                 std::exp(s.data<double>()[i * V + v] - e.data<double>()[i]) * G[size_t(i)]);
  return ds.to(student_logits.dtype());
}

namespace {
// The column of target id t on this rank, or -1; throws for ids outside the vocabulary.
int64_t local_target(int32_t t, int64_t row, int64_t V, VocabSlice slice, int32_t ignore_index) {
  if (t == ignore_index) return -1;
  if (t < 0 || t >= slice.total)
    OPDLM_FAIL("tensor 'targets' element ", row, " is ", t, ", outside the vocabulary [0, ", slice.total, ")");
  const int64_t c = int64_t{t} - slice.begin;
  return c >= 0 && c < V ? c : -1;
}
}  // namespace

Tensor vp_cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& weight, Tensor* lse_out,
                                Communicator& tp, VocabSlice slice, int32_t ignore_index) {
  check_2d(logits, "logits");
  const int64_t n = logits.size(0), V = logits.size(1);
  expect_shape(targets, "targets", {n}, "rows of 'logits'");
  const Tensor lse = lse_tensor(logits, tp, slice);
  const Tensor x = logits.to(DType::f64);
  std::vector<double> pick(size_t(n), 0.0);  // the target's logit, from the rank that holds it
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = local_target(targets.data<int32_t>()[i], i, V, slice, ignore_index);
    if (c >= 0) pick[size_t(i)] = x.data<double>()[i * V + c];
  }
  tp.all_reduce_tree(std::span<double>(pick));
  Tensor loss = Tensor::zeros({n}, DType::f64);
  const Tensor w = weight.defined() ? weight.to(DType::f64) : Tensor();
  for (int64_t i = 0; i < n; ++i) {
    if (targets.data<int32_t>()[i] == ignore_index) continue;
    const double wi = w.defined() ? w.data<double>()[i] : 1.0;
    loss.data<double>()[i] = wi * (lse.item(i) - pick[size_t(i)]);
  }
  if (lse_out) *lse_out = lse;
  return loss.to(logits.dtype());
}

Tensor vp_cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& weight, const Tensor& lse,
                                 const Tensor& dloss, Communicator& tp, VocabSlice slice, int32_t ignore_index) {
  check_2d(logits, "logits");
  const int64_t n = logits.size(0), V = logits.size(1);
  const Tensor x = logits.to(DType::f64), w = weight.defined() ? weight.to(DType::f64) : Tensor();
  Tensor d = Tensor::zeros({n, V}, DType::f64);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = local_target(targets.data<int32_t>()[i], i, V, slice, ignore_index);
    if (targets.data<int32_t>()[i] == ignore_index) continue;
    const double k = dloss.item(i) * (w.defined() ? w.data<double>()[i] : 1.0);
    for (int64_t v = 0; v < V; ++v)
      d.data<double>()[i * V + v] = k * (std::exp(x.data<double>()[i * V + v] - lse.item(i)) - (v == c ? 1.0 : 0.0));
  }
  (void)tp;  // the backward is local: softmax and the one-hot live on the same columns
  return d.to(logits.dtype());
}

RowSoftmaxStats vp_row_stats(const Tensor& logits, Communicator& tp, bool with_entropy, VocabSlice slice) {
  expect_dtype(logits, "logits", {DType::f32});
  check_2d(logits, "logits");
  const RowSums r = row_sums(logits, tp, with_entropy, slice);
  RowSoftmaxStats st;
  st.max = r.max;
  st.log_z.resize(r.z.size());
  st.entropy.assign(r.z.size(), 0.0);
  for (size_t i = 0; i < r.z.size(); ++i) {
    st.log_z[i] = std::log(r.z[i]);
    if (with_entropy) st.entropy[i] = st.log_z[i] - r.s[i] / r.z[i];
  }
  return st;
}

std::vector<ops::TokenDraw> vp_sample_tokens(const Tensor& logits, const std::vector<CounterRng>& rngs,
                                             const ops::SamplingParams& p, Communicator& tp, VocabSlice slice) {
  expect_cpu(logits, "logits");
  expect_dtype(logits, "logits", {DType::f32});
  expect_ndim(logits, "logits", 2);
  p.validate();
  const int64_t n = logits.size(0), V = logits.size(1);
  OPDLM_CHECK(static_cast<int64_t>(rngs.size()) == n, "vp_sample_tokens: ", rngs.size(), " keys for ", n, " rows");
  if (p.top_p < 1.0)
    OPDLM_FAIL_AT("", "sampling.top_p", "top_p < 1 is not supported on vocab-parallel logits yet (tensor parallel)");
  constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
  const float* x = logits.data<float>();
  std::vector<float> out(size_t(n * V));
  if (p.temperature == 0) {  // greedy: the global maximum (ties kept, drawn by the noise)
    std::vector<double> mx(size_t(n), kNegInf);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t v = 0; v < V; ++v) mx[size_t(i)] = std::max(mx[size_t(i)], double(x[i * V + v]));
    tp.all_reduce(std::span<double>(mx), ReduceOp::max);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t v = 0; v < V; ++v) out[size_t(i * V + v)] = double(x[i * V + v]) == mx[size_t(i)] ? 0.0f : kNegInfF;
  } else {
    const float inv_t = static_cast<float>(1.0 / p.temperature);
    for (int64_t i = 0; i < n * V; ++i) out[size_t(i)] = x[i] * inv_t;
    if (p.top_k > 0 && p.top_k < slice.total) {
      // The k-th largest scaled logit of the whole row from every rank's k best.
      const int64_t k = p.top_k;
      std::vector<double> mine(size_t(n * k), kNegInf), all(size_t(n * k) * size_t(tp.size()));
      std::vector<float> row;
      for (int64_t i = 0; i < n; ++i) {
        row.assign(out.begin() + i * V, out.begin() + (i + 1) * V);
        const int64_t m = std::min<int64_t>(k, V);
        std::partial_sort(row.begin(), row.begin() + m, row.end(), std::greater<float>());
        for (int64_t j = 0; j < m; ++j) mine[size_t(i * k + j)] = row[size_t(j)];
      }
      tp.all_gather(std::span<const double>(mine), std::span<double>(all));
      std::vector<double> cand;
      for (int64_t i = 0; i < n; ++i) {
        cand.clear();
        for (int r = 0; r < tp.size(); ++r)
          for (int64_t j = 0; j < k; ++j) cand.push_back(all[(size_t(r) * size_t(n) + size_t(i)) * size_t(k) + size_t(j)]);
        std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<double>());
        const double kth = cand[size_t(k - 1)];
        for (int64_t v = 0; v < V; ++v)
          if (double(out[size_t(i * V + v)]) < kth) out[size_t(i * V + v)] = kNegInfF;
      }
    }
  }
  // Gumbel-max: each rank's winner (score, token id, its confidence), then the best over ranks.
  const std::vector<double> lse = vp_logsumexp(logits, tp, slice);
  std::vector<double> mine(size_t(n) * 3), all(size_t(n) * 3 * size_t(tp.size()));
  for (int64_t i = 0; i < n; ++i) {
    double score = kNegInf;
    const int64_t v = categorical_gumbel(rngs[size_t(i)], out.data() + i * V, V, static_cast<uint32_t>(slice.begin), &score);
    mine[size_t(3 * i)] = v < 0 ? kNegInf : score;
    mine[size_t(3 * i + 1)] = v < 0 ? 1e300 : double(slice.begin + v);
    mine[size_t(3 * i + 2)] = v < 0 ? 0.0 : std::exp(double(x[i * V + v]) - lse[size_t(i)]);
  }
  tp.all_gather(std::span<const double>(mine), std::span<double>(all));
  std::vector<ops::TokenDraw> draws(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double* best = nullptr;
    for (int r = 0; r < tp.size(); ++r) {
      const double* c = all.data() + (size_t(r) * size_t(n) + size_t(i)) * 3;
      if (!best || c[0] > best[0] || (c[0] == best[0] && c[1] < best[1])) best = c;
    }
    OPDLM_CHECK(best[1] < 1e300, "every logit was filtered out");
    draws[size_t(i)].token = static_cast<int32_t>(best[1]);
    draws[size_t(i)].confidence = static_cast<float>(best[2]);
  }
  return draws;
}

}  // namespace opdlm::parallel
