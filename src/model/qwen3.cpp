// Qwen3Model on the CPU ops: one layer loop serves the training forward and the KV-cache forward;
// the backward walks the layers in reverse from the saved activations.
#include "opdlm/model/qwen3.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "opdlm/ops/attention.hpp"
#include "opdlm/ops/embedding.hpp"
#include "opdlm/ops/matmul.hpp"
#include "opdlm/ops/residual.hpp"
#include "opdlm/ops/rmsnorm.hpp"
#include "opdlm/ops/swiglu.hpp"
#include "opdlm/parallel/communicator.hpp"
#include "opdlm/parallel/vocab_parallel.hpp"

namespace opdlm::model {

using ops::MaskDescriptor;

namespace {

// ids and positions i32 [B, T] of the same shape, ids inside the vocabulary, positions >= 0.
void check_tokens(const Tensor& ids, const Tensor& positions, int64_t vocab) {
  expect_cpu(ids, "ids");
  expect_dtype(ids, "ids", {DType::i32});
  expect_ndim(ids, "ids", 2);
  expect_cpu(positions, "positions");
  expect_dtype(positions, "positions", {DType::i32});
  expect_shape(positions, "positions", ids.shape(), "shape of 'ids'");
  const int64_t T = ids.size(1);
  const int32_t* p = ids.data<int32_t>();
  const int32_t* q = positions.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (p[i] < 0 || p[i] >= vocab)
      OPDLM_FAIL("tensor 'ids' ", ids.describe(), " element [", i / T, ", ", i % T, "] is ", p[i],
                 ", outside the vocabulary [0, ", vocab, ") (dimension 1 of 'model.embed_tokens.weight')");
    if (q[i] < 0)
      OPDLM_FAIL("tensor 'positions' ", positions.describe(), " element [", i / T, ", ", i % T, "] is ", q[i],
                 ", expected a position id >= 0");
  }
}

void check_mask_count(std::span<const MaskDescriptor> masks, int64_t batch) {
  if (masks.size() != 1 && static_cast<int64_t>(masks.size()) != batch)
    OPDLM_FAIL("masks: got ", masks.size(), " descriptors, expected 1 or ", batch,
               " (dimension 0 of 'ids', the batch size)");
}

// rows: undefined, or i32 [n_rows] with every value in [0, n).
void check_rows(const Tensor& rows, int64_t n) {
  if (!rows.defined()) return;
  expect_cpu(rows, "rows");
  expect_dtype(rows, "rows", {DType::i32});
  expect_ndim(rows, "rows", 1);
  const int32_t* r = rows.data<int32_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    if (r[i] < 0 || r[i] >= n)
      OPDLM_FAIL("tensor 'rows' ", rows.describe(), " element ", i, " is ", r[i],
                 ", outside the token rows [0, ", n, ") (B*T of 'ids')");
}

// out [n_rows, H] = x[rows].
Tensor gather_rows(const Tensor& x, const Tensor& rows) {
  const int64_t n = rows.numel(), h = x.size(1);
  const size_t bytes = static_cast<size_t>(h) * dtype_size(x.dtype());
  Tensor out = Tensor::empty({n, h}, x.dtype());
  const int32_t* r = rows.data<int32_t>();
  const char* src = static_cast<const char*>(x.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * bytes, src + r[i] * bytes, bytes);
  return out;
}

// dx [n, H] (zeroed) with dx[rows[i]] += dy[i]: repeated rows add up, in order.
template <class T>
void scatter_rows_t(const Tensor& dy, const Tensor& rows, Tensor& dx) {
  const int64_t h = dy.size(1);
  const int32_t* r = rows.data<int32_t>();
  const T* s = dy.data<T>();
  T* d = dx.data<T>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    for (int64_t c = 0; c < h; ++c) d[r[i] * h + c] += s[i * h + c];
}

Tensor scatter_rows(const Tensor& dy, const Tensor& rows, int64_t n) {
  Tensor dx({n, dy.size(1)}, dy.dtype());
  if (dy.dtype() == DType::f32) scatter_rows_t<float>(dy, rows, dx);
  else scatter_rows_t<double>(dy, rows, dx);
  return dx;
}

// Slots [0, tk) of row b of a cache tensor [B, max_len, Hkv, hd], as [1, tk, Hkv, hd] (no copy).
Tensor cache_prefix(const Tensor& c, int64_t b, int64_t tk) {
  return c.slice(b, b + 1).view({c.size(1), c.size(2), c.size(3)}).slice(0, tk).view({1, tk, c.size(2), c.size(3)});
}

// Writes x [B, Tq, Hkv, hd] into slots [at, at + Tq) of every row of the cache tensor.
void cache_write(Tensor& c, const Tensor& x, int64_t at) {
  const int64_t B = x.size(0), tq = x.size(1);
  const size_t slot = static_cast<size_t>(x.size(2) * x.size(3)) * dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw_data());
  char* dst = static_cast<char*>(c.raw_data());
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dst + (b * c.size(1) + at) * slot, src + b * tq * slot, static_cast<size_t>(tq) * slot);
}

}  // namespace

// ---- KVCache ----------------------------------------------------------------------------------------

KVCache::KVCache(const Qwen3Config& config, int64_t batch, int64_t max_len, DType dtype)
    : batch_(batch), max_len_(max_len), dtype_(dtype) {
  if (batch < 1) OPDLM_FAIL("KVCache: batch is ", batch, ", expected >= 1");
  if (max_len < 1) OPDLM_FAIL("KVCache: max_len is ", max_len, ", expected >= 1");
  if (dtype != DType::f32 && dtype != DType::f64)
    OPDLM_FAIL("KVCache: dtype ", dtype_name(dtype), " unsupported on the CPU; expected f32 or f64");
  const Shape s{batch, max_len, config.num_key_value_heads, config.head_dim};
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    k_.push_back(Tensor(s, dtype));
    v_.push_back(Tensor(s, dtype));
  }
}

void KVCache::truncate(int64_t length) {
  if (length < 0 || length > length_)
    OPDLM_FAIL("KVCache::truncate: length ", length, " outside [0, ", length_, "] (the committed length)");
  length_ = length;
}

Tensor& KVCache::k(int64_t layer) {
  if (layer < 0 || layer >= num_layers()) OPDLM_FAIL("KVCache: layer ", layer, " outside [0, ", num_layers(), ")");
  return k_[size_t(layer)];
}

Tensor& KVCache::v(int64_t layer) {
  if (layer < 0 || layer >= num_layers()) OPDLM_FAIL("KVCache: layer ", layer, " outside [0, ", num_layers(), ")");
  return v_[size_t(layer)];
}

// ---- Qwen3Model -------------------------------------------------------------------------------------

Qwen3Model::Qwen3Model(Qwen3Weights weights, bool trainable, TensorParallel tp)
    : weights_(std::move(weights)), trainable_(trainable), tp_(std::move(tp)) {
  if (tp_.comm) {
    tp_.full.validate("Qwen3Model full config");
    if (tp_.vocab_begin < 0 || tp_.vocab_real < 0 || tp_.vocab_real > weights_.config().vocab_size ||
        tp_.vocab_begin + tp_.vocab_real > tp_.full.vocab_size)
      OPDLM_FAIL("Qwen3Model: vocabulary rows [", tp_.vocab_begin, ", ", tp_.vocab_begin + tp_.vocab_real,
                 ") do not fit the shard (", weights_.config().vocab_size, " rows) and the vocabulary (",
                 tp_.full.vocab_size, ")");
    if (tp_.pieces < 0) OPDLM_FAIL("Qwen3Model: ", tp_.pieces, " virtual shards per rank");
    const Qwen3Config& sc = weights_.config();
    if (tp_.pieces > 0 && (sc.num_attention_heads % tp_.pieces || sc.num_key_value_heads % tp_.pieces ||
                           sc.intermediate_size % tp_.pieces || sc.vocab_size % tp_.pieces))
      OPDLM_FAIL("Qwen3Model: the shard (", sc.num_attention_heads, " heads, ", sc.num_key_value_heads,
                 " KV heads, FFN ", sc.intermediate_size, ", ", sc.vocab_size, " vocabulary rows) does not cut into ",
                 tp_.pieces, " virtual shards (parallel.deterministic_shards)");
  }
  const Qwen3Config& c = weights_.config();
  c.validate("Qwen3Model config");
  if (dtype() != DType::f32 && dtype() != DType::f64)
    OPDLM_FAIL("Qwen3Model: weights of dtype ", dtype_name(dtype()), " unsupported on the CPU; expected f32 or f64");
  // Every tensor must be there with its shape, so forward never meets a surprise.
  for (const auto& [name, shape] : Qwen3Weights::expected_shapes(c)) {
    const Tensor& t = weights_.get(name);
    expect_shape(t, name.c_str(), shape, "shape the config implies");
    expect_dtype(t, name.c_str(), {dtype()});
    expect_cpu(t, name.c_str());
  }
  {
    Qwen3TensorIndex ix = weights_.tensor_index();
    embed_idx_ = ix.embed, norm_idx_ = ix.norm, head_idx_ = ix.head;
    layer_idx_ = std::move(ix.layers);
  }
  if (trainable_) {
    // Same names in the same order (same indices), every tensor a view of one flat buffer, so a
    // training loop can read the whole gradient as one span (flat_grads) without copying.
    grads_ = weights_.zeros_like();
    int64_t total = 0;
    for (const auto& g : grads_.tensors()) total += g.value.numel();
    flat_grads_ = Tensor::zeros({total}, dtype());
    int64_t off = 0;
    for (auto& g : grads_.tensors()) {
      const int64_t n = g.value.numel();
      g.value = flat_grads_.slice(off, off + n).view(g.value.shape());
      off += n;
    }
  }
}

Qwen3Weights& Qwen3Model::grads() {
  if (!trainable_) OPDLM_FAIL("Qwen3Model: a frozen (teacher) model has no gradients");
  return grads_;
}

void Qwen3Model::zero_grads() {
  if (!trainable_) grads();  // the error
  flat_grads_.zero();
}

std::span<float> Qwen3Model::flat_grads() {
  if (!trainable_) grads();
  OPDLM_CHECK(dtype() == DType::f32, "flat_grads: f32 models only");
  return {flat_grads_.data<float>(), size_t(flat_grads_.numel())};
}

void Qwen3Model::tp_sum(Tensor& t) const {
  if (!tp_.comm) return;
  if (t.dtype() == DType::f32) tp_.comm->all_reduce_tree(std::span<float>(t.data<float>(), size_t(t.numel())));
  else tp_.comm->all_reduce_tree(std::span<double>(t.data<double>(), size_t(t.numel())));
}

parallel::VocabSlice Qwen3Model::vocab_slice() const {
  const int p = pieces();
  return {tp_.comm ? tp_.vocab_begin : 0, full_config().vocab_size, p, p ? config().vocab_size / p : 0};
}

// ---- products of a shard: one call, or virtual shard by virtual shard (deterministic mode) ----------

namespace {
// dst[:, c0 : c0 + src.size(1)] = src, or += src when `add` (one rounding, as a gemm's beta = 1).
template <class T>
void put_cols_t(Tensor& dst, const Tensor& src, int64_t c0, bool add) {
  const int64_t n = src.size(0), w = src.size(1), ld = dst.size(1);
  T* d = dst.data<T>();
  const T* s = src.data<T>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < w; ++j) d[i * ld + c0 + j] = add ? d[i * ld + c0 + j] + s[i * w + j] : s[i * w + j];
}
void put_cols(Tensor& dst, const Tensor& src, int64_t c0, bool add) {
  if (dst.dtype() == DType::f32) put_cols_t<float>(dst, src, c0, add);
  else put_cols_t<double>(dst, src, c0, add);
}

// The parts [pieces, ...] summed over the virtual shards of the TP group into out.
void piece_sum(parallel::Communicator& tp, int pieces, const Tensor& parts, Tensor& out) {
  if (out.dtype() == DType::f32)
    parallel::virtual_shard_sum(tp, pieces, std::span<const float>(parts.data<float>(), size_t(parts.numel())),
                                std::span<float>(out.data<float>(), size_t(out.numel())));
  else
    parallel::virtual_shard_sum(tp, pieces, std::span<const double>(parts.data<double>(), size_t(parts.numel())),
                                std::span<double>(out.data<double>(), size_t(out.numel())));
}

// Piece v's part of a [pieces, ...] tensor, as a [rows, cols] view.
Tensor part(Tensor& parts, int64_t v, int64_t rows, int64_t cols) {
  return parts.slice(v, v + 1).view({rows, cols});
}
}  // namespace

Tensor Qwen3Model::column_forward(const Tensor& x, const Tensor& w, int64_t real_rows) const {
  const Tensor wr = real_rows == w.size(0) ? w : w.slice(0, real_rows);
  const int p = pieces();
  if (!p) return ops::linear_forward(x, wr);
  // Piece v: rows [v * width, (v + 1) * width) of the shard, cut at the real rows (vocabulary padding).
  const int64_t width = w.size(0) / p;
  Tensor y = Tensor::zeros({x.size(0), real_rows}, x.dtype());
  for (int64_t v = 0; v < p; ++v) {
    const int64_t r0 = v * width, r1 = std::min(real_rows, r0 + width);
    if (r1 > r0) put_cols(y, ops::linear_forward(x, w.slice(r0, r1)), r0, false);
  }
  return y;
}

Tensor Qwen3Model::row_forward(const Tensor& x, const Tensor& w) const {
  const int p = pieces();
  if (!p) {
    Tensor y = ops::linear_forward(x, w);
    tp_sum(y);
    return y;
  }
  const int64_t n = x.size(0), out = w.size(0), k = w.size(1) / p;
  Tensor parts = Tensor::empty({p, n, out}, x.dtype()), y = Tensor::empty({n, out}, x.dtype());
  for (int64_t v = 0; v < p; ++v) {
    const Tensor yv = ops::linear_forward(x.columns(v * k, (v + 1) * k), w.columns(v * k, (v + 1) * k));
    std::memcpy(part(parts, v, n, out).raw_data(), yv.raw_data(), size_t(yv.nbytes()));
  }
  piece_sum(*tp_.comm, p, parts, y);
  return y;
}

Tensor Qwen3Model::column_backward(const Tensor& x, std::initializer_list<ColumnGrad> terms, int64_t real_rows) {
  auto gw = [&](int64_t i) -> Tensor& { return grads_.tensors()[size_t(i)].value; };
  OPDLM_CHECK(real_rows < 0 || terms.size() == 1, "column_backward: real_rows cuts a single term");
  const int p = pieces();
  // Piece v of every term (v = -1: the whole shard in one call): weight gradients first, then
  // dx = dy_0 @ w_0 + dy_1 @ w_1 + ... in term order. Each term cuts its own rows (q and k/v differ);
  // real_rows (the head's vocabulary padding) cuts a single term.
  auto piece = [&](int64_t v, Tensor& dx) {
    bool first = true;
    std::vector<std::pair<Tensor, Tensor>> dy_w;  // the term's dy columns and weight rows of this piece
    for (const ColumnGrad& t : terms) {
      const int64_t all = w(t.w).size(0), real = real_rows < 0 ? all : real_rows;
      const int64_t r0 = v < 0 ? 0 : v * (all / p), r1 = v < 0 ? real : std::min(real, r0 + all / p);
      if (r1 <= r0) return false;  // vocabulary padding only: a +0 part
      Tensor g = gw(t.w).slice(r0, r1);
      dy_w.emplace_back(v < 0 ? *t.dy : t.dy->columns(r0, r1), w(t.w).slice(r0, r1));
      ops::linear_backward(x, dy_w.back().second, dy_w.back().first, first ? &dx : nullptr, &g);
      first = false;
    }
    for (size_t j = 1; j < dy_w.size(); ++j) ops::matmul(dy_w[j].first, false, dy_w[j].second, false, dx, 1, 1);
    return true;
  };
  const int64_t n = x.size(0), H = x.size(1);
  Tensor dx;
  if (!p) {
    if (!piece(-1, dx)) dx = Tensor::zeros({n, H}, x.dtype());  // a rank without real vocabulary rows
    tp_sum(dx);
    return dx;
  }
  Tensor parts = Tensor::zeros({p, n, H}, x.dtype());
  dx = Tensor::empty({n, H}, x.dtype());
  for (int64_t v = 0; v < p; ++v) {
    Tensor dxv;
    if (piece(v, dxv)) std::memcpy(part(parts, v, n, H).raw_data(), dxv.raw_data(), size_t(dxv.nbytes()));
  }
  piece_sum(*tp_.comm, p, parts, dx);
  return dx;
}

void Qwen3Model::row_backward(const Tensor& x, int64_t wi, const Tensor& dy, Tensor* dx) {
  Tensor& g = grads_.tensors()[size_t(wi)].value;
  const int p = pieces();
  if (!p) return ops::linear_backward(x, w(wi), dy, dx, &g);
  const int64_t k = w(wi).size(1) / p;
  *dx = Tensor::empty({x.size(0), w(wi).size(1)}, x.dtype());
  for (int64_t v = 0; v < p; ++v) {
    Tensor dxv, gv = Tensor::zeros({g.size(0), k}, g.dtype());
    ops::linear_backward(x.columns(v * k, (v + 1) * k), w(wi).columns(v * k, (v + 1) * k), dy, &dxv, &gv);
    put_cols(*dx, dxv, v * k, false);
    put_cols(g, gv, v * k, true);
  }
}

Tensor Qwen3Model::norm_gain_grad(const Tensor& x, const Tensor& wn, const Tensor& rstd, const Tensor& dy,
                                  int64_t heads) const {
  const int p = pieces();
  Tensor gn = Tensor::zeros(wn.shape(), dtype());
  if (!p) {
    ops::rmsnorm_backward(x, wn, rstd, dy, nullptr, &gn);
    tp_sum(gn);
    return gn;
  }
  // Piece v: the rows of its heads, token-major as in one process's piece.
  const int64_t hd = x.size(1), n = x.size(0) / heads, h = heads / p;
  const Tensor xr = x.view({n, heads * hd}), dr = dy.view({n, heads * hd}), sr = rstd.view({n, heads});
  Tensor parts = Tensor::zeros({p, hd}, dtype());
  for (int64_t v = 0; v < p; ++v) {
    Tensor gv = part(parts, v, 1, hd).view({hd});
    const int64_t c0 = v * h * hd, c1 = (v + 1) * h * hd;
    ops::rmsnorm_backward(xr.columns(c0, c1).view({n * h, hd}), wn, sr.columns(v * h, (v + 1) * h).view({n * h}),
                          dr.columns(c0, c1).view({n * h, hd}), nullptr, &gv);
  }
  piece_sum(*tp_.comm, p, parts, gn);
  return gn;
}

Tensor Qwen3Model::local_ids(const Tensor& ids, std::vector<uint8_t>& inside) const {
  Tensor out = ids.clone();
  int32_t* p = out.data<int32_t>();
  inside.assign(size_t(out.numel()), 0);
  for (int64_t i = 0; i < out.numel(); ++i) {
    const int64_t v = int64_t{p[i]} - tp_.vocab_begin;
    inside[size_t(i)] = v >= 0 && v < tp_.vocab_real;
    p[i] = inside[size_t(i)] ? static_cast<int32_t>(v) : 0;
  }
  return out;
}

namespace {
// Zeroes rows i of the 2-D tensor t where keep[i] == 0.
void zero_rows(Tensor& t, const std::vector<uint8_t>& keep) {
  const size_t row = static_cast<size_t>(t.size(1)) * dtype_size(t.dtype());
  auto* p = static_cast<char*>(t.raw_data());
  for (size_t i = 0; i < keep.size(); ++i)
    if (!keep[i]) std::memset(p + i * row, 0, row);
}
}  // namespace

Tensor Qwen3Model::last_rows(int64_t batch, int64_t tokens) {
  std::vector<int32_t> r;
  for (int64_t b = 0; b < batch; ++b) r.push_back(static_cast<int32_t>(b * tokens + tokens - 1));
  return Tensor::from_vector(r, {batch});
}

Tensor Qwen3Model::forward(const Tensor& ids, const Tensor& positions, std::span<const MaskDescriptor> masks,
                           const Tensor& rows, Qwen3Activations* acts) const {
  return run(ids, positions, masks, rows, acts, nullptr, false);
}

Tensor Qwen3Model::forward_cached(const Tensor& ids, const Tensor& positions, std::span<const MaskDescriptor> masks,
                                  KVCache& cache, bool commit, const Tensor& rows) const {
  return run(ids, positions, masks, rows, nullptr, &cache, commit);
}

Tensor Qwen3Model::run(const Tensor& ids, const Tensor& positions, std::span<const MaskDescriptor> masks,
                       const Tensor& rows, Qwen3Activations* acts, KVCache* cache, bool commit) const {
  const Qwen3Config& c = config();
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim;
  const double eps = c.rms_norm_eps, scale = 1.0 / std::sqrt(double(hd));
  check_tokens(ids, positions, full_config().vocab_size);
  const int64_t B = ids.size(0), T = ids.size(1), n = B * T;
  check_mask_count(masks, B);
  check_rows(rows, n);
  // Keys: the sequence itself, or the committed cache slots followed by the new tokens.
  const int64_t past = cache ? cache->length() : 0, Tk = past + T;
  if (cache) {
    if (cache->batch() != B)
      OPDLM_FAIL("tensor 'ids' ", ids.describe(), " dimension 0 is ", B, ", expected ", cache->batch(),
                 " (the KV cache's batch)");
    if (cache->dtype() != dtype())
      OPDLM_FAIL("KV cache dtype ", dtype_name(cache->dtype()), " differs from the weights' ", dtype_name(dtype()));
    if (cache->num_layers() != c.num_hidden_layers)
      OPDLM_FAIL("KV cache has ", cache->num_layers(), " layers, the model ", c.num_hidden_layers);
    if (Tk > cache->max_len())
      OPDLM_FAIL("tensor 'ids' ", ids.describe(), " dimension 1 is ", T, ": cache length ", past, " + ", T, " = ",
                 Tk, " exceeds the KV cache's max_len ", cache->max_len());
  }
  for (size_t i = 0; i < masks.size(); ++i) {
    const std::string name = "masks[" + std::to_string(i) + "]";
    if (cache) {
      if (masks[i].kind == MaskDescriptor::Kind::training)
        OPDLM_FAIL("mask descriptor '", name, "' ", masks[i].describe(),
                   ": a training mask cannot be used with a KV cache (causal or block_causal expected)");
      if (masks[i].q_offset != past)
        OPDLM_FAIL("mask descriptor '", name, "' ", masks[i].describe(), ": field q_offset is ", masks[i].q_offset,
                   ", expected the KV cache's committed length ", past);
    }
    masks[i].validate(T, Tk, name);
  }

  ops::RopeTable rope = ops::rope_table(positions.view({n}), hd, c.rope_theta, dtype());
  Tensor x;
  if (tp_.comm) {  // vocab-parallel lookup: rows outside this shard are 0 before the sum
    std::vector<uint8_t> inside;
    x = ops::embedding_forward(w(embed_idx_), local_ids(ids.view({n}), inside));
    zero_rows(x, inside);
    tp_sum(x);
  } else {
    x = ops::embedding_forward(w(embed_idx_), ids.view({n}));
  }
  if (acts) {
    acts->batch = B;
    acts->tokens = T;
    acts->ids = ids.view({n}).clone();  // copies: the caller may reuse its buffers before backward
    acts->rope = rope;
    acts->masks.assign(masks.begin(), masks.end());
    acts->layers.assign(size_t(c.num_hidden_layers), {});
    acts->rows = rows.defined() ? rows.clone() : Tensor();
  }

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerIdx& L = layer_idx_[size_t(l)];
    Qwen3LayerActivations tmp;
    Qwen3LayerActivations& a = acts ? acts->layers[size_t(l)] : tmp;

    // Attention block: q/k/v projections, per-head RMSNorm on q and k, RoPE, GQA attention.
    a.x_in = x;
    const Tensor h = ops::rmsnorm_forward(x, w(L.input_norm), eps, &a.rstd_in);
    a.q_pre = column_forward(h, w(L.q_proj), Hq * hd).view({n * Hq, hd});
    a.k_pre = column_forward(h, w(L.k_proj), Hkv * hd).view({n * Hkv, hd});
    a.v = column_forward(h, w(L.v_proj), Hkv * hd).view({B, T, Hkv, hd});
    Tensor q = ops::rmsnorm_forward(a.q_pre, w(L.q_norm), eps, &a.q_rstd).view({n, Hq, hd});
    Tensor k = ops::rmsnorm_forward(a.k_pre, w(L.k_norm), eps, &a.k_rstd).view({n, Hkv, hd});
    ops::rope_inplace(q, rope);
    ops::rope_inplace(k, rope);
    a.q = q.view({B, T, Hq, hd});
    a.k = k.view({B, T, Hkv, hd});
    if (!cache) {
      a.attn = ops::attention_forward(a.q, a.k, a.v, masks, scale, acts ? &a.lse : nullptr);
    } else {
      // New K/V go to slots [past, past + T) (overwritten by the next call unless committed); each
      // row attends to its own cache prefix, a contiguous view, so nothing is copied per call.
      Tensor& ck = cache->k_[size_t(l)];
      Tensor& cv = cache->v_[size_t(l)];
      cache_write(ck, a.k, past);
      cache_write(cv, a.v, past);
      a.attn = Tensor::empty({B, T, Hq, hd}, dtype());
      const size_t row_bytes = static_cast<size_t>(T * Hq * hd) * dtype_size(dtype());
      for (int64_t b = 0; b < B; ++b) {
        const Tensor ob = ops::attention_forward(a.q.slice(b, b + 1), cache_prefix(ck, b, Tk), cache_prefix(cv, b, Tk),
                                                 masks.subspan(masks.size() == 1 ? 0 : size_t(b), 1), scale, nullptr);
        std::memcpy(static_cast<char*>(a.attn.raw_data()) + b * row_bytes, ob.raw_data(), row_bytes);
      }
    }
    const Tensor o = row_forward(a.attn.view({n, Hq * hd}), w(L.o_proj));  // partial sums over each rank's heads
    // Without saved activations the stream is updated in place.
    if (acts) {
      a.x_mid = ops::residual_forward(x, o);
    } else {
      a.x_mid = x;
      ops::residual_add_inplace(a.x_mid, o);
    }

    // MLP block: RMSNorm, SwiGLU, down projection, residual.
    const Tensor h2 = ops::rmsnorm_forward(a.x_mid, w(L.post_norm), eps, &a.rstd_mid);
    a.gate = column_forward(h2, w(L.gate_proj), w(L.gate_proj).size(0));
    a.up = column_forward(h2, w(L.up_proj), w(L.up_proj).size(0));
    const Tensor d = row_forward(ops::swiglu_forward(a.gate, a.up), w(L.down_proj));
    if (acts) {
      x = ops::residual_forward(a.x_mid, d);
    } else {
      x = a.x_mid;
      ops::residual_add_inplace(x, d);
    }
  }
  if (cache && commit) cache->length_ = Tk;

  // Final norm and LM head on the logit rows only (OPD reads only the noisy-copy rows).
  Tensor xf = rows.defined() ? gather_rows(x, rows) : x;
  Tensor rstd;
  Tensor hf = ops::rmsnorm_forward(xf, w(norm_idx_), eps, &rstd);
  Tensor logits = column_forward(hf, w(head_idx_), logit_columns());
  if (acts) {
    acts->x_final = xf;
    acts->rstd_final = rstd;
    acts->h_final = hf;
  }
  return logits;
}

void Qwen3Model::backward(const Qwen3Activations& acts, const Tensor& dlogits) {
  if (!trainable_) OPDLM_FAIL("Qwen3Model::backward: a frozen (teacher) model has no gradients");
  const Qwen3Config& c = config();
  const int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim;
  const double eps = c.rms_norm_eps, scale = 1.0 / std::sqrt(double(hd));
  if (static_cast<int64_t>(acts.layers.size()) != c.num_hidden_layers || !acts.h_final.defined())
    OPDLM_FAIL("Qwen3Model::backward: activations hold ", acts.layers.size(), " layers, expected ",
               c.num_hidden_layers, " (pass the Qwen3Activations a forward() of this model filled)");
  if (acts.h_final.dtype() != dtype())
    OPDLM_FAIL("Qwen3Model::backward: activations are ", dtype_name(acts.h_final.dtype()), ", the weights ",
               dtype_name(dtype()));
  expect_float_cpu(dlogits, "dlogits");
  expect_dtype(dlogits, "dlogits", {dtype()});
  expect_shape(dlogits, "dlogits", {acts.h_final.size(0), logit_columns()}, "logit rows of the forward x vocabulary");
  const int64_t B = acts.batch, T = acts.tokens, n = B * T;
  const std::span<const MaskDescriptor> masks(acts.masks);
  auto g = [&](int64_t i) -> Tensor& { return grads_.tensors()[size_t(i)].value; };

  // LM head and final norm (the head's gradient lands in the embedding's when tied).
  // Vocab-parallel head: the real rows of the shard; dh is a partial sum over TP.
  Tensor dxf;
  const Tensor dh = column_backward(acts.h_final, {{&dlogits, head_idx_}}, logit_columns());
  ops::rmsnorm_backward(acts.x_final, w(norm_idx_), acts.rstd_final, dh, &dxf, &g(norm_idx_));
  Tensor dx = acts.rows.defined() ? scatter_rows(dxf, acts.rows, n) : dxf;  // stream gradient [n, H]

  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    const LayerIdx& L = layer_idx_[size_t(l)];
    const Qwen3LayerActivations& a = acts.layers[size_t(l)];

    // MLP block (norm output and SwiGLU product recomputed: cheaper to redo than to keep).
    const Tensor h2 = ops::rmsnorm_forward(a.x_mid, w(L.post_norm), eps);
    Tensor dact, dgate, dup, dxm;
    row_backward(ops::swiglu_forward(a.gate, a.up), L.down_proj, dx, &dact);
    ops::swiglu_backward(a.gate, a.up, dact, &dgate, &dup);
    // Column-parallel gate/up: dh2 = dgate @ W_gate + dup @ W_up, each rank's FFN slice contributing.
    const Tensor dh2 = column_backward(h2, {{&dgate, L.gate_proj}, {&dup, L.up_proj}});
    ops::rmsnorm_backward(a.x_mid, w(L.post_norm), a.rstd_mid, dh2, &dxm, &g(L.post_norm));
    ops::residual_backward(dxm, dx);

    // Attention block.
    Tensor dattn, dq, dk, dv, dq_pre, dk_pre, dxi;
    row_backward(a.attn.view({n, Hq * hd}), L.o_proj, dx, &dattn);
    ops::attention_backward(a.q, a.k, a.v, a.attn, a.lse, dattn.view({B, T, Hq, hd}), masks, scale, dq, dk, dv);
    Tensor dqr = dq.view({n, Hq, hd}), dkr = dk.view({n, Hkv, hd});
    ops::rope_inplace(dqr, acts.rope, /*inverse=*/true);
    ops::rope_inplace(dkr, acts.rope, /*inverse=*/true);
    if (pieces()) {  // the deterministic mode: gains summed piece by piece, input gradients per row
      ops::rmsnorm_backward(a.q_pre, w(L.q_norm), a.q_rstd, dq.view({n * Hq, hd}), &dq_pre, nullptr);
      ops::rmsnorm_backward(a.k_pre, w(L.k_norm), a.k_rstd, dk.view({n * Hkv, hd}), &dk_pre, nullptr);
      ops::residual_add_inplace(g(L.q_norm), norm_gain_grad(a.q_pre, w(L.q_norm), a.q_rstd, dq.view({n * Hq, hd}), Hq));
      ops::residual_add_inplace(g(L.k_norm), norm_gain_grad(a.k_pre, w(L.k_norm), a.k_rstd, dk.view({n * Hkv, hd}), Hkv));
    } else if (tp_.comm) {  // the q/k norm gains are shared by every head: sum the ranks' head subsets
      Tensor gq = Tensor::zeros(w(L.q_norm).shape(), dtype()), gk = Tensor::zeros(w(L.k_norm).shape(), dtype());
      ops::rmsnorm_backward(a.q_pre, w(L.q_norm), a.q_rstd, dq.view({n * Hq, hd}), &dq_pre, &gq);
      ops::rmsnorm_backward(a.k_pre, w(L.k_norm), a.k_rstd, dk.view({n * Hkv, hd}), &dk_pre, &gk);
      tp_sum(gq);
      tp_sum(gk);
      ops::residual_add_inplace(g(L.q_norm), gq);
      ops::residual_add_inplace(g(L.k_norm), gk);
    } else {
      ops::rmsnorm_backward(a.q_pre, w(L.q_norm), a.q_rstd, dq.view({n * Hq, hd}), &dq_pre, &g(L.q_norm));
      ops::rmsnorm_backward(a.k_pre, w(L.k_norm), a.k_rstd, dk.view({n * Hkv, hd}), &dk_pre, &g(L.k_norm));
    }
    const Tensor h1 = ops::rmsnorm_forward(a.x_in, w(L.input_norm), eps);
    const Tensor dqf = dq_pre.view({n, Hq * hd}), dkf = dk_pre.view({n, Hkv * hd}), dvf = dv.view({n, Hkv * hd});
    // Column-parallel q/k/v: dh1 = dq @ W_q + dk @ W_k + dv @ W_v.
    const Tensor dh1 = column_backward(h1, {{&dqf, L.q_proj}, {&dkf, L.k_proj}, {&dvf, L.v_proj}});
    ops::rmsnorm_backward(a.x_in, w(L.input_norm), a.rstd_in, dh1, &dxi, &g(L.input_norm));
    ops::residual_backward(dxi, dx);
  }
  if (tp_.comm) {  // only the ids of this rank's vocabulary rows
    std::vector<uint8_t> inside;
    const Tensor ids = local_ids(acts.ids, inside);
    zero_rows(dx, inside);
    ops::embedding_backward(ids, dx, g(embed_idx_));
  } else {
    ops::embedding_backward(acts.ids, dx, g(embed_idx_));
  }
}

// ---- FLOPs ------------------------------------------------------------------------------------------

namespace {
// Linear weights of the decoder layers (no head).
double layer_matmul_params(const Qwen3Config& c) {
  const double H = double(c.hidden_size), I = double(c.intermediate_size);
  return double(c.num_hidden_layers) * (2 * H * double(c.q_dim()) + 2 * H * double(c.kv_dim()) + 3 * H * I);
}
double attention_flops_per_pair(const Qwen3Config& c) {
  return 4.0 * double(c.num_hidden_layers) * double(c.num_attention_heads) * double(c.head_dim);
}
}  // namespace

double forward_flops_per_token(const Qwen3Config& c, double context, bool with_head) {
  const double head = with_head ? 2.0 * double(c.vocab_size) * double(c.hidden_size) : 0.0;
  return 2.0 * layer_matmul_params(c) + head + attention_flops_per_pair(c) * context;
}

double forward_flops(const Qwen3Config& c, std::span<const MaskDescriptor> masks, int64_t batch, int64_t tq,
                     int64_t tk, int64_t logit_rows) {
  check_mask_count(masks, batch);
  double pairs = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const MaskDescriptor& m = masks[masks.size() == 1 ? 0 : size_t(b)];
    m.validate(tq, tk, "masks[" + std::to_string(masks.size() == 1 ? 0 : b) + "]");
    ops::KeyRange r[2];
    for (int64_t q = 0; q < tq; ++q) {
      const int nr = m.ranges(q, tk, r);
      for (int i = 0; i < nr; ++i) pairs += double(r[i].end - r[i].begin);
    }
  }
  return double(batch * tq) * 2.0 * layer_matmul_params(c) +
         double(logit_rows) * 2.0 * double(c.vocab_size) * double(c.hidden_size) + attention_flops_per_pair(c) * pairs;
}

}  // namespace opdlm::model
