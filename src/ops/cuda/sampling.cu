// CUDA twin of the sampler's per-row work (src/ops/cpu/sampling.cpp): temperature, top-k and top-p
// filters, a Gumbel-max draw from the same Philox4x32-10 stream as the CPU (src/base/rng.cpp), and the
// confidence of the drawn token. One block per row; every filter is found by passes over the row
// (radix selects on the float's ordered bits, a bisection on kept mass), so no scratch memory is used
// and every reduction has a fixed order (no float atomics): the same launch gives the same result.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/ops/cuda/sampling_cuda.hpp"

namespace opdlm::cuda {

namespace {

constexpr int kThreads = 512;  // threads per row (block); the reductions below assume exactly this

// ---- Philox4x32-10 (device twin of philox4x32_10 and CounterRng in src/base/rng.cpp) ----------------
// Word i of a key's stream is word (i % 4) of the block with counter (i / 4, position, sample_id, step)
// and key (seed, purpose).
__device__ inline void philox_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                    uint32_t out[4]) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(p1);
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// The block holding stream words 4q .. 4q+3.
__device__ inline void stream_block(const DeviceRngKey& k, uint32_t q, uint32_t out[4]) {
  philox_block(q, k.position, k.sample_id, k.step, k.seed, k.purpose, out);
}

__device__ inline uint32_t stream_word(const DeviceRngKey& k, uint32_t i) {
  uint32_t w[4];
  stream_block(k, i >> 2, w);
  return w[i & 3u];
}

// CounterRng::gumbel from its two words (2i, 2i+1): uniform_open_f64 then -log(-log(u)), in double with
// explicit round-to-nearest operations (no contraction).
__device__ inline double gumbel_from_words(uint32_t w_even, uint32_t w_odd) {
  const uint64_t hi = w_even >> 6;  // 26 bits
  const uint64_t lo = w_odd >> 5;   // 27 bits
  const uint64_t m = (hi << 27) | lo;
  const double u = __dmul_rn(__dadd_rn(static_cast<double>(m), 0.5), 1.0 / 9007199254740992.0);
  return -log(-log(u));
}

// ---- row helpers ---------------------------------------------------------------------------------------
__device__ inline float load(const float* p, int64_t i) { return p[i]; }
__device__ inline float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// The CPU's temperature scaling: logits[v] * float(1.0 / temperature), one f32 rounding.
__device__ inline float scale(float x, float inv_t) { return __fmul_rn(x, inv_t); }

// Unsigned key with the float order: a < b (as floats) <=> key(a) < key(b); -0 and +0 share the key of
// +0 because they are equal values (the CPU's comparisons cannot tell them apart). NaN is not handled.
__device__ inline uint32_t order_key(float y) {
  const uint32_t u = (y == 0.0f) ? 0u : __float_as_uint(y);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ inline float key_value(uint32_t k) { return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

// exp(double(y) - mx) in double, as the CPU's top-p weights and softmax terms.
__device__ inline double weight(float y, double mx) { return exp(__dsub_rn(static_cast<double>(y), mx)); }

// ---- block reductions (fixed tree over kThreads slots: deterministic) --------------------------------
__device__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

__device__ int64_t block_sum_i64(int64_t v, int64_t* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const int64_t r = sh[0];
  __syncthreads();
  return r;
}

__device__ int64_t block_min_i64(int64_t v, int64_t* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = min(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const int64_t r = sh[0];
  __syncthreads();
  return r;
}

__device__ float block_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

// The k-th largest (1-based) of key_of(v) over the v in [0, V) for which key_of returns true, by four
// 8-bit radix passes with a shared histogram (integer counts: order-independent). Needs 1 <= k <= the
// number of such v. Every thread gets the result.
template <class KeyOf>
__device__ uint32_t radix_select_largest(int64_t V, uint32_t k, KeyOf key_of, unsigned* hist, uint32_t* bcast) {
  uint32_t prefix = 0, mask = 0, kr = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    // Warp-uniform trip count so that whole warps meet at __match_any_sync: lanes holding the same bin
    // add once through their lowest lane (the row's keys crowd into few bins in the first passes).
    for (int64_t base = 0; base < V; base += kThreads) {
      const int64_t v = base + threadIdx.x;
      uint32_t key = 0;
      const bool in = v < V && key_of(v, key) && (key & mask) == prefix;
      const uint32_t bin = in ? (key >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (in && static_cast<int>(threadIdx.x & 31u) == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // Walk the bins from the top until the k-th largest falls in one.
      uint32_t above = 0;
      int chosen = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + hist[b] >= kr) {
          chosen = b;
          break;
        }
        above += hist[b];
      }
      bcast[0] = prefix | (static_cast<uint32_t>(chosen) << shift);
      bcast[1] = kr - above;
    }
    __syncthreads();
    prefix = bcast[0];
    kr = bcast[1];
    mask |= 255u << shift;
    __syncthreads();  // bcast is rewritten in the next pass
  }
  return prefix;
}

struct KernelParams {
  int greedy;       // temperature == 0: keep the raw maximum(s) at weight 0
  float inv_t;      // float(1.0 / temperature)
  int64_t top_k;    // 0 = off (also when top_k >= V, as the CPU)
  int use_top_p;    // top_p < 1
  double top_p;
};

// ---- the sampler: one block per row ------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads) k_sample(const T* __restrict__ logits, int64_t V, KernelParams p,
                                                     const DeviceRngKey* __restrict__ keys, int32_t* tokens,
                                                     float* confidence) {
  __shared__ double sh_d[kThreads];
  __shared__ int64_t sh_i[kThreads];
  __shared__ float sh_f[kThreads];
  __shared__ unsigned hist[256];
  __shared__ uint32_t bcast[2];
  __shared__ int64_t bcast_i;

  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  const DeviceRngKey key = keys[row];
  const int tid = threadIdx.x;

  // Maxima of the raw logits (confidence, greedy) and of the scaled ones (top-p's reference point, the
  // CPU's out[order.front()]: top-k always keeps the maximum).
  // Also the smallest key of a finite-or-+inf scaled value: the low end of top-p's search.
  float mraw = -INFINITY, mscaled = -INFINITY;
  int64_t kmin = 0xffffffffll;
  for (int64_t v = tid; v < V; v += kThreads) {
    const float xv = load(x, v);
    mraw = fmaxf(mraw, xv);
    if (!p.greedy) {
      const float y = scale(xv, p.inv_t);
      mscaled = fmaxf(mscaled, y);
      if (y != -INFINITY) kmin = min(kmin, static_cast<int64_t>(order_key(y)));
    }
  }
  mraw = block_max(mraw, sh_f);
  mscaled = block_max(mscaled, sh_f);
  kmin = block_min_i64(kmin, sh_i);

  // top-k: keep every scaled value >= the k-th largest (nth_element over all V values, ties kept).
  uint32_t kth_key = 0;  // 0: every key passes
  if (!p.greedy && p.top_k > 0) {
    kth_key = radix_select_largest(
        V, static_cast<uint32_t>(p.top_k),
        [&](int64_t v, uint32_t& k) {
          k = order_key(scale(load(x, v), p.inv_t));
          return true;
        },
        hist, bcast);
  }
  // Survivors of temperature + top-k (the CPU's out[v] != -inf).
  auto kept_k = [&](float y) { return y != -INFINITY && order_key(y) >= kth_key; };

  // top-p: in the CPU's order (value descending, id ascending) token j survives iff the mass of the tokens
  // before it is < top_p * total. The survivors are every value above tau plus the first r ties at tau
  // (by id), where tau is the smallest value whose mass-above is < top_p * total.
  uint32_t tau_key = 0;
  int64_t id_cut = V;  // ties at tau with id <= id_cut survive
  if (!p.greedy && p.use_top_p) {
    const double mx = mscaled;
    double total = 0;
    for (int64_t v = tid; v < V; v += kThreads) {
      const float y = scale(load(x, v), p.inv_t);
      if (kept_k(y)) total += weight(y, mx);
    }
    total = block_sum(total, sh_d);
    const double P = p.top_p * total;
    // Smallest key K with mass(key > K) < P, bit by bit from the top. It lies in [lo, hi], the keys of the
    // smallest and largest survivors: mass(key > hi) = 0 < P, and below lo the mass is the total >= P
    // (top_p <= 1). So the bits above the highest bit where lo and hi differ are fixed: start below it.
    const uint32_t hi = order_key(mscaled);
    const uint32_t lo = max(kth_key, static_cast<uint32_t>(kmin));
    const uint32_t diff = lo < hi ? (lo ^ hi) : 0u;
    const int top_bit = diff ? 31 - __clz(diff) : -1;  // -1: lo == hi, nothing to search
    uint32_t K = top_bit >= 0 ? (top_bit == 31 ? 0u : (hi >> (top_bit + 1)) << (top_bit + 1)) : hi;
    for (int b = top_bit; b >= 0; --b) {
      const uint32_t probe = K | ((1u << b) - 1u);  // largest candidate with bit b clear
      double above = 0;
      for (int64_t v = tid; v < V; v += kThreads) {
        const float y = scale(load(x, v), p.inv_t);
        if (kept_k(y) && order_key(y) > probe) above += weight(y, mx);
      }
      above = block_sum(above, sh_d);
      if (!(above < P)) K |= 1u << b;
    }
    // Mass above tau and the number of ties at tau; then the CPU's loop over the ties, in double.
    double above = 0;
    int64_t ties = 0;
    for (int64_t v = tid; v < V; v += kThreads) {
      const float y = scale(load(x, v), p.inv_t);
      if (!kept_k(y)) continue;
      const uint32_t ky = order_key(y);
      if (ky > K) above += weight(y, mx);
      else if (ky == K) ++ties;
    }
    above = block_sum(above, sh_d);
    ties = block_sum_i64(ties, sh_i);
    if (tid == 0) {
      const double e = weight(key_value(K), mx);
      double cum = above;
      int64_t r = 0;
      while (r < ties && cum < P) {
        cum = __dadd_rn(cum, e);
        ++r;
      }
      bcast_i = r > 0 ? r : 1;  // the CPU keeps at least one token
    }
    __syncthreads();
    const int64_t r = bcast_i;
    __syncthreads();
    if (r < ties) {
      // The r-th smallest id among the ties = the r-th largest of ~id.
      const uint32_t sel = radix_select_largest(
          V, static_cast<uint32_t>(r),
          [&](int64_t v, uint32_t& k) {
            const float y = scale(load(x, v), p.inv_t);
            if (!kept_k(y) || order_key(y) != K) return false;
            k = ~static_cast<uint32_t>(v);
            return true;
          },
          hist, bcast);
      id_cut = static_cast<int64_t>(~sel);
    }
    tau_key = K;
  }
  const bool top_p_on = !p.greedy && p.use_top_p;

  // Final pass: the softmax denominator of the raw logits and the Gumbel-max over the survivors. Two
  // consecutive ids share one Philox block (Gumbel of id v uses stream words 2v, 2v+1 = block v / 2).
  const double mraw_d = mraw;
  double z = 0;
  double best_s = -INFINITY;
  int64_t best_v = -1;
  const int64_t pairs = (V + 1) / 2;
  for (int64_t q = tid; q < pairs; q += kThreads) {
    float f[2];
    bool keep[2];
    for (int j = 0; j < 2; ++j) {
      const int64_t v = 2 * q + j;
      keep[j] = false;
      f[j] = 0.0f;
      if (v >= V) continue;
      const float xv = load(x, v);
      z += weight(xv, mraw_d);
      if (p.greedy) {
        keep[j] = xv == mraw;  // filtered value 0 for every maximum
      } else {
        const float y = scale(xv, p.inv_t);
        f[j] = y;
        keep[j] = kept_k(y);
        if (keep[j] && top_p_on) {
          const uint32_t ky = order_key(y);
          keep[j] = ky > tau_key || (ky == tau_key && v <= id_cut);
        }
      }
    }
    if (keep[0] || keep[1]) {
      uint32_t w[4];
      stream_block(key, static_cast<uint32_t>(q), w);
      for (int j = 0; j < 2; ++j) {
        if (!keep[j]) continue;
        const double s = __dadd_rn(static_cast<double>(f[j]), gumbel_from_words(w[2 * j], w[2 * j + 1]));
        if (s > best_s) {  // strict: the first (smallest id) wins a tie, as the CPU
          best_s = s;
          best_v = 2 * q + j;
        }
      }
    }
  }
  z = block_sum(z, sh_d);
  // Arg-max over threads: larger score, then smaller id; -1 = no candidate.
  sh_d[tid] = best_s;
  sh_i[tid] = best_v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const double os = sh_d[tid + s];
      const int64_t ov = sh_i[tid + s];
      const int64_t cv = sh_i[tid];
      if (ov >= 0 && (cv < 0 || os > sh_d[tid] || (os == sh_d[tid] && ov < cv))) {
        sh_d[tid] = os;
        sh_i[tid] = ov;
      }
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t tok = sh_i[0];
    tokens[row] = static_cast<int32_t>(tok);  // -1 only if every logit was filtered (the CPU throws)
    confidence[row] = tok >= 0 ? static_cast<float>(weight(load(x, tok), mraw_d) / z) : 0.0f;
  }
}

// ---- test hooks: raw stream words and Gumbel values ----------------------------------------------------
__global__ void k_philox_words(DeviceRngKey key, const uint32_t* idx, int64_t n, uint32_t* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = stream_word(key, idx[i]);
}

__global__ void k_gumbel(DeviceRngKey key, const uint32_t* idx, int64_t n, double* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t j = idx[i];
    out[i] = gumbel_from_words(stream_word(key, 2 * j), stream_word(key, 2 * j + 1));
  }
}

int grid_for(int64_t n) {
  const int64_t g = (n + 255) / 256;
  return static_cast<int>(g < 4096 ? g : 4096);
}

}  // namespace

// ---- public API ----------------------------------------------------------------------------------------
DeviceRngKey to_device_key(const RngKey& k) {
  DeviceRngKey d;
  d.seed = k.seed;
  d.purpose = static_cast<uint32_t>(k.purpose);
  d.step = k.step;
  d.sample_id = k.sample_id;
  d.position = k.position;
  return d;
}

size_t sample_scratch_bytes(int64_t rows, int64_t V, const ops::SamplingParams& params) {
  (void)rows, (void)V, (void)params;
  return 0;  // every filter is recomputed from the logits: no scratch needed
}

void sample_tokens(const void* logits, int64_t rows, int64_t V, const ops::SamplingParams& params,
                   const DeviceRngKey* keys, int32_t* tokens, float* confidence, void* scratch, DType dt,
                   cudaStream_t stream) {
  (void)scratch;
  OPDLM_CHECK(rows >= 0, "cuda::sample_tokens: rows = ", rows);
  if (rows == 0) return;
  OPDLM_CHECK(V > 0 && V <= INT32_MAX, "cuda::sample_tokens: V = ", V, " (must be in [1, 2^31))");
  OPDLM_CHECK(rows <= INT32_MAX, "cuda::sample_tokens: rows = ", rows, " exceeds one grid");
  OPDLM_CHECK(logits && keys && tokens && confidence, "cuda::sample_tokens: null pointer");
  params.validate();
  KernelParams kp{};
  kp.greedy = params.temperature == 0 ? 1 : 0;
  kp.inv_t = kp.greedy ? 1.0f : static_cast<float>(1.0 / params.temperature);
  kp.top_k = (params.top_k > 0 && params.top_k < V) ? params.top_k : 0;
  kp.use_top_p = params.top_p < 1.0 ? 1 : 0;
  kp.top_p = params.top_p;
  const dim3 grid(static_cast<unsigned>(rows));
  switch (dt) {
    case DType::f32:
      k_sample<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(logits), V, kp, keys, tokens,
                                                     confidence);
      break;
    case DType::bf16:
      k_sample<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits), V, kp, keys,
                                                             tokens, confidence);
      break;
    default:
      OPDLM_FAIL("cuda::sample_tokens: unsupported logits dtype ", dtype_name(dt), " (f32 or bf16)");
  }
  CUDA_CHECK(cudaGetLastError());
}

// Test-only (tests/gpu/test_sampling_cuda.cpp declares them): stream words u32(idx[i]) and Gumbel values
// gumbel(idx[i]) of `key` on the device, n entries, device pointers.
namespace testing {
void philox_words(const DeviceRngKey& key, const uint32_t* idx, int64_t n, uint32_t* out, cudaStream_t stream) {
  if (n <= 0) return;
  k_philox_words<<<grid_for(n), 256, 0, stream>>>(key, idx, n, out);
  CUDA_CHECK(cudaGetLastError());
}
void gumbel_values(const DeviceRngKey& key, const uint32_t* idx, int64_t n, double* out, cudaStream_t stream) {
  if (n <= 0) return;
  k_gumbel<<<grid_for(n), 256, 0, stream>>>(key, idx, n, out);
  CUDA_CHECK(cudaGetLastError());
}
}  // namespace testing

}  // namespace opdlm::cuda
