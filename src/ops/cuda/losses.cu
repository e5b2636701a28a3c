// CUDA twins of the row log-sum-exp / log-softmax (ops/softmax.hpp), the softmax cross-entropy
// (ops/cross_entropy.hpp) and the OPD divergence family (ops/kl.hpp) on raw device pointers.
//
// Layout: one block of kThreads threads per row (rows loop over the grid), several passes over the
// row (max, sum of exp, terms), each thread striding over the row so loads coalesce.
// Numerics: exp / log1p run in f32 (expf, as detail::row_logsumexp's "exp in T"), every per-token
// term is formed and accumulated in double, and block reductions are a fixed shared-memory tree, so
// results are deterministic for a launch configuration (no float atomics). Row statistics are
// rounded to f32 before use, as the CPU rounds lse to the storage dtype.
// Top-K: a 4-pass radix select (8 bits a pass) on an order-preserving u32 key of the teacher value
// finds the K-th largest key and how many of its ties to keep; the tie cut (ties go to the lower
// token index) is the index of the last kept tie. Both go to the caller's scratch (16 B per row).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "cuda_common.cuh"

namespace opdlm::cuda {

namespace {

using namespace common;

constexpr int kThreads = 512;       // threads per row block; a power of two (the reduction tree halves it)
constexpr int64_t kMaxGrid = 1 << 20;  // more rows than this loop over the grid
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInfD = std::numeric_limits<double>::infinity();

// ---- host checks -------------------------------------------------------------------------------

void check_dtype(const char* fn, DType dt) {
  if (dt != DType::f32 && dt != DType::bf16)
    OPDLM_FAIL("cuda::", fn, ": dtype ", dtype_name(dt), " is not supported (expected f32 or bf16)");
}

void check_vocab(const char* fn, int64_t n, int64_t V) {
  if (n < 0) OPDLM_FAIL("cuda::", fn, ": row count ", n, " is negative");
  if (n > 0 && V < 1) OPDLM_FAIL("cuda::", fn, ": vocabulary ", V, " must be >= 1");
}

// Pointers a kernel dereferences must be set once there are rows (nullable outputs excepted).
void check_ptr(const char* fn, const void* p, const char* name) {
  if (!p) OPDLM_FAIL("cuda::", fn, ": '", name, "' is null");
}

int grid_rows(int64_t n) { return static_cast<int>(std::min<int64_t>(n, kMaxGrid)); }

template <class T>
const T* cast(const void* p) {
  return static_cast<const T*>(p);
}
template <class T>
T* cast(void* p) {
  return static_cast<T*>(p);
}

// ---- loads, stores, block reductions -------------------------------------------------------------

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
// One rounding per store: double -> f32, or double -> bf16 round-to-nearest-even directly.
__device__ __forceinline__ void store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, double v) { p[i] = __double2bfloat16(v); }

// Sum of one value per thread over the block in a fixed tree order; every thread gets the result.
// `sh` holds blockDim.x doubles; it is free again when this returns.
__device__ double block_sum(double v, double* sh) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) sh[t] += sh[t + s];
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

// Max over the block; NaN never wins (as std::max(mx, x) starting from -inf on the CPU).
__device__ float block_max(float v, double* sh) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s && sh[t + s] > sh[t]) sh[t] = sh[t + s];
    __syncthreads();
  }
  const float r = static_cast<float>(sh[0]);
  __syncthreads();
  return r;
}

// log sum exp of x[0, V) as detail::row_logsumexp: shifted by the row max, exp in f32, sum in
// double; an all -inf row gives -inf. Every thread of the block gets the same value.
template <class T>
__device__ double row_lse(const T* x, int64_t V, double* sh) {
  float mx = -kInfF;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float xv = load(x, v);
    if (xv > mx) mx = xv;
  }
  const float m = block_max(mx, sh);
  if (m == -kInfF) return -kInfD;  // uniform: every thread read the same m
  double s = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += static_cast<double>(expf(load(x, v) - m));
  s = block_sum(s, sh);
  return static_cast<double>(m) + log(s);
}

// ---- vectorised row access and the one-pass log-sum-exp ---------------------------------------------


// One rounding per element, exactly as store(): double -> f32, or double -> bf16 (RNE) directly.
__device__ __forceinline__ void st8(float* p, const double (&d)[kW]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(float(d[0]), float(d[1]), float(d[2]), float(d[3]));
  reinterpret_cast<float4*>(p)[1] = make_float4(float(d[4]), float(d[5]), float(d[6]), float(d[7]));
}
__device__ __forceinline__ void st8(__nv_bfloat16* p, const double (&d)[kW]) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = __bfloat16_as_ushort(__double2bfloat16(d[2 * j]));
    const uint32_t hi = __bfloat16_as_ushort(__double2bfloat16(d[2 * j + 1]));
    w[j] = lo | (hi << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Elements of x before its first 16-byte boundary (clamped to V): the scalar head of a row.
template <class T>
__device__ __forceinline__ int64_t head_elems(const T* x, int64_t V) {
  const int64_t h = int64_t((16u - (reinterpret_cast<uintptr_t>(x) & 15u)) & 15u) / int64_t(sizeof(T));
  return h < V ? h : V;
}

// Calls f(v, x[v]) for the elements of x[0, V) this thread owns: head elements one per thread, then
// 16-byte vectors strided over the block, then the tail one per thread. (A row pointer that is not a
// multiple of sizeof(T) would make the head wrong; rows of a T array never are.)
template <class T, class F>
__device__ __forceinline__ void for_row(const T* x, int64_t V, F&& f) {
  const int64_t h = head_elems(x, V);
  const int64_t nv = (V - h) / kW;
  const int64_t tail0 = h + nv * kW;
  if (threadIdx.x < h) f(int64_t(threadIdx.x), load(x, threadIdx.x));
  for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
    float e[kW];
    ld8(x + h + k * kW, e);
#pragma unroll
    for (int j = 0; j < kW; ++j) f(h + k * kW + j, e[j]);
  }
  const int64_t v = tail0 + threadIdx.x;
  if (v < V) f(v, load(x, v));
}

// row_lse in ONE read of the row: each thread keeps a running max m and sum s = sum exp(x - m) (exp in
// f32, sum in double; a new max rescales s in double), then the block takes the max M and adds
// s * exp(m - M) in the fixed tree. Same numerics as row_lse up to rounding order (each term is
// expf(x - m_thread) scaled, instead of expf(x - M)). Edge cases as the two-pass form: an all -inf row
// gives -inf, -inf entries add nothing, a NaN or +inf entry makes the result NaN.
template <class T>
__device__ double row_lse_1pass(const T* x, int64_t V, double* sh) {
  float m = -kInfF;
  double s = 0.0;
  for_row(x, V, [&](int64_t, float xv) {
    if (xv > m) {
      // expf(xv - xv) is 1, or NaN for xv = +inf (as the two-pass exp(inf - inf)).
      s = s * exp(static_cast<double>(m) - static_cast<double>(xv)) + static_cast<double>(expf(xv - xv));
      m = xv;
    } else if (xv != -kInfF) {  // -inf adds exp(-inf) = 0 (skipped); NaN propagates through expf
      s += static_cast<double>(expf(xv - m));
    }
  });
  const float M = block_max(m, sh);
  if (M == -kInfF) return -kInfD;  // uniform: every thread read the same M
  // m = -inf (no finite entry here): exp(-inf) = 0 scales s (0, or NaN from a NaN entry) to 0 / NaN.
  const double part = s * exp(static_cast<double>(m) - static_cast<double>(M));
  return static_cast<double>(M) + log(block_sum(part, sh));
}

// ---- log-sum-exp and log-softmax -------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kThreads) k_logsumexp(const T* x, float* lse, int64_t n, int64_t V) {
  __shared__ double sh[kThreads];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const double e = row_lse_1pass(x + row * V, V, sh);
    if (threadIdx.x == 0) lse[row] = static_cast<float>(e);
  }
}

// y = x - lse in double (lse unrounded, as the CPU). In place is safe: every read of the row ends
// at the reductions' barriers before the first write, and each thread then rewrites what it reads.
template <class T>
__global__ void __launch_bounds__(kThreads) k_log_softmax(const T* x, T* y, int64_t n, int64_t V) {
  __shared__ double sh[kThreads];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * V;
    T* yr = y + row * V;
    const double e = row_lse_1pass(xr, V, sh);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) store(yr, v, static_cast<double>(load(xr, v)) - e);
    __syncthreads();
  }
}

// ---- cross-entropy ---------------------------------------------------------------------------------

// loss = w * (lse - z[target]) with lse rounded to f32 first; lse is written for ignored rows too
// (as the CPU). A target outside [0, V) that is not ignore_index (the caller checks) gives NaN
// rather than an out-of-bounds read.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_ce_forward(const T* z, const int32_t* targets, const float* weight, float* loss, float* lse, int64_t n,
                 int64_t V, int32_t ignore_index) {
  __shared__ double sh[kThreads];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float e = static_cast<float>(row_lse_1pass(z + row * V, V, sh));
    if (threadIdx.x == 0) {
      if (lse) lse[row] = e;
      const int32_t t = targets[row];
      if (t == ignore_index) {
        loss[row] = 0.0f;
      } else if (t < 0 || t >= V) {
        loss[row] = __int_as_float(0x7fc00000);  // quiet NaN
      } else {
        const double w = weight ? static_cast<double>(weight[row]) : 1.0;
        loss[row] = static_cast<float>(w * (static_cast<double>(e) - static_cast<double>(load(z + row * V, t))));
      }
    }
  }
}

// dz = dloss * w * (exp(z - lse) - onehot); exp in f32 as the CPU's T = float path. One read of z and
// one write of dz per element, with 16-byte accesses when z and dz rows share their 16-byte phase.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_ce_backward(const T* z, const int32_t* targets, const float* weight, const float* lse, const float* dloss,
                  T* dz, int64_t n, int64_t V, int32_t ignore_index) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* zr = z + row * V;
    T* dr = dz + row * V;
    const int32_t t = targets[row];
    if (t == ignore_index) {
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) store(dr, v, 0.0);
      continue;
    }
    double c = static_cast<double>(dloss[row]) * (weight ? static_cast<double>(weight[row]) : 1.0);
    if (t < 0 || t >= V) c = __longlong_as_double(0x7ff8000000000000LL);  // NaN row, see k_ce_forward
    const float e = lse[row];
    const bool same_phase = ((reinterpret_cast<uintptr_t>(zr) ^ reinterpret_cast<uintptr_t>(dr)) & 15u) == 0;
    if (!same_phase) {
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const double p = static_cast<double>(expf(load(zr, v) - e));
        store(dr, v, c * (p - (v == t ? 1.0 : 0.0)));
      }
      continue;
    }
    const int64_t h = head_elems(zr, V);
    const int64_t nv = (V - h) / kW;
    if (threadIdx.x < h) {
      const int64_t v = threadIdx.x;
      store(dr, v, c * (static_cast<double>(expf(load(zr, v) - e)) - (v == t ? 1.0 : 0.0)));
    }
    for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
      const int64_t v0 = h + k * kW;
      float x[kW];
      double d[kW];
      ld8(zr + v0, x);
#pragma unroll
      for (int j = 0; j < kW; ++j)
        d[j] = c * (static_cast<double>(expf(x[j] - e)) - (v0 + j == t ? 1.0 : 0.0));
      st8(dr + v0, d);
    }
    const int64_t v = h + nv * kW + threadIdx.x;
    if (v < V) store(dr, v, c * (static_cast<double>(expf(load(zr, v) - e)) - (v == t ? 1.0 : 0.0)));
  }
}

// ---- the divergence family: per-token terms ----------------------------------------------------------

struct DivParams {
  ops::Divergence kind;
  double w;                       // mixture: reverse weight
  double alpha, log_a, log_1ma;   // jsd: alpha, log(alpha), log1p(-alpha)
};

// Per-row top-K cut in the caller's scratch: a token is kept when its key is above `key`, or equal
// to it with index <= `last` (the lower-index ties).
struct TopkCut {
  uint32_t key;
  uint32_t pad;
  int64_t last;
};
static_assert(sizeof(TopkCut) == 16, "TopkCut layout");

// Order-preserving key of a teacher value: larger value -> larger key. NaN counts as -inf and -0 as
// +0 (the CPU compares doubles, where -0 == +0 and NaN is mapped to -inf).
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN -> -inf
  if ((u & 0x7fffffffu) == 0u) u = 0u;                    // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The terms of kl.cpp with d(term)/d(student log-prob l) in dl; a = log t (may be -inf).
// t (log t - l); tokens the teacher excludes count 0.
__device__ __forceinline__ double fwd_term(float a, double l, double& dl) {
  if (a == -kInfF) {
    dl = 0.0;
    return 0.0;
  }
  const double t = static_cast<double>(expf(a));
  dl = -t;
  return t * (static_cast<double>(a) - l);
}

// u (l - log t) over the teacher's support; u = 0 (l = -inf) counts 0.
__device__ __forceinline__ double rev_term(float a, double l, double& dl) {
  if (a == -kInfF || l == -kInfD) {
    dl = 0.0;
    return 0.0;
  }
  const double u = static_cast<double>(expf(static_cast<float>(l)));
  const double ad = static_cast<double>(a);
  dl = u * (l - ad + 1.0);
  return u * (l - ad);
}

// log(exp(x) + exp(y)) with the max in double and only the bounded correction log1p(exp(-|x-y|))
// (in [0, log 2]) in f32.
__device__ __forceinline__ double logaddexp(double x, double y) {
  if (x == -kInfD) return y;
  if (y == -kInfD) return x;
  const float d = static_cast<float>(-fabs(x - y));
  return fmax(x, y) + static_cast<double>(log1pf(expf(d)));
}

// alpha t (log t - lm) + (1 - alpha) u (l - lm), lm = log(alpha t + (1 - alpha) u); dl = (1 - alpha) u (l - lm).
__device__ __forceinline__ double jsd_term(float a, double l, const DivParams& p, double& dl) {
  const double ad = static_cast<double>(a);
  const double lm = logaddexp(ad + p.log_a, l + p.log_1ma);
  double val = 0.0;
  dl = 0.0;
  if (a != -kInfF) val += p.alpha * static_cast<double>(expf(a)) * (ad - lm);
  if (l != -kInfD) {
    const double r = (1.0 - p.alpha) * static_cast<double>(expf(static_cast<float>(l))) * (l - lm);
    val += r;
    dl = r;
  }
  return val;
}

// One token's value and dl for `p.kind`; `keep` is the top-K membership (ignored by other kinds).
__device__ __forceinline__ double token_term(const DivParams& p, float a, double l, bool keep, double& dl) {
  switch (p.kind) {
    case ops::Divergence::forward_kl: return fwd_term(a, l, dl);
    case ops::Divergence::reverse_kl: return rev_term(a, l, dl);
    case ops::Divergence::mixture: {
      double df = 0.0, dr = 0.0;
      const double val = (1.0 - p.w) * fwd_term(a, l, df) + p.w * rev_term(a, l, dr);
      dl = (1.0 - p.w) * df + p.w * dr;
      return val;
    }
    case ops::Divergence::jsd: return jsd_term(a, l, p, dl);
    case ops::Divergence::topk_forward_kl:
      if (!keep) {
        dl = 0.0;
        return 0.0;
      }
      return fwd_term(a, l, dl);
  }
  dl = 0.0;
  return 0.0;
}

__device__ __forceinline__ bool topk_keeps(const TopkCut& c, uint32_t key, int64_t v) {
  return key > c.key || (key == c.key && v <= c.last);
}

// ---- top-K selection ---------------------------------------------------------------------------------

// Per row: the K-th largest key (radix select, most significant byte first) and the index of the
// last tie kept, so that exactly K tokens are kept and ties at the K-th value go to the lower index.
template <class T>
__global__ void __launch_bounds__(kThreads) k_topk_select(const T* teacher, int64_t n, int64_t V, int64_t K,
                                                          TopkCut* cuts) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned char flags[kThreads];
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ long long s_need, s_last;
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* a = teacher + row * V;
    if (tid == 0) {
      s_prefix = 0u;
      s_mask = 0u;
      s_need = K;  // tokens still to pick among the keys that match the prefix
      s_last = -1;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0u;
      __syncthreads();
      const uint32_t prefix = s_prefix, mask = s_mask;
      for (int64_t v = tid; v < V; v += blockDim.x) {
        const uint32_t k = order_key(load(a, v));
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);  // integer: order-free
      }
      __syncthreads();
      if (tid == 0) {
        // Walk the bins from the top; the one where the running count reaches s_need holds the
        // K-th key. Bin 0 is taken if nothing above suffices (the matching keys number >= s_need).
        const long long need = s_need;
        long long above = 0;
        int b = 255;
        for (; b > 0; --b) {
          if (above + static_cast<long long>(hist[b]) >= need) break;
          above += hist[b];
        }
        s_need = need - above;
        s_prefix = prefix | (static_cast<uint32_t>(b) << shift);
        s_mask = mask | (255u << shift);
      }
      __syncthreads();
    }
    // s_prefix is the K-th largest key; keep the first s_need tokens with exactly that key.
    const uint32_t kth = s_prefix;
    const long long need = s_need;
    long long seen = 0;  // ties in earlier chunks (the same in every thread)
    for (int64_t base = 0; base < V; base += blockDim.x) {
      const int64_t v = base + tid;
      const bool tie = v < V && order_key(load(a, v)) == kth;
      flags[tid] = tie ? 1 : 0;
      const int cnt = __syncthreads_count(tie);  // barrier: flags of this chunk are complete
      if (seen + cnt >= need) {                  // uniform over the block
        if (tid == 0) {
          long long r = seen;
          for (int j = 0; j < static_cast<int>(blockDim.x); ++j)
            if (flags[j] && ++r == need) {
              s_last = base + j;
              break;
            }
        }
        break;
      }
      seen += cnt;
    }
    __syncthreads();
    if (tid == 0) {
      TopkCut c;
      c.key = kth;
      c.pad = 0u;
      c.last = s_last;
      cuts[row] = c;
    }
    __syncthreads();  // the next row resets the shared state
  }
}

// ---- the divergence family: forward and backward -------------------------------------------------------

// D[row] = sum of the terms with l = s - lse, lse computed here and rounded to f32 first (the value
// the backward gets through student_lse).
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_div_forward(const T* teacher, const T* student, DivParams p, float* D, float* student_lse, int64_t n,
                  int64_t V, const TopkCut* cuts) {
  __shared__ double sh[kThreads];
  const bool topk = p.kind == ops::Divergence::topk_forward_kl;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* a = teacher + row * V;
    const T* s = student + row * V;
    const float ef = static_cast<float>(row_lse(s, V, sh));
    if (threadIdx.x == 0 && student_lse) student_lse[row] = ef;
    const double e = static_cast<double>(ef);
    TopkCut cut{};
    if (topk) cut = cuts[row];
    double acc = 0.0, dl = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float av = load(a, v);
      const bool keep = topk && topk_keeps(cut, order_key(av), v);
      acc += token_term(p, av, static_cast<double>(load(s, v)) - e, keep, dl);
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) D[row] = static_cast<float>(acc);
  }
}

// ds = dloss * (g - u * sum(g)), g = dD/dl per token, u = exp(s - lse): first pass sums g, the
// second recomputes g and writes.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_div_backward(const T* teacher, const T* student, const float* student_lse, const float* dloss, DivParams p,
                   T* ds, int64_t n, int64_t V, const TopkCut* cuts) {
  __shared__ double sh[kThreads];
  const bool topk = p.kind == ops::Divergence::topk_forward_kl;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* a = teacher + row * V;
    const T* s = student + row * V;
    T* d = ds + row * V;
    const float ef = student_lse[row];
    const double e = static_cast<double>(ef);
    const double c = static_cast<double>(dloss[row]);
    TopkCut cut{};
    if (topk) cut = cuts[row];
    double g = 0.0, dl = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float av = load(a, v);
      const bool keep = topk && topk_keeps(cut, order_key(av), v);
      token_term(p, av, static_cast<double>(load(s, v)) - e, keep, dl);
      g += dl;
    }
    const double G = block_sum(g, sh);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const float av = load(a, v);
      const float sv = load(s, v);
      const bool keep = topk && topk_keeps(cut, order_key(av), v);
      const double l = static_cast<double>(sv) - e;
      token_term(p, av, l, keep, dl);
      const double u = static_cast<double>(expf(static_cast<float>(l)));
      store(d, v, c * (dl - u * G));
    }
  }
}

// Validates the spec as kl.cpp's check_inputs and packs the kernel parameters.
DivParams make_params(const char* fn, const ops::DivergenceSpec& spec, int64_t n, int64_t V) {
  check_vocab(fn, n, V);
  DivParams p{};
  p.kind = spec.kind;
  switch (spec.kind) {
    case ops::Divergence::forward_kl:
    case ops::Divergence::reverse_kl: break;
    case ops::Divergence::mixture:
      if (!(spec.reverse_weight >= 0.0 && spec.reverse_weight <= 1.0))
        OPDLM_FAIL("cuda::", fn, ": 'reverse_weight' is ", spec.reverse_weight, ", must be in [0, 1]");
      p.w = spec.reverse_weight;
      break;
    case ops::Divergence::jsd:
      if (!(spec.jsd_alpha > 0.0 && spec.jsd_alpha < 1.0))
        OPDLM_FAIL("cuda::", fn, ": 'jsd_alpha' is ", spec.jsd_alpha, ", must be in (0, 1) (both ends excluded)");
      p.alpha = spec.jsd_alpha;
      p.log_a = std::log(spec.jsd_alpha);
      p.log_1ma = std::log1p(-spec.jsd_alpha);
      break;
    case ops::Divergence::topk_forward_kl:
      if (spec.topk < 1 || (n > 0 && spec.topk > V))
        OPDLM_FAIL("cuda::", fn, ": 'topk' is ", spec.topk, ", must be in [1, ", V, "] (the vocabulary)");
      break;
    default: OPDLM_FAIL("cuda::", fn, ": unknown divergence kind ", static_cast<int>(spec.kind));
  }
  return p;
}

// Fills the per-row top-K cuts in scratch (top-K only) and returns them; nullptr for other kinds.
const TopkCut* topk_cuts(const char* fn, const void* teacher, const ops::DivergenceSpec& spec, int64_t n, int64_t V,
                         void* scratch, DType dt, cudaStream_t stream) {
  if (spec.kind != ops::Divergence::topk_forward_kl) return nullptr;
  if (!scratch) OPDLM_FAIL("cuda::", fn, ": top-K needs scratch of divergence_scratch_bytes() = ", n * 16, " bytes");
  if (reinterpret_cast<uintptr_t>(scratch) % alignof(TopkCut) != 0)
    OPDLM_FAIL("cuda::", fn, ": scratch must be ", alignof(TopkCut), "-byte aligned");
  auto* cuts = static_cast<TopkCut*>(scratch);
  if (dt == DType::f32)
    k_topk_select<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(teacher), n, V, spec.topk, cuts);
  else
    k_topk_select<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(cast<__nv_bfloat16>(teacher), n, V,
                                                                        spec.topk, cuts);
  CUDA_CHECK(cudaGetLastError());
  return cuts;
}

}  // namespace

// ---- host wrappers -------------------------------------------------------------------------------------

void logsumexp_rows(const void* x, float* lse, int64_t n, int64_t V, DType dt, cudaStream_t stream) {
  check_dtype("logsumexp_rows", dt);
  check_vocab("logsumexp_rows", n, V);
  if (n == 0) return;
  check_ptr("logsumexp_rows", x, "x");
  check_ptr("logsumexp_rows", lse, "lse");
  if (dt == DType::f32) k_logsumexp<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(x), lse, n, V);
  else k_logsumexp<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(cast<__nv_bfloat16>(x), lse, n, V);
  CUDA_CHECK(cudaGetLastError());
}

void log_softmax_forward(const void* x, void* y, int64_t n, int64_t V, DType dt, cudaStream_t stream) {
  check_dtype("log_softmax_forward", dt);
  check_vocab("log_softmax_forward", n, V);
  if (n == 0) return;
  check_ptr("log_softmax_forward", x, "x");
  check_ptr("log_softmax_forward", y, "y");
  if (dt == DType::f32)
    k_log_softmax<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(x), cast<float>(y), n, V);
  else
    k_log_softmax<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(cast<__nv_bfloat16>(x),
                                                                        cast<__nv_bfloat16>(y), n, V);
  CUDA_CHECK(cudaGetLastError());
}

void cross_entropy_forward(const void* logits, const int32_t* targets, const float* weight, float* loss, float* lse,
                           int64_t n, int64_t V, int32_t ignore_index, DType dt, cudaStream_t stream) {
  check_dtype("cross_entropy_forward", dt);
  check_vocab("cross_entropy_forward", n, V);
  if (n == 0) return;
  check_ptr("cross_entropy_forward", logits, "logits");
  check_ptr("cross_entropy_forward", targets, "targets");
  check_ptr("cross_entropy_forward", loss, "loss");
  if (dt == DType::f32)
    k_ce_forward<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(logits), targets, weight, loss, lse, n,
                                                               V, ignore_index);
  else
    k_ce_forward<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(cast<__nv_bfloat16>(logits), targets, weight,
                                                                       loss, lse, n, V, ignore_index);
  CUDA_CHECK(cudaGetLastError());
}

void cross_entropy_backward(const void* logits, const int32_t* targets, const float* weight, const float* lse,
                            const float* dloss, void* dlogits, int64_t n, int64_t V, int32_t ignore_index, DType dt,
                            cudaStream_t stream) {
  check_dtype("cross_entropy_backward", dt);
  check_vocab("cross_entropy_backward", n, V);
  if (n == 0) return;
  check_ptr("cross_entropy_backward", logits, "logits");
  check_ptr("cross_entropy_backward", targets, "targets");
  check_ptr("cross_entropy_backward", lse, "lse");
  check_ptr("cross_entropy_backward", dloss, "dloss");
  check_ptr("cross_entropy_backward", dlogits, "dlogits");
  if (dt == DType::f32)
    k_ce_backward<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(logits), targets, weight, lse, dloss,
                                                                cast<float>(dlogits), n, V, ignore_index);
  else
    k_ce_backward<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(
        cast<__nv_bfloat16>(logits), targets, weight, lse, dloss, cast<__nv_bfloat16>(dlogits), n, V, ignore_index);
  CUDA_CHECK(cudaGetLastError());
}

size_t divergence_scratch_bytes(int64_t n, int64_t V, const ops::DivergenceSpec& spec) {
  (void)V;
  if (spec.kind != ops::Divergence::topk_forward_kl || n <= 0) return 0;
  return static_cast<size_t>(n) * sizeof(TopkCut);
}

void divergence_forward(const void* teacher_logp, const void* student_logits, const ops::DivergenceSpec& spec,
                        float* D, float* student_lse, int64_t n, int64_t V, void* scratch, DType dt,
                        cudaStream_t stream) {
  check_dtype("divergence_forward", dt);
  const DivParams p = make_params("divergence_forward", spec, n, V);
  if (n == 0) return;
  check_ptr("divergence_forward", teacher_logp, "teacher_logp");
  check_ptr("divergence_forward", student_logits, "student_logits");
  check_ptr("divergence_forward", D, "D");
  const TopkCut* cuts = topk_cuts("divergence_forward", teacher_logp, spec, n, V, scratch, dt, stream);
  if (dt == DType::f32)
    k_div_forward<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(teacher_logp),
                                                                cast<float>(student_logits), p, D, student_lse, n, V,
                                                                cuts);
  else
    k_div_forward<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(
        cast<__nv_bfloat16>(teacher_logp), cast<__nv_bfloat16>(student_logits), p, D, student_lse, n, V, cuts);
  CUDA_CHECK(cudaGetLastError());
}

void divergence_backward(const void* teacher_logp, const void* student_logits, const float* student_lse,
                         const float* dloss, const ops::DivergenceSpec& spec, void* dstudent, int64_t n, int64_t V,
                         void* scratch, DType dt, cudaStream_t stream) {
  check_dtype("divergence_backward", dt);
  const DivParams p = make_params("divergence_backward", spec, n, V);
  if (n == 0) return;
  check_ptr("divergence_backward", teacher_logp, "teacher_logp");
  check_ptr("divergence_backward", student_logits, "student_logits");
  check_ptr("divergence_backward", student_lse, "student_lse");
  check_ptr("divergence_backward", dloss, "dloss");
  check_ptr("divergence_backward", dstudent, "dstudent");
  const TopkCut* cuts = topk_cuts("divergence_backward", teacher_logp, spec, n, V, scratch, dt, stream);
  if (dt == DType::f32)
    k_div_backward<float><<<grid_rows(n), kThreads, 0, stream>>>(cast<float>(teacher_logp),
                                                                 cast<float>(student_logits), student_lse, dloss, p,
                                                                 cast<float>(dstudent), n, V, cuts);
  else
    k_div_backward<__nv_bfloat16><<<grid_rows(n), kThreads, 0, stream>>>(
        cast<__nv_bfloat16>(teacher_logp), cast<__nv_bfloat16>(student_logits), student_lse, dloss, p,
        cast<__nv_bfloat16>(dstudent), n, V, cuts);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace opdlm::cuda
