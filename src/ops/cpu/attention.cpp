// CPU attention (GQA, mask descriptors): forward and backward side by side. Every kernel walks only
// the allowed key ranges of each query row, so masked work is skipped rather than computed and zeroed.
#include "opdlm/ops/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace opdlm::ops {
namespace {

constexpr int64_t kQTile = 16;  // query rows per forward / dq task
constexpr int64_t kKTile = 32;  // keys per dk/dv task

struct Dims {
  int64_t B, Tq, Tk, Hq, Hkv, D, G;
  // Tiny problems (tests, finite differences) run serially: waking a thread team costs more than
  // the work and, on a busy machine, spinning threads slow every call down.
  bool parallel() const { return B * Hq * Tq * Tk * D >= (int64_t(1) << 16); }
};

// The checks shared by forward and backward; errors name the tensor (or descriptor) and dimension.
Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                  std::span<const MaskDescriptor> masks, double scale) {
  expect_float_cpu(q, "q");
  expect_float_cpu(k, "k");
  expect_float_cpu(v, "v");
  expect_ndim(q, "q", 4);
  expect_ndim(k, "k", 4);
  expect_ndim(v, "v", 4);
  expect_same_dtype(q, "q", k, "k");
  expect_same_dtype(q, "q", v, "v");
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 1};
  expect_dim(k, "k", 0, d.B, "batch size of 'q'");
  expect_dim(k, "k", 3, d.D, "head dim of 'q'");
  expect_shape(v, "v", k.shape(), "must match 'k'");
  if (d.Hkv < 1) OPDLM_FAIL("tensor 'k' ", k.describe(), " dimension 2 (kv heads) is ", d.Hkv, ", expected >= 1");
  if (d.Hq % d.Hkv != 0)
    OPDLM_FAIL("tensor 'q' ", q.describe(), " dimension 2 (query heads) is ", d.Hq,
               ", not a multiple of dimension 2 of 'k' (kv heads) ", d.Hkv);
  d.G = d.Hq / d.Hkv;
  if (masks.size() != 1 && static_cast<int64_t>(masks.size()) != d.B)
    OPDLM_FAIL("masks: got ", masks.size(), " descriptors, expected 1 or ", d.B,
               " (dimension 0 of 'q', the batch size)");
  for (size_t i = 0; i < masks.size(); ++i) masks[i].validate(d.Tq, d.Tk, "masks[" + std::to_string(i) + "]");
  if (!std::isfinite(scale)) OPDLM_FAIL("attention scale is ", scale, ", expected a finite number");
  return d;
}

template <class T>
inline T dotp(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Accumulation happens in T itself: double for f64, float for f32 (max-subtracted softmax).
template <class T>
void forward_kernel(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q,
                    const T* K, const T* V, T* O, T* LSE) {
  const int64_t D = d.D, ks = d.Hkv * D;  // ks: stride between consecutive keys of one head
  const int64_t n_tiles = (d.Tq + kQTile - 1) / kQTile;
  const int64_t n_tasks = d.B * d.Hq * n_tiles;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> sc(static_cast<size_t>(d.Tk)), acc(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      const int64_t tile = task % n_tiles, h = (task / n_tiles) % d.Hq, b = task / (n_tiles * d.Hq);
      const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
      const T* Kb = K + (b * d.Tk * d.Hkv + h / d.G) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + h / d.G) * D;
      for (int64_t i = tile * kQTile; i < std::min(d.Tq, (tile + 1) * kQTile); ++i) {
        const int64_t row = (b * d.Tq + i) * d.Hq + h;
        const T* qp = Q + row * D;
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        T mx = -std::numeric_limits<T>::infinity();
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            sc[j] = dotp(qp, Kb + j * ks, D) * scale;
            mx = std::max(mx, sc[j]);
          }
        std::fill(acc.begin(), acc.end(), T(0));
        T sum = 0;
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            const T p = std::exp(sc[j] - mx);
            sum += p;
            axpy(acc.data(), p, Vb + j * ks, D);
          }
        // Every row has >= 1 key and its max term is exp(0) = 1, so sum >= 1.
        const T inv = T(1) / sum;
        T* op = O + row * D;
        for (int64_t e = 0; e < D; ++e) op[e] = acc[e] * inv;
        LSE[(b * d.Hq + h) * d.Tq + i] = mx + std::log(sum);
      }
    }
  }
}

// With p = exp(scale q.k - lse), dp = dout.v, delta = dout.o (= sum_k p dp), ds = p (dp - delta):
//   dq = scale sum_k ds k,  dk = scale sum_q ds q,  dv = sum_q p dout.
// Pass A owns dq rows (tasks over query tiles); pass B owns dk/dv rows (tasks over key tiles of one
// kv head, visiting the G query heads of its group), so no two threads write the same element.
template <class T>
void backward_kernel(const Dims& d, std::span<const MaskDescriptor> masks, T scale, const T* Q,
                     const T* K, const T* V, const T* O, const T* LSE, const T* dO, T* dQ, T* dK,
                     T* dV) {
  const int64_t D = d.D, ks = d.Hkv * D;
  std::vector<T> delta(static_cast<size_t>(d.B * d.Hq * d.Tq));

  const int64_t n_qt = (d.Tq + kQTile - 1) / kQTile;
  const int64_t n_a = d.B * d.Hq * n_qt;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> acc(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_a; ++task) {
      const int64_t tile = task % n_qt, h = (task / n_qt) % d.Hq, b = task / (n_qt * d.Hq);
      const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
      const T* Kb = K + (b * d.Tk * d.Hkv + h / d.G) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + h / d.G) * D;
      for (int64_t i = tile * kQTile; i < std::min(d.Tq, (tile + 1) * kQTile); ++i) {
        const int64_t row = (b * d.Tq + i) * d.Hq + h, lrow = (b * d.Hq + h) * d.Tq + i;
        const T* qp = Q + row * D;
        const T* dop = dO + row * D;
        const T dl = dotp(dop, O + row * D, D);
        delta[lrow] = dl;
        const T l = LSE[lrow];
        std::fill(acc.begin(), acc.end(), T(0));
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        for (int ri = 0; ri < nr; ++ri)
          for (int64_t j = r[ri].begin; j < r[ri].end; ++j) {
            const T p = std::exp(dotp(qp, Kb + j * ks, D) * scale - l);
            const T ds = p * (dotp(dop, Vb + j * ks, D) - dl);
            axpy(acc.data(), ds, Kb + j * ks, D);
          }
        T* g = dQ + row * D;
        for (int64_t e = 0; e < D; ++e) g[e] = acc[e] * scale;
      }
    }
  }

  const int64_t n_kt = (d.Tk + kKTile - 1) / kKTile;
  const int64_t n_b = d.B * d.Hkv * n_kt;
#pragma omp parallel if (d.parallel())
  {
    std::vector<T> acc_k(static_cast<size_t>(kKTile * D)), acc_v(static_cast<size_t>(kKTile * D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_b; ++task) {
      const int64_t tile = task % n_kt, hk = (task / n_kt) % d.Hkv, b = task / (n_kt * d.Hkv);
      const int64_t k0 = tile * kKTile, k1 = std::min(d.Tk, k0 + kKTile);
      const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : b];
      const T* Kb = K + (b * d.Tk * d.Hkv + hk) * D;
      const T* Vb = V + (b * d.Tk * d.Hkv + hk) * D;
      std::fill(acc_k.begin(), acc_k.end(), T(0));
      std::fill(acc_v.begin(), acc_v.end(), T(0));
      for (int64_t i = 0; i < d.Tq; ++i) {
        KeyRange r[2];
        const int nr = m.ranges(i, d.Tk, r);
        for (int ri = 0; ri < nr; ++ri) {
          const int64_t lo = std::max(r[ri].begin, k0), hi = std::min(r[ri].end, k1);
          if (lo >= hi) continue;
          for (int64_t h = hk * d.G; h < (hk + 1) * d.G; ++h) {
            const int64_t row = (b * d.Tq + i) * d.Hq + h, lrow = (b * d.Hq + h) * d.Tq + i;
            const T* qp = Q + row * D;
            const T* dop = dO + row * D;
            const T l = LSE[lrow], dl = delta[lrow];
            for (int64_t j = lo; j < hi; ++j) {
              const T p = std::exp(dotp(qp, Kb + j * ks, D) * scale - l);
              const T ds = p * (dotp(dop, Vb + j * ks, D) - dl);
              axpy(acc_v.data() + (j - k0) * D, p, dop, D);
              axpy(acc_k.data() + (j - k0) * D, ds, qp, D);
            }
          }
        }
      }
      for (int64_t j = k0; j < k1; ++j) {
        T* gk = dK + ((b * d.Tk + j) * d.Hkv + hk) * D;
        T* gv = dV + ((b * d.Tk + j) * d.Hkv + hk) * D;
        for (int64_t e = 0; e < D; ++e) {
          gk[e] = acc_k[(j - k0) * D + e] * scale;
          gv[e] = acc_v[(j - k0) * D + e];
        }
      }
    }
  }
}

}  // namespace

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                         std::span<const MaskDescriptor> masks, double scale, Tensor* lse) {
  const Dims d = check_inputs(q, k, v, masks, scale);
  Tensor o = Tensor::empty({d.B, d.Tq, d.Hq, d.D}, q.dtype());
  Tensor lse_local;
  Tensor& l = lse ? *lse : lse_local;
  prepare_output(l, "lse", {d.B, d.Hq, d.Tq}, q.dtype());
  if (q.dtype() == DType::f64)
    forward_kernel<double>(d, masks, scale, q.data<double>(), k.data<double>(), v.data<double>(),
                           o.data<double>(), l.data<double>());
  else
    forward_kernel<float>(d, masks, static_cast<float>(scale), q.data<float>(), k.data<float>(),
                          v.data<float>(), o.data<float>(), l.data<float>());
  return o;
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                        const Tensor& lse, const Tensor& dout, std::span<const MaskDescriptor> masks,
                        double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Dims d = check_inputs(q, k, v, masks, scale);
  const Shape qshape{d.B, d.Tq, d.Hq, d.D};
  for (auto [t, name] : {std::pair{&o, "o"}, std::pair{&dout, "dout"}}) {
    expect_float_cpu(*t, name);
    expect_same_dtype(q, "q", *t, name);
    expect_shape(*t, name, qshape, "shape of 'q'");
  }
  expect_float_cpu(lse, "lse");
  expect_same_dtype(q, "q", lse, "lse");
  expect_shape(lse, "lse", {d.B, d.Hq, d.Tq}, "[batch, query heads, Tq] of 'q'");
  prepare_output(dq, "dq", qshape, q.dtype());
  prepare_output(dk, "dk", k.shape(), q.dtype());
  prepare_output(dv, "dv", k.shape(), q.dtype());
  if (q.dtype() == DType::f64)
    backward_kernel<double>(d, masks, scale, q.data<double>(), k.data<double>(), v.data<double>(),
                            o.data<double>(), lse.data<double>(), dout.data<double>(),
                            dq.data<double>(), dk.data<double>(), dv.data<double>());
  else
    backward_kernel<float>(d, masks, static_cast<float>(scale), q.data<float>(), k.data<float>(),
                           v.data<float>(), o.data<float>(), lse.data<float>(), dout.data<float>(),
                           dq.data<float>(), dk.data<float>(), dv.data<float>());
}

}  // namespace opdlm::ops
