// Qwen3CudaModel: the Qwen3 decoder of model/qwen3.hpp on one GPU (no tensor parallelism), built from
// the CUDA ops: a training forward that keeps what its backward needs in a device arena, the backward
// (f32 parameter gradients accumulated), the gradient norm, and AdamW on fp32 master weights with a
// bf16 (or f32) compute copy refreshed by every step. All device memory is carved from two arenas
// sized exactly at construction (parameters + optimizer state, activations for a token budget), so
// forward, backward and the step never allocate.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "opdlm/model/qwen3_config.hpp"
#include "opdlm/model/qwen3_weights.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/mask.hpp"
#include "opdlm/tensor/tensor.hpp"

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

namespace opdlm::cuda {

class BlasLt;
class DeviceArena;
struct DeviceMask;

// What the activation arena must hold: every forward of the model has at most max_tokens = B*T token
// rows, max_batch sequences (0: max_tokens) and max_rows logit rows (0: max_tokens).
// recompute = true keeps only each layer's input stream in a training forward and recomputes the
// layer in the backward (one layer's activations instead of all of them; about one forward more).
struct ActivationBudget {
  int64_t max_tokens = 0;
  int64_t max_rows = 0;
  int64_t max_batch = 0;
  bool recompute = false;
};

class Qwen3CudaModel {
 public:
  // weights: CPU f32 or f64 (f64 is rounded to f32: the masters are f32). compute: DType::f32 or
  // DType::bf16, the dtype of the weights' compute copy and of every activation and activation
  // gradient. trainable = false: a frozen model (no masters, gradients or moments; the compute copy
  // only, and no activations kept for a backward). Makes its own stream and cuBLASLt handle on the
  // current device; synchronises before returning.
  Qwen3CudaModel(const model::Qwen3Weights& weights, DType compute, bool trainable, ActivationBudget budget);
  ~Qwen3CudaModel();
  Qwen3CudaModel(const Qwen3CudaModel&) = delete;
  Qwen3CudaModel& operator=(const Qwen3CudaModel&) = delete;

  const model::Qwen3Config& config() const { return config_; }
  DType compute_dtype() const { return dt_; }
  bool trainable() const { return trainable_; }
  const ActivationBudget& budget() const { return budget_; }
  cudaStream_t stream() const { return stream_; }
  BlasLt& blas() { return *blas_; }

  // ---- forward / backward ----------------------------------------------------------------------------
  // As model::Qwen3Model::forward: ids, positions host i32 [B, T]; masks 1 or B descriptors valid for
  // Tq = Tk = T; rows: optional host i32 [n_rows] indices into the B*T token rows (undefined = all).
  // Everything is validated on the host (ids inside the vocabulary, positions >= 0, rows inside B*T,
  // the budget) and uploaded through pinned staging on the model's stream. Returns the device logits
  // [n_rows, V] (compute dtype), valid until the next forward; nothing is synchronised.
  // save_for_backward (trainable models only): keep what backward() needs.
  const void* forward(const Tensor& ids, const Tensor& positions, std::span<const ops::MaskDescriptor> masks,
                      const Tensor& rows = Tensor(), bool save_for_backward = false);
  // Logits of the last forward: device pointer, row count, and a synchronising CPU copy ([n_rows, V],
  // f32 or f64).
  const void* logits() const { return logits_; }
  int64_t logit_rows() const { return n_rows_; }
  Tensor download_logits(DType dt = DType::f64) const;
  // dlogits: device [n_rows, V] (compute dtype) for the last forward, which must have been called
  // with save_for_backward. ACCUMULATES every f32 parameter gradient (the tied head's into the
  // embedding's). Enqueued on the stream, not synchronised.
  void backward(const void* dlogits);

  // ---- gradients and the optimizer -------------------------------------------------------------------
  void zero_grads();
  // grads *= scale (e.g. clipping or 1/micro-batches).
  void scale_grads(float scale);
  // sqrt(sum of squares) of every gradient (deterministic); synchronises.
  double grad_norm();
  // One AdamW step (torch semantics, 1-based step) on every master weight, then the compute copy is
  // refreshed (bf16: rounded in the same kernel).
  void adamw_step(int64_t step, const ops::AdamWConfig& cfg);

  // ---- host copies (synchronising; for checks and checkpoints) -----------------------------------------
  // The weights (masters of a trainable model, else the compute copy widened) in `dt` (f32 or f64).
  model::Qwen3Weights download_weights(DType dt = DType::f32) const;
  // The gradients under the weights' names (f32 or f64).
  model::Qwen3Weights download_grads(DType dt = DType::f32) const;

  void synchronize() const;
  // Both arenas' sizes and use (and the parameter count).
  std::string memory_report() const;
  size_t parameter_arena_bytes() const;
  size_t activation_arena_bytes() const;

 private:
  // One tensor of the flat parameter buffers: elements [offset, offset + numel).
  struct Param {
    std::string name;
    Shape shape;
    int64_t offset = 0, numel = 0;
  };
  using LayerIdx = model::Qwen3TensorIndex::Layer;
  // What one layer's backward needs (device pointers; lse and rstd are f32, the rest compute dtype).
  struct LayerActs {
    float* rstd_in = nullptr;
    void *q_pre = nullptr, *k_pre = nullptr;
    float *q_rstd = nullptr, *k_rstd = nullptr;
    void *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr;
    float* lse = nullptr;
    void* x_mid = nullptr;
    float* rstd_mid = nullptr;
    void *gate = nullptr, *up = nullptr;
    // SwiGLU output kept for the down projection's weight gradient (not recomputed, unlike the CPU
    // model: the same bits, 2 x n x I bytes per layer for one kernel less); null with recompute.
    void* act = nullptr;
  };
  class Carver;

  const void* w(int64_t i) const;  // compute copy of tensor i
  float* g(int64_t i) const;       // f32 gradient of tensor i
  void allocate_and_upload(const model::Qwen3Weights& weights);  // the constructor's device part
  void carve_activations(Carver& c);
  void layer_forward(int64_t l, const void* x_in, const LayerActs& a, void* x_out);
  void layer_backward(int64_t l, const void* x_in, const LayerActs& a);
  // dh [n, H] = sum_j dy_j @ W_j over the column terms (f32 accumulation, one rounding to dt);
  // returns the compute-dtype buffer holding it.
  void* column_input_grad(std::initializer_list<std::pair<const void*, int64_t>> terms, int64_t n);
  // x stream buffer l (the input of layer l; l = L: the final stream).
  void* x_buf(int64_t l) const;
  model::Qwen3Weights download_flat(const float* f32_flat, const void* dt_flat, DType flat_dt, DType dt) const;

  model::Qwen3Config config_;
  DType dt_ = DType::f32;
  bool trainable_ = false;
  ActivationBudget budget_;
  std::vector<Param> params_;
  std::vector<LayerIdx> layer_idx_;
  int64_t embed_idx_ = 0, norm_idx_ = 0, head_idx_ = 0;
  int64_t flat_numel_ = 0;  // padded total of the flat buffers

  cudaStream_t stream_ = nullptr;
  cudaEvent_t staging_free_ = nullptr;  // the last upload from the pinned staging has been read
  std::unique_ptr<BlasLt> blas_;
  std::unique_ptr<DeviceArena> params_arena_, acts_arena_;

  // ---- parameter arena ----
  float* master_ = nullptr;   // f32 masters (trainable), flat
  void* compute_ = nullptr;   // compute copy (dt), flat; == master_ for a trainable f32 model
  float* grads_ = nullptr;    // f32 gradients, flat
  float *m_ = nullptr, *v_ = nullptr;
  void* gradnorm_scratch_ = nullptr;
  double* norm_out_ = nullptr;

  // ---- activation arena ----
  int32_t *ids_ = nullptr, *positions_ = nullptr, *rows_ = nullptr;
  DeviceMask* masks_ = nullptr;
  float *rope_cos_ = nullptr, *rope_sin_ = nullptr;
  std::vector<void*> xs_;         // stream buffers: L + 1 (trainable) or 2 (ping-pong)
  std::vector<LayerActs> sets_;   // L (trainable, no recompute) or 1
  void *h_ = nullptr, *act_ = nullptr;           // forward scratch: norm output [n, H], SwiGLU [n, I]
  void *xf_ = nullptr, *hf_ = nullptr;           // gathered final stream and final-norm output [rows, H]
  float* rstd_f_ = nullptr;
  void* logits_ = nullptr;
  // backward (trainable)
  void *dx_ = nullptr, *dxm_ = nullptr, *dh_dt_ = nullptr, *dact_ = nullptr, *dgate_ = nullptr, *dup_ = nullptr;
  void *dattn_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr, *dk_pre_ = nullptr;
  void *dhf_ = nullptr, *dxf_ = nullptr;
  float* dh_f32_ = nullptr;
  void* attn_scratch_ = nullptr;
  size_t attn_scratch_bytes_ = 0;
  void* rms_scratch_ = nullptr;  // rmsnorm_backward's row-parallel dw partials (largest norm of the budget)
  int32_t* staging_ = nullptr;  // pinned host: ids, positions, rows

  // ---- the last forward ----
  int64_t B_ = 0, T_ = 0, n_rows_ = 0, n_masks_ = 0;
  bool has_rows_ = false, saved_ = false;
};

}  // namespace opdlm::cuda
