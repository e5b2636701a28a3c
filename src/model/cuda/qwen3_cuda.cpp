// Qwen3CudaModel: host code that runs the Qwen3 decoder on the CUDA ops in the same order of
// operations as model::Qwen3Model (src/model/qwen3.cpp, without tensor parallelism), so an f32 model
// matches the CPU to rounding; bf16 mixed precision keeps fp32 masters, gradients and AdamW moments.
#include "opdlm/model/cuda/qwen3_cuda.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/ops/cuda/attention_cuda.hpp"
#include "opdlm/ops/cuda/gemm_cuda.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "opdlm/tensor/cuda/device_arena.hpp"

namespace opdlm::cuda {

using ops::MaskDescriptor;

namespace {

// Parameter offsets are padded to this many elements, so every tensor of the flat buffers starts
// 256-byte aligned in f32 and bf16 (what cuBLASLt's fastest kernels want); padding stays zero.
constexpr int64_t kParamAlign = 128;

std::string gib(size_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f GiB", double(b) / double(size_t(1) << 30));
  return buf;
}

}  // namespace

// ---- Carver: one list of buffers, counted first (exact arena size), then carved ---------------------

class Qwen3CudaModel::Carver {
 public:
  explicit Carver(DeviceArena* arena) : arena_(arena) {}
  // The arena rounds every block up to its 256-byte alignment; the count does the same.
  void* take(size_t bytes, const char* what) {
    if (bytes == 0) return nullptr;
    total_ += (bytes + 255) & ~size_t(255);
    return arena_ ? arena_->alloc(bytes, 256, what) : nullptr;
  }
  template <class T> T* take_n(int64_t n, const char* what) {
    return static_cast<T*>(take(size_t(n) * sizeof(T), what));
  }
  size_t total() const { return total_; }

 private:
  DeviceArena* arena_;
  size_t total_ = 0;
};

// ---- construction -------------------------------------------------------------------------------------

Qwen3CudaModel::Qwen3CudaModel(const model::Qwen3Weights& weights, DType compute, bool trainable,
                               ActivationBudget budget)
    : config_(weights.config()), dt_(compute), trainable_(trainable), budget_(budget) {
  const model::Qwen3Config& c = config_;
  c.validate("Qwen3CudaModel config");
  if (compute != DType::f32 && compute != DType::bf16)
    OPDLM_FAIL("Qwen3CudaModel: compute dtype ", dtype_name(compute), " unsupported; expected f32 or bf16");
  if (weights.dtype() != DType::f32 && weights.dtype() != DType::f64)
    OPDLM_FAIL("Qwen3CudaModel: weights of dtype ", dtype_name(weights.dtype()), " unsupported; expected f32 or f64");
  for (const auto& [name, shape] : model::Qwen3Weights::expected_shapes(c)) {
    const Tensor& t = weights.get(name);
    expect_shape(t, name.c_str(), shape, "shape the config implies");
    expect_dtype(t, name.c_str(), {weights.dtype()});
    expect_cpu(t, name.c_str());
  }
  if (budget_.max_tokens < 1) OPDLM_FAIL("Qwen3CudaModel: activation budget max_tokens is ", budget_.max_tokens);
  if (budget_.max_rows <= 0) budget_.max_rows = budget_.max_tokens;
  if (budget_.max_batch <= 0) budget_.max_batch = budget_.max_tokens;
  if (budget_.max_batch > budget_.max_tokens)
    OPDLM_FAIL("Qwen3CudaModel: max_batch ", budget_.max_batch, " exceeds max_tokens ", budget_.max_tokens);

  // Tensor layout: the weights' order, each at a padded offset of the flat buffers.
  for (const auto& nt : weights.tensors()) {
    Param p{nt.name, nt.value.shape(), flat_numel_, nt.value.numel()};
    params_.push_back(p);
    flat_numel_ += (p.numel + kParamAlign - 1) / kParamAlign * kParamAlign;
  }
  {
    model::Qwen3TensorIndex ix = weights.tensor_index();
    embed_idx_ = ix.embed, norm_idx_ = ix.norm, head_idx_ = ix.head;
    layer_idx_ = std::move(ix.layers);
  }

  // A blocking stream: ordered after legacy-default-stream work of callers (uploads with cudaMemcpy).
  CUDA_CHECK(cudaStreamCreate(&stream_));
  CUDA_CHECK(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming));
  blas_ = std::make_unique<BlasLt>();
  const int64_t nstage = 2 * budget_.max_tokens + budget_.max_rows;
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&staging_), size_t(nstage) * sizeof(int32_t)));
  try {
    allocate_and_upload(weights);
  } catch (...) {  // e.g. an arena too large for the device: no destructor runs, so release here
    cudaFreeHost(staging_);
    cudaEventDestroy(staging_free_);
    blas_.reset();
    cudaStreamDestroy(stream_);
    throw;
  }
}

void Qwen3CudaModel::allocate_and_upload(const model::Qwen3Weights& weights) {

  // Parameter arena: masters, compute copy, gradients, moments, the norm's scratch.
  const int64_t P = flat_numel_;
  const size_t es = dtype_size(dt_);
  auto carve_params = [&](Carver& cv) {
    if (trainable_) {
      master_ = cv.take_n<float>(P, "master weights (f32)");
      compute_ = dt_ == DType::f32 ? static_cast<void*>(master_) : cv.take(size_t(P) * es, "compute weights");
      grads_ = cv.take_n<float>(P, "gradients (f32)");
      m_ = cv.take_n<float>(P, "AdamW m");
      v_ = cv.take_n<float>(P, "AdamW v");
      gradnorm_scratch_ = cv.take(sum_squares_scratch_bytes(P), "grad-norm scratch");
      norm_out_ = cv.take_n<double>(1, "grad-norm result");
    } else {
      compute_ = cv.take(size_t(P) * es, "compute weights");
    }
  };
  Carver count_p(nullptr);
  carve_params(count_p);
  params_arena_ = std::make_unique<DeviceArena>(count_p.total(), "qwen3 parameters");
  Carver real_p(params_arena_.get());
  carve_params(real_p);

  // Activation arena, sized the same way.
  Carver count_a(nullptr);
  carve_activations(count_a);
  acts_arena_ = std::make_unique<DeviceArena>(count_a.total(), "qwen3 activations");
  Carver real_a(acts_arena_.get());
  carve_activations(real_a);

  // Upload: zero everything (padding included), then each tensor as f32 (masters, or the f32 copy
  // of a frozen model) or bf16 (a frozen bf16 model); the bf16 copy of a trainable model is the
  // masters rounded on the device (the same RNE rounding as the CPU's).
  if (trainable_) {
    for (float* p : {master_, grads_, m_, v_}) CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(P) * 4, stream_));
  }
  CUDA_CHECK(cudaMemsetAsync(compute_, 0, size_t(P) * es, stream_));
  const bool f32_target = trainable_ || dt_ == DType::f32;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& t = weights.tensors()[i].value;
    const Tensor host = f32_target ? (t.dtype() == DType::f32 ? t : t.to(DType::f32)) : t.to(DType::bf16);
    char* dst = f32_target ? reinterpret_cast<char*>(trainable_ ? master_ : static_cast<float*>(compute_))
                           : static_cast<char*>(compute_);
    const size_t bytes = size_t(params_[i].numel) * dtype_size(host.dtype());
    CUDA_CHECK(cudaMemcpyAsync(dst + size_t(params_[i].offset) * dtype_size(host.dtype()), host.raw_data(), bytes,
                               cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // `host` may be a temporary
  }
  if (trainable_ && dt_ == DType::bf16) convert(master_, DType::f32, compute_, DType::bf16, P, stream_);
  CUDA_CHECK(cudaEventRecord(staging_free_, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Qwen3CudaModel::~Qwen3CudaModel() {
  // Never throws: errors here are ignored (the arenas free their memory in their destructors).
  if (stream_) cudaStreamSynchronize(stream_);
  if (staging_) cudaFreeHost(staging_);
  if (staging_free_) cudaEventDestroy(staging_free_);
  blas_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

void Qwen3CudaModel::carve_activations(Carver& cv) {
  const model::Qwen3Config& c = config_;
  const int64_t n = budget_.max_tokens, r = budget_.max_rows, Bm = budget_.max_batch;
  const int64_t H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim, Hq = c.num_attention_heads,
                Hkv = c.num_key_value_heads, qd = c.q_dim(), kvd = c.kv_dim(), L = c.num_hidden_layers,
                V = c.vocab_size;
  const size_t es = dtype_size(dt_);
  auto act = [&](int64_t elems, const char* what) { return cv.take(size_t(elems) * es, what); };

  ids_ = cv.take_n<int32_t>(n, "ids");
  positions_ = cv.take_n<int32_t>(n, "positions");
  rows_ = cv.take_n<int32_t>(r, "rows");
  masks_ = static_cast<DeviceMask*>(cv.take(size_t(Bm) * sizeof(DeviceMask), "masks"));
  rope_cos_ = cv.take_n<float>(n * hd / 2, "rope cos");
  rope_sin_ = cv.take_n<float>(n * hd / 2, "rope sin");

  xs_.assign(size_t(trainable_ ? L + 1 : 2), nullptr);
  for (auto& x : xs_) x = act(n * H, "residual stream");
  sets_.assign(size_t(trainable_ && !budget_.recompute ? L : 1), LayerActs{});
  for (auto& a : sets_) {
    a.rstd_in = cv.take_n<float>(n, "rstd_in");
    a.q_pre = act(n * qd, "q_pre");
    a.k_pre = act(n * kvd, "k_pre");
    a.q_rstd = cv.take_n<float>(n * Hq, "q_rstd");
    a.k_rstd = cv.take_n<float>(n * Hkv, "k_rstd");
    a.q = act(n * qd, "q");
    a.k = act(n * kvd, "k");
    a.v = act(n * kvd, "v");
    a.attn = act(n * qd, "attn");
    a.lse = cv.take_n<float>(n * Hq, "attention lse");
    a.x_mid = act(n * H, "x_mid");
    a.rstd_mid = cv.take_n<float>(n, "rstd_mid");
    a.gate = act(n * I, "gate");
    a.up = act(n * I, "up");
    if (trainable_ && !budget_.recompute) a.act = act(n * I, "swiglu output");
  }
  h_ = act(n * H, "norm output");
  act_ = act(n * I, "swiglu output");
  xf_ = act(r * H, "final stream rows");
  rstd_f_ = cv.take_n<float>(r, "final rstd");
  hf_ = act(r * H, "final norm output");
  logits_ = act(r * V, "logits");

  if (!trainable_) return;
  dx_ = act(n * H, "dx");
  dxm_ = act(n * H, "dx (block)");
  dh_f32_ = cv.take_n<float>(n * H, "dh (f32)");
  dh_dt_ = dt_ == DType::f32 ? static_cast<void*>(dh_f32_) : act(n * H, "dh");
  dact_ = act(n * I, "dact");
  dgate_ = act(n * I, "dgate");
  dup_ = act(n * I, "dup");
  dattn_ = act(n * qd, "dattn");
  dq_ = act(n * qd, "dq");
  dk_ = act(n * kvd, "dk");
  dv_ = act(n * kvd, "dv");
  dk_pre_ = act(n * kvd, "dk_pre");
  dhf_ = act(r * H, "dh final");
  dxf_ = act(r * H, "dx final rows");
  // The attention backward's scratch for the largest shapes of the budget (forward re-checks).
  attn_scratch_bytes_ = std::max(attention_backward_scratch_bytes(1, n, n, Hq, Hkv, hd),
                                 attention_backward_scratch_bytes(Bm, n / Bm, n / Bm, Hq, Hkv, hd));
  attn_scratch_ = cv.take(attn_scratch_bytes_, "attention backward scratch");
  rms_scratch_ = cv.take(std::max({rmsnorm_backward_scratch_bytes(n, H), rmsnorm_backward_scratch_bytes(n * Hq, hd),
                                    rmsnorm_backward_scratch_bytes(n * Hkv, hd), rmsnorm_backward_scratch_bytes(r, H)}),
                          "rmsnorm backward scratch");
}

// ---- accessors ----------------------------------------------------------------------------------------

const void* Qwen3CudaModel::w(int64_t i) const {
  return static_cast<const char*>(compute_) + size_t(params_[size_t(i)].offset) * dtype_size(dt_);
}

float* Qwen3CudaModel::g(int64_t i) const { return grads_ + params_[size_t(i)].offset; }

void* Qwen3CudaModel::x_buf(int64_t l) const { return trainable_ ? xs_[size_t(l)] : xs_[size_t(l % 2)]; }

void Qwen3CudaModel::synchronize() const { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

size_t Qwen3CudaModel::parameter_arena_bytes() const { return params_arena_->capacity(); }
size_t Qwen3CudaModel::activation_arena_bytes() const { return acts_arena_->capacity(); }

std::string Qwen3CudaModel::memory_report() const {
  int64_t numel = 0;
  for (const Param& p : params_) numel += p.numel;
  return params_arena_->report() + "; " + acts_arena_->report() + " (budget " + std::to_string(budget_.max_tokens) +
         " tokens, " + std::to_string(budget_.max_rows) + " logit rows" + (budget_.recompute ? ", recompute" : "") +
         "); " + std::to_string(numel) + " parameters, " + dtype_name(dt_) + " compute; total " +
         gib(parameter_arena_bytes() + activation_arena_bytes());
}

// ---- forward ------------------------------------------------------------------------------------------

const void* Qwen3CudaModel::forward(const Tensor& ids, const Tensor& positions, std::span<const MaskDescriptor> masks,
                                    const Tensor& rows, bool save_for_backward) {
  const model::Qwen3Config& c = config_;
  if (save_for_backward && !trainable_)
    OPDLM_FAIL("Qwen3CudaModel::forward: a frozen model keeps no activations (save_for_backward)");
  // Host validation, as the CPU model's.
  expect_cpu(ids, "ids");
  expect_dtype(ids, "ids", {DType::i32});
  expect_ndim(ids, "ids", 2);
  expect_cpu(positions, "positions");
  expect_dtype(positions, "positions", {DType::i32});
  expect_shape(positions, "positions", ids.shape(), "shape of 'ids'");
  const int64_t B = ids.size(0), T = ids.size(1), n = B * T;
  if (n < 1) OPDLM_FAIL("Qwen3CudaModel::forward: tensor 'ids' ", ids.describe(), " has no tokens");
  if (n > budget_.max_tokens || B > budget_.max_batch)
    OPDLM_FAIL("Qwen3CudaModel::forward: tensor 'ids' ", ids.describe(), " exceeds the activation budget (",
               budget_.max_tokens, " tokens, ", budget_.max_batch, " sequences)");
  const int32_t* pid = ids.data<int32_t>();
  const int32_t* ppos = positions.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (pid[i] < 0 || pid[i] >= c.vocab_size)
      OPDLM_FAIL("tensor 'ids' ", ids.describe(), " element [", i / T, ", ", i % T, "] is ", pid[i],
                 ", outside the vocabulary [0, ", c.vocab_size, ") (dimension 1 of 'model.embed_tokens.weight')");
    if (ppos[i] < 0)
      OPDLM_FAIL("tensor 'positions' ", positions.describe(), " element [", i / T, ", ", i % T, "] is ", ppos[i],
                 ", expected a position id >= 0");
  }
  if (masks.size() != 1 && static_cast<int64_t>(masks.size()) != B)
    OPDLM_FAIL("masks: got ", masks.size(), " descriptors, expected 1 or ", B, " (dimension 0 of 'ids')");
  for (size_t i = 0; i < masks.size(); ++i) masks[i].validate(T, T, "masks[" + std::to_string(i) + "]");
  const bool has_rows = rows.defined();
  int64_t n_rows = n;
  if (has_rows) {
    expect_cpu(rows, "rows");
    expect_dtype(rows, "rows", {DType::i32});
    expect_ndim(rows, "rows", 1);
    n_rows = rows.numel();
    const int32_t* r = rows.data<int32_t>();
    for (int64_t i = 0; i < n_rows; ++i)
      if (r[i] < 0 || r[i] >= n)
        OPDLM_FAIL("tensor 'rows' ", rows.describe(), " element ", i, " is ", r[i], ", outside the token rows [0, ",
                   n, ") (B*T of 'ids')");
  }
  if (n_rows > budget_.max_rows)
    OPDLM_FAIL("Qwen3CudaModel::forward: ", n_rows, " logit rows exceed the activation budget's ", budget_.max_rows);
  const int64_t H = c.hidden_size, V = c.vocab_size, hd = c.head_dim, L = c.num_hidden_layers;
  if (save_for_backward) {
    const size_t need = attention_backward_scratch_bytes(B, T, T, c.num_attention_heads, c.num_key_value_heads, hd);
    if (need > attn_scratch_bytes_)
      OPDLM_FAIL("Qwen3CudaModel::forward: the attention backward for B = ", B, ", T = ", T, " needs ", need,
                 " bytes of scratch, the budget reserved ", attn_scratch_bytes_);
  }

  // Upload through the pinned staging (the previous upload must have been read first).
  CUDA_CHECK(cudaEventSynchronize(staging_free_));
  int32_t* s_ids = staging_;
  int32_t* s_pos = staging_ + budget_.max_tokens;
  int32_t* s_rows = staging_ + 2 * budget_.max_tokens;
  std::memcpy(s_ids, pid, size_t(n) * 4);
  std::memcpy(s_pos, ppos, size_t(n) * 4);
  CUDA_CHECK(cudaMemcpyAsync(ids_, s_ids, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaMemcpyAsync(positions_, s_pos, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
  if (has_rows && n_rows > 0) {
    std::memcpy(s_rows, rows.data<int32_t>(), size_t(n_rows) * 4);
    CUDA_CHECK(cudaMemcpyAsync(rows_, s_rows, size_t(n_rows) * 4, cudaMemcpyHostToDevice, stream_));
  }
  upload_masks(masks, masks_, stream_);
  CUDA_CHECK(cudaEventRecord(staging_free_, stream_));
  B_ = B, T_ = T, n_rows_ = n_rows, n_masks_ = static_cast<int64_t>(masks.size()), has_rows_ = has_rows;
  saved_ = false;

  rope_table(positions_, n, hd, c.rope_theta, rope_cos_, rope_sin_, stream_);
  embedding_forward(w(embed_idx_), ids_, x_buf(0), n, V, H, dt_, stream_);
  for (int64_t l = 0; l < L; ++l) {
    const LayerActs& a = save_for_backward && !budget_.recompute ? sets_[size_t(l)] : sets_[0];
    layer_forward(l, x_buf(l), a, x_buf(l + 1));
  }

  // Final norm and LM head on the logit rows only (rows gathered with the embedding lookup: the
  // stream [n, H] is a table of n rows).
  const void* xf = x_buf(L);
  if (has_rows && n_rows > 0) {
    embedding_forward(x_buf(L), rows_, xf_, n_rows, n, H, dt_, stream_);
    xf = xf_;
  }
  if (n_rows > 0) {
    rmsnorm_forward(xf, w(norm_idx_), hf_, rstd_f_, n_rows, H, c.rms_norm_eps, dt_, stream_);
    blas_->linear_forward(hf_, w(head_idx_), logits_, n_rows, H, V, dt_, stream_);
  }
  saved_ = save_for_backward;
  return logits_;
}

// One decoder layer, x_in -> x_out, filling `a` (as Qwen3Model::run without cache).
void Qwen3CudaModel::layer_forward(int64_t l, const void* x_in, const LayerActs& a, void* x_out) {
  const model::Qwen3Config& c = config_;
  const LayerIdx& L = layer_idx_[size_t(l)];
  const int64_t n = B_ * T_, H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim,
                Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, qd = c.q_dim(), kvd = c.kv_dim();
  const double eps = c.rms_norm_eps, scale = 1.0 / std::sqrt(double(hd));

  // Attention block: q/k/v projections, per-head RMSNorm on q and k, RoPE, GQA attention.
  rmsnorm_forward(x_in, w(L.input_norm), h_, a.rstd_in, n, H, eps, dt_, stream_);
  blas_->linear_forward(h_, w(L.q_proj), a.q_pre, n, H, qd, dt_, stream_);
  blas_->linear_forward(h_, w(L.k_proj), a.k_pre, n, H, kvd, dt_, stream_);
  blas_->linear_forward(h_, w(L.v_proj), a.v, n, H, kvd, dt_, stream_);
  rmsnorm_forward(a.q_pre, w(L.q_norm), a.q, a.q_rstd, n * Hq, hd, eps, dt_, stream_);
  rmsnorm_forward(a.k_pre, w(L.k_norm), a.k, a.k_rstd, n * Hkv, hd, eps, dt_, stream_);
  rope_inplace(a.q, rope_cos_, rope_sin_, n, Hq, hd, false, dt_, stream_);
  rope_inplace(a.k, rope_cos_, rope_sin_, n, Hkv, hd, false, dt_, stream_);
  attention_forward(a.q, a.k, a.v, a.attn, a.lse, B_, T_, T_, Hq, Hkv, hd, masks_, n_masks_, scale, dt_, stream_);
  // x_mid = o + x_in (the CPU's x + o: addition commutes, same bits).
  blas_->linear_forward(a.attn, w(L.o_proj), a.x_mid, n, qd, H, dt_, stream_);
  add_inplace(a.x_mid, x_in, n * H, dt_, stream_);

  // MLP block: RMSNorm, SwiGLU, down projection, residual.
  rmsnorm_forward(a.x_mid, w(L.post_norm), h_, a.rstd_mid, n, H, eps, dt_, stream_);
  blas_->linear_forward(h_, w(L.gate_proj), a.gate, n, H, I, dt_, stream_);
  blas_->linear_forward(h_, w(L.up_proj), a.up, n, H, I, dt_, stream_);
  void* h_act = a.act ? a.act : act_;
  swiglu_forward(a.gate, a.up, h_act, n * I, dt_, stream_);
  blas_->linear_forward(h_act, w(L.down_proj), x_out, n, I, H, dt_, stream_);
  add_inplace(x_out, a.x_mid, n * H, dt_, stream_);
}

Tensor Qwen3CudaModel::download_logits(DType dt) const {
  const int64_t V = config_.vocab_size;
  Tensor host = Tensor::empty({n_rows_, V}, dt_);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (n_rows_ > 0) CUDA_CHECK(cudaMemcpy(host.raw_data(), logits_, host.nbytes(), cudaMemcpyDeviceToHost));
  return host.to(dt);
}

// ---- backward -----------------------------------------------------------------------------------------

void* Qwen3CudaModel::column_input_grad(std::initializer_list<std::pair<const void*, int64_t>> terms, int64_t n) {
  bool first = true;
  for (const auto& [dy, wi] : terms) {
    const Shape& s = params_[size_t(wi)].shape;  // [out, in]
    // dh (+)= dy [n, out] @ W [out, in], f32 accumulation across the terms, in term order.
    blas_->gemm(dy, false, w(wi), false, dh_f32_, n, s[1], s[0], dt_, DType::f32, 1.0f, first ? 0.0f : 1.0f,
                stream_);
    first = false;
  }
  if (dt_ == DType::f32) return dh_f32_;
  convert(dh_f32_, DType::f32, dh_dt_, dt_, n * config_.hidden_size, stream_);
  return dh_dt_;
}

void Qwen3CudaModel::backward(const void* dlogits) {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel::backward: a frozen model has no gradients");
  if (!saved_) OPDLM_FAIL("Qwen3CudaModel::backward: call forward(..., save_for_backward = true) first");
  if (n_rows_ > 0 && !dlogits) OPDLM_FAIL("Qwen3CudaModel::backward: dlogits is null");
  const model::Qwen3Config& c = config_;
  const int64_t n = B_ * T_, H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  const size_t es = dtype_size(dt_);

  // LM head and final norm (the head's gradient lands in the embedding's when tied), then the rows'
  // gradients scattered into the stream gradient dx [n, H] (repeated rows add up, in row order).
  if (n_rows_ > 0) {
    const void* xf = has_rows_ ? xf_ : x_buf(L);
    blas_->linear_backward(hf_, w(head_idx_), dlogits, dhf_, g(head_idx_), n_rows_, H, V, dt_, stream_);
    rmsnorm_backward(xf, w(norm_idx_), rstd_f_, dhf_, has_rows_ ? dxf_ : dx_, g(norm_idx_), n_rows_, H, dt_, stream_, rms_scratch_);
    if (has_rows_) {
      CUDA_CHECK(cudaMemsetAsync(dh_f32_, 0, size_t(n * H) * 4, stream_));
      embedding_backward(rows_, dxf_, dh_f32_, n_rows_, n, H, dt_, stream_);
      convert(dh_f32_, DType::f32, dx_, dt_, n * H, stream_);
    }
  } else {
    CUDA_CHECK(cudaMemsetAsync(dx_, 0, size_t(n * H) * es, stream_));
  }

  for (int64_t l = L - 1; l >= 0; --l) {
    if (budget_.recompute) {
      // Rebuild this layer's activations from its saved input (the output goes to a free buffer).
      layer_forward(l, x_buf(l), sets_[0], dxm_);
      layer_backward(l, x_buf(l), sets_[0]);
    } else {
      layer_backward(l, x_buf(l), sets_[size_t(l)]);
    }
  }
  embedding_backward(ids_, dx_, g(embed_idx_), n, V, H, dt_, stream_);
}

// One layer's backward: dx_ (the stream gradient after the layer) becomes the gradient before it.
void Qwen3CudaModel::layer_backward(int64_t l, const void* x_in, const LayerActs& a) {
  const model::Qwen3Config& c = config_;
  const LayerIdx& L = layer_idx_[size_t(l)];
  const int64_t n = B_ * T_, H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim,
                Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, qd = c.q_dim(), kvd = c.kv_dim();
  const double eps = c.rms_norm_eps, scale = 1.0 / std::sqrt(double(hd));

  // MLP block (norm output and SwiGLU product recomputed, as the CPU model).
  rmsnorm_forward(a.x_mid, w(L.post_norm), h_, nullptr, n, H, eps, dt_, stream_);
  const void* h_act = a.act;
  if (!h_act) {
    swiglu_forward(a.gate, a.up, act_, n * I, dt_, stream_);
    h_act = act_;
  }
  blas_->linear_backward(h_act, w(L.down_proj), dx_, dact_, g(L.down_proj), n, I, H, dt_, stream_);
  swiglu_backward(a.gate, a.up, dact_, dgate_, dup_, n * I, dt_, stream_);
  blas_->linear_backward(h_, w(L.gate_proj), dgate_, nullptr, g(L.gate_proj), n, H, I, dt_, stream_);
  blas_->linear_backward(h_, w(L.up_proj), dup_, nullptr, g(L.up_proj), n, H, I, dt_, stream_);
  const void* dh2 = column_input_grad({{dgate_, L.gate_proj}, {dup_, L.up_proj}}, n);
  rmsnorm_backward(a.x_mid, w(L.post_norm), a.rstd_mid, dh2, dxm_, g(L.post_norm), n, H, dt_, stream_, rms_scratch_);
  add_inplace(dx_, dxm_, n * H, dt_, stream_);

  // Attention block.
  blas_->linear_backward(a.attn, w(L.o_proj), dx_, dattn_, g(L.o_proj), n, qd, H, dt_, stream_);
  attention_backward(a.q, a.k, a.v, a.attn, a.lse, dattn_, dq_, dk_, dv_, B_, T_, T_, Hq, Hkv, hd, masks_, n_masks_,
                     scale, attn_scratch_, dt_, stream_);
  rope_inplace(dq_, rope_cos_, rope_sin_, n, Hq, hd, /*inverse=*/true, dt_, stream_);
  rope_inplace(dk_, rope_cos_, rope_sin_, n, Hkv, hd, /*inverse=*/true, dt_, stream_);
  void* dq_pre = dattn_;  // dattn is dead once the attention backward has read it
  rmsnorm_backward(a.q_pre, w(L.q_norm), a.q_rstd, dq_, dq_pre, g(L.q_norm), n * Hq, hd, dt_, stream_, rms_scratch_);
  rmsnorm_backward(a.k_pre, w(L.k_norm), a.k_rstd, dk_, dk_pre_, g(L.k_norm), n * Hkv, hd, dt_, stream_, rms_scratch_);
  rmsnorm_forward(x_in, w(L.input_norm), h_, nullptr, n, H, eps, dt_, stream_);
  blas_->linear_backward(h_, w(L.q_proj), dq_pre, nullptr, g(L.q_proj), n, H, qd, dt_, stream_);
  blas_->linear_backward(h_, w(L.k_proj), dk_pre_, nullptr, g(L.k_proj), n, H, kvd, dt_, stream_);
  blas_->linear_backward(h_, w(L.v_proj), dv_, nullptr, g(L.v_proj), n, H, kvd, dt_, stream_);
  const void* dh1 = column_input_grad({{dq_pre, L.q_proj}, {dk_pre_, L.k_proj}, {dv_, L.v_proj}}, n);
  rmsnorm_backward(x_in, w(L.input_norm), a.rstd_in, dh1, dxm_, g(L.input_norm), n, H, dt_, stream_, rms_scratch_);
  add_inplace(dx_, dxm_, n * H, dt_, stream_);
}

// ---- gradients and the optimizer ----------------------------------------------------------------------

void Qwen3CudaModel::zero_grads() {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel: a frozen model has no gradients");
  CUDA_CHECK(cudaMemsetAsync(grads_, 0, size_t(flat_numel_) * 4, stream_));
}

void Qwen3CudaModel::scale_grads(float scale) {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel: a frozen model has no gradients");
  scale_inplace(grads_, scale, flat_numel_, DType::f32, stream_);
}

double Qwen3CudaModel::grad_norm() {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel: a frozen model has no gradients");
  sum_squares(grads_, flat_numel_, norm_out_, gradnorm_scratch_, stream_);
  double host = 0;
  CUDA_CHECK(cudaMemcpyAsync(&host, norm_out_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return std::sqrt(host);
}

void Qwen3CudaModel::adamw_step(int64_t step, const ops::AdamWConfig& cfg) {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel::adamw_step: a frozen model has no optimizer state");
  if (step < 1) OPDLM_FAIL("Qwen3CudaModel::adamw_step: step is ", step, ", expected >= 1 (1-based)");
  // Padding elements have zero weight, gradient and moments, and stay zero.
  cuda::adamw_step(master_, grads_, m_, v_, flat_numel_, step, cfg, dt_ == DType::bf16 ? compute_ : nullptr,
                   stream_);
}

// ---- host copies --------------------------------------------------------------------------------------

model::Qwen3Weights Qwen3CudaModel::download_flat(const float* f32_flat, const void* dt_flat, DType flat_dt,
                                                  DType dt) const {
  if (dt != DType::f32 && dt != DType::f64)
    OPDLM_FAIL("Qwen3CudaModel: download dtype ", dtype_name(dt), " unsupported; expected f32 or f64");
  Tensor flat = Tensor::empty({flat_numel_}, flat_dt);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  const void* src = flat_dt == DType::f32 ? static_cast<const void*>(f32_flat) : dt_flat;
  CUDA_CHECK(cudaMemcpy(flat.raw_data(), src, flat.nbytes(), cudaMemcpyDeviceToHost));
  model::Qwen3Weights out(config_, dt);
  for (const Param& p : params_) out.get(p.name) = flat.slice(p.offset, p.offset + p.numel).view(p.shape).to(dt).clone();
  return out;
}

model::Qwen3Weights Qwen3CudaModel::download_weights(DType dt) const {
  if (trainable_) return download_flat(master_, nullptr, DType::f32, dt);
  return download_flat(static_cast<const float*>(compute_), compute_, dt_, dt);
}

model::Qwen3Weights Qwen3CudaModel::download_grads(DType dt) const {
  if (!trainable_) OPDLM_FAIL("Qwen3CudaModel: a frozen model has no gradients");
  return download_flat(grads_, nullptr, DType::f32, dt);
}

}  // namespace opdlm::cuda
