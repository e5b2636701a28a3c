// Qwen3CudaModel against the CPU Qwen3Model: logits and every parameter gradient on a tiny random
// model (tied and untied, causal and training masks, a subset of logit rows with a repeat), in f32
// (tight) and bf16 mixed precision (bf16 tolerances); activation recomputation and frozen models give
// the same bits; and three OPD optimizer steps on one training row (forward KL against the CPU
// teacher's log-probs, AdamW) match the CPU student's losses and final weights.
#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_test_util.hpp"
#include "opdlm/model/cuda/qwen3_cuda.hpp"
#include "opdlm/model/qwen3.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "opdlm/train/opd_rows.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using model::Qwen3Config;
using model::Qwen3Weights;
using ops::MaskDescriptor;

// ---- fixtures ----------------------------------------------------------------------------------------

// 2 layers, hidden 64, GQA 4/2 with head_dim 16, FFN 96, an odd vocabulary (301: not a multiple of 32).
Qwen3Config tiny_config(bool tied) {
  Qwen3Config c = test::tiny_qwen3_config(301, 64, 96, 4, 2, 16, 2);
  c.rope_theta = 1e4;
  c.tie_word_embeddings = tied;
  c.mask_token_id = 300;
  c.pad_token_id = 0;
  return c;
}

// f32 weights: matrices uniform in [-0.25, 0.25), norm gains in [0.8, 1.2) (their gradients matter).
Qwen3Weights random_weights(const Qwen3Config& c, uint32_t seed) {
  Qwen3Weights w(c, DType::f32);
  uint32_t s = seed;
  for (auto& [name, t] : w.tensors()) {
    const bool norm = t.ndim() == 1;
    t = test::random_tensor(t.shape(), s++, norm ? 0.8 : -0.25, norm ? 1.2 : 0.25, DType::f32);
  }
  return w;
}

// The same values in f64 (bf16: rounded to bf16 first, what the GPU's compute copy holds).
Qwen3Weights widened(const Qwen3Weights& w, DType rounding) {
  Qwen3Weights out(w.config(), DType::f64);
  for (const auto& nt : w.tensors()) {
    const Tensor v = rounding == DType::bf16 ? nt.value.to(DType::bf16) : nt.value;
    out.get(nt.name) = v.to(DType::f64);
  }
  return out;
}

struct Batch {
  Tensor ids, positions;
  std::vector<MaskDescriptor> masks;
};

// B = 2, T = 19. causal: row 1 left-padded by 3 (pads at position 1, as the CPU tests). training: two
// OPD rows built by the trainer's own build_row_inputs (row 1 with pad_left 2).
Batch make_batch(const Qwen3Config& c, bool training) {
  const int64_t B = 2, T = 19;
  Batch b;
  if (!training) {
    b.ids = test::random_ids({B, T}, 11, int32_t(c.vocab_size));
    std::vector<int32_t> pos;
    for (int64_t r = 0; r < B; ++r) {
      const int64_t pad = r == 1 ? 3 : 0;
      for (int64_t t = 0; t < T; ++t) pos.push_back(t < pad ? 1 : int32_t(t - pad));
    }
    b.positions = Tensor::from_vector(pos, {B, T});
    b.masks = {MaskDescriptor::causal(0), MaskDescriptor::causal(3)};
    return b;
  }
  train::TrainingRow r0, r1;
  r0.prompt = {5, 17, 42, 9, 100};
  r0.x0 = {7, 8, 9, 10, 11, 12, 13};
  r0.masked = {1, 1, 0, 1, 0, 1, 1};
  r1.prompt = {77, 3, 250};
  r1.pad_left = 2;
  r1.x0 = {20, 21, 22, 23, 24, 25, 26};
  r1.masked = {0, 1, 1, 1, 1, 0, 1};
  const auto a = train::build_row_inputs(r0, 4, int32_t(c.mask_token_id), 0);
  const auto d = train::build_row_inputs(r1, 4, int32_t(c.mask_token_id), 0);
  EXPECT_EQ(a.ids.size(1), T);
  EXPECT_EQ(d.ids.size(1), T);
  std::vector<int32_t> ids, pos;
  for (const auto* in : {&a, &d})
    for (int64_t t = 0; t < T; ++t) ids.push_back(in->ids.data<int32_t>()[t]), pos.push_back(in->positions.data<int32_t>()[t]);
  b.ids = Tensor::from_vector(ids, {B, T});
  b.positions = Tensor::from_vector(pos, {B, T});
  b.masks = {a.mask, d.mask};
  return b;
}

// Logit rows: both sequences, one repeated (its gradient must add up).
Tensor logit_rows() { return Tensor::from_vector(std::vector<int32_t>{3, 7, 21, 37, 7, 30, 18}, {7}); }

// Compares every gradient tensor; one PARITY row for the worst tensor, and a failure per tensor out of
// tolerance. f32: elementwise, max |got - want| <= rtol * max |want|. bf16: norm-wise, ||got - want||_2
// <= rtol * ||want||_2: every activation and activation gradient is rounded to bf16 (2^-9 relative)
// at each stage, and reductions over many rows with cancellation (the per-head norm gains sum n*heads
// products) leave single elements far off in relative terms while the tensor as a whole is right.
void compare_grads(const std::string& op, DType dt, const Qwen3Weights& got, const Qwen3Weights& want, double rtol) {
  const bool normwise = dt == DType::bf16;
  gpu_test::ErrorStats worst;
  std::string worst_name;
  double worst_ratio = -1;
  for (const auto& nt : want.tensors()) {
    gpu_test::ErrorStats st = gpu_test::compare(got.get(nt.name), nt.value);
    if (normwise && st.nonfinite == 0) {
      const auto g = got.get(nt.name).to_f64_vector(), w = nt.value.to_f64_vector();
      double d2 = 0, w2 = 0;
      for (size_t i = 0; i < w.size(); ++i) d2 += (g[i] - w[i]) * (g[i] - w[i]), w2 += w[i] * w[i];
      st.max_abs = std::sqrt(d2), st.ref_max = std::sqrt(w2), st.max_rel = st.max_abs / std::max(st.ref_max, 1e-30);
    }
    const double ratio = st.nonfinite ? 1e300 : st.max_abs / std::max(st.ref_max, 1e-30);
    EXPECT_TRUE(st.nonfinite == 0 && st.max_abs <= rtol * st.ref_max)
        << op << " " << nt.name << (normwise ? ": ||diff|| " : ": max_abs ") << st.max_abs
        << (normwise ? " ||ref|| " : " ref_max ") << st.ref_max << " at " << st.worst;
    if (ratio > worst_ratio) worst_ratio = ratio, worst = st, worst_name = nt.name;
  }
  gpu_test::parity(op + (normwise ? " (l2)" : ""), dt, "worst " + worst_name, worst, 0.0, rtol);
}

std::string case_name(bool tied, bool training) {
  return std::string(tied ? "tied" : "untied") + (training ? " training" : " causal") + " B2 T19 rows7";
}

// ---- logits and gradients against the CPU ------------------------------------------------------------

void check_against_cpu(DType dt, bool tied, bool training) {
  const Qwen3Config c = tiny_config(tied);
  const Qwen3Weights w = random_weights(c, tied ? 3 : 4);
  const Batch b = make_batch(c, training);
  const Tensor rows = logit_rows();
  const int64_t n_rows = rows.numel(), V = c.vocab_size;

  // CPU reference in f64 on the values the GPU computes with.
  model::Qwen3Model cpu = model::Qwen3Model::student(widened(w, dt));
  model::Qwen3Activations acts;
  const Tensor want_logits = cpu.forward(b.ids, b.positions, b.masks, rows, &acts);
  // dlogits exactly representable in the compute dtype.
  const Tensor dl = test::random_tensor({n_rows, V}, 99, -1.0, 1.0, DType::f64).to(dt).to(DType::f64);
  cpu.backward(acts, dl);

  cuda::Qwen3CudaModel gpu(w, dt, true, {b.ids.numel(), n_rows, 2, false});
  gpu.forward(b.ids, b.positions, b.masks, rows, true);
  const Tensor got_logits = gpu.download_logits();
  const DeviceBuffer d_dl = gpu_test::upload(dl, dt);
  CUDA_CHECK(cudaDeviceSynchronize());
  gpu.zero_grads();
  gpu.backward(d_dl.get());
  const Qwen3Weights got_grads = gpu.download_grads(DType::f64);

  const std::string shape = case_name(tied, training);
  const double rl = dt == DType::f32 ? 1e-4 : 3e-2, rg = dt == DType::f32 ? 1e-4 : 5e-2;
  EXPECT_PARITY("qwen3_fwd.logits", dt, shape, got_logits, want_logits, 0.0, rl);
  compare_grads("qwen3_bwd.grads " + std::string(tied ? "tied" : "untied") + (training ? " train" : " causal"), dt,
                got_grads, cpu.grads(), rg);
}

TEST(Qwen3Cuda, F32MatchesCpu) {
  for (bool tied : {true, false})
    for (bool training : {false, true}) check_against_cpu(DType::f32, tied, training);
}

TEST(Qwen3Cuda, Bf16MatchesCpuWithinBf16Tolerance) {
  for (bool tied : {true, false})
    for (bool training : {false, true}) check_against_cpu(DType::bf16, tied, training);
}

// ---- recomputation and frozen models: the same kernels on the same inputs, the same bits --------------

TEST(Qwen3Cuda, RecomputeAndFrozenGiveTheSameBits) {
  for (DType dt : {DType::f32, DType::bf16}) {
    const Qwen3Config c = tiny_config(true);
    const Qwen3Weights w = random_weights(c, 5);
    const Batch b = make_batch(c, true);
    const int64_t n = b.ids.numel(), V = c.vocab_size;
    const Tensor dl = test::random_tensor({n, V}, 98, -1.0, 1.0, DType::f64);
    const DeviceBuffer d_dl = gpu_test::upload(dl, dt);
    CUDA_CHECK(cudaDeviceSynchronize());

    cuda::Qwen3CudaModel keep(w, dt, true, {n, n, 2, false});
    cuda::Qwen3CudaModel rec(w, dt, true, {n, n, 2, true});
    cuda::Qwen3CudaModel frozen(w, dt, false, {n, n, 2, false});
    std::printf("[qwen3_cuda] %s keep: %s\n[qwen3_cuda] %s recompute: %s\n", dtype_name(dt),
                keep.memory_report().c_str(), dtype_name(dt), rec.memory_report().c_str());
    EXPECT_LT(rec.activation_arena_bytes(), keep.activation_arena_bytes());
    Tensor logits[3];
    int i = 0;
    for (cuda::Qwen3CudaModel* m : {&keep, &rec, &frozen}) {
      m->forward(b.ids, b.positions, b.masks, Tensor(), m->trainable());  // all rows
      logits[i++] = m->download_logits(DType::f32);
      if (m->trainable()) {
        m->zero_grads();
        m->backward(d_dl.get());
      }
    }
    for (int j = 1; j < 3; ++j)
      EXPECT_EQ(std::memcmp(logits[0].raw_data(), logits[j].raw_data(), logits[0].nbytes()), 0)
          << dtype_name(dt) << " logits of model " << j << " differ from the model that keeps activations";
    const Qwen3Weights ga = keep.download_grads(), gb = rec.download_grads();
    for (const auto& nt : ga.tensors())
      EXPECT_EQ(std::memcmp(nt.value.raw_data(), gb.get(nt.name).raw_data(), nt.value.nbytes()), 0)
          << dtype_name(dt) << " recomputed gradient of " << nt.name << " differs";
    // The gradient norm against the host sum of squares of the downloaded gradients.
    double ss = 0;
    for (const auto& nt : ga.tensors())
      for (float x : nt.value.to_f32_vector()) ss += double(x) * double(x);
    EXPECT_NEAR(keep.grad_norm(), std::sqrt(ss), 1e-5 * std::sqrt(ss)) << dtype_name(dt);
    // A frozen model's weights are its compute copy.
    const Qwen3Weights fw = frozen.download_weights();
    for (const auto& nt : w.tensors()) {
      const Tensor want = dt == DType::bf16 ? gpu_test::round_bf16(nt.value) : nt.value;
      EXPECT_EQ(std::memcmp(fw.get(nt.name).raw_data(), want.raw_data(), want.nbytes()), 0)
          << dtype_name(dt) << " frozen weight " << nt.name;
    }
  }
}

// ---- bad inputs: host-side errors that name the tensor, the element and the limit ---------------------

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Qwen3Cuda, BadInputsAreErrorsNamingTheTensor) {
  const Qwen3Config c = tiny_config(true);
  const Qwen3Weights w = random_weights(c, 5);
  const Batch b = make_batch(c, false);
  const int64_t n = b.ids.numel();
  cuda::Qwen3CudaModel m(w, DType::f32, true, {n, n, 2, false});
  cuda::Qwen3CudaModel frozen(w, DType::f32, false, {n, n, 2, false});

  Tensor bad_ids = b.ids.clone();
  bad_ids.data<int32_t>()[5] = int32_t(c.vocab_size);
  const std::string vocab = error_of([&] { m.forward(bad_ids, b.positions, b.masks); });
  EXPECT_NE(vocab.find("'ids'"), std::string::npos) << vocab;
  EXPECT_NE(vocab.find("outside the vocabulary [0, 301)"), std::string::npos) << vocab;

  const Tensor bad_rows = Tensor::from_vector(std::vector<int32_t>{0, int32_t(n)}, {2});
  const std::string rows = error_of([&] { m.forward(b.ids, b.positions, b.masks, bad_rows); });
  EXPECT_NE(rows.find("'rows'"), std::string::npos) << rows;
  EXPECT_NE(rows.find("outside the token rows"), std::string::npos) << rows;

  const Tensor big_ids = test::random_ids({3, 19}, 12, int32_t(c.vocab_size));
  Tensor big_pos = Tensor::zeros({3, 19}, DType::i32);
  const std::string budget = error_of([&] { m.forward(big_ids, big_pos, std::span(b.masks.data(), 1)); });
  EXPECT_NE(budget.find("exceeds the activation budget"), std::string::npos) << budget;

  const std::string frozen_bwd = error_of([&] {
    frozen.forward(b.ids, b.positions, b.masks);
    frozen.backward(nullptr);
  });
  EXPECT_NE(frozen_bwd.find("frozen model has no gradients"), std::string::npos) << frozen_bwd;
  const std::string no_save = error_of([&] {
    m.forward(b.ids, b.positions, b.masks);
    m.backward(nullptr);
  });
  EXPECT_NE(no_save.find("save_for_backward = true"), std::string::npos) << no_save;
}

// ---- OPD row steps against the CPU student -----------------------------------------------------------

TEST(Qwen3Cuda, OpdRowStepsMatchCpu) {
  const Qwen3Config c = tiny_config(true);
  const model::Qwen3Model teacher = model::Qwen3Model::teacher(widened(random_weights(c, 101), DType::f32));
  const Qwen3Weights w = random_weights(c, 7);
  const int64_t V = c.vocab_size;

  train::TrainingRow row;
  row.sample_id = 3;
  row.prompt = {5, 17, 42, 9, 100};
  row.x0 = {31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42};
  row.masked = {1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1};
  train::RowLossSpec spec;
  spec.divergence.kind = ops::Divergence::forward_kl;
  spec.block_size = 4;
  spec.mask_id = int32_t(c.mask_token_id);
  spec.pad_id = 0;
  const auto js = train::loss_positions(row, spec);
  const int64_t nj = static_cast<int64_t>(js.size());
  ASSERT_GT(nj, 0);
  const Tensor tlp = train::teacher_logprobs(teacher, row.prompt, row.x0, js);  // f64 [nj, V]
  const train::RowInputs in = train::build_row_inputs(row, spec.block_size, spec.mask_id, spec.pad_id);
  std::vector<int32_t> rv;
  for (int64_t j : js) rv.push_back(int32_t(row.L0() + row.L1() + j));
  const Tensor rows = Tensor::from_vector(rv, {nj});
  // eps = 1 keeps the update smooth in the gradient (lr * m / (sqrt(v) + 1)): with the default 1e-8
  // an element whose gradient is ~1e-7 moves by +-lr on the sign of rounding noise, which would make
  // the weight comparison measure that noise. The AdamW kernel itself is checked bit for bit against
  // the CPU in GpuElementwise.AdamwMatchesCpuBitForBit.
  ops::AdamWConfig cfg;
  cfg.lr = 1e-2;
  cfg.eps = 1.0;
  cfg.weight_decay = 0.01;
  const int steps = 3;

  // CPU student (f64 on the same values): row_loss = forward + forward KL + backward; AdamW per tensor.
  model::Qwen3Model cpu = model::Qwen3Model::student(widened(w, DType::f32));
  Qwen3Weights m = cpu.weights().zeros_like(), v = cpu.weights().zeros_like();
  model::Qwen3Activations acts;
  std::vector<double> cpu_loss, gpu_loss;
  for (int s = 1; s <= steps; ++s) {
    cpu.zero_grads();
    cpu_loss.push_back(train::row_loss(cpu, tlp, row, spec, 1.0, acts).loss);
    auto& ws = cpu.weights().tensors();
    for (size_t i = 0; i < ws.size(); ++i)
      ops::adamw_step(ws[i].value, cpu.grads().tensors()[i].value, m.tensors()[i].value, v.tensors()[i].value, s, cfg);
  }

  // GPU student: the teacher's log-probs uploaded once; the loss on the device ops.
  cuda::Qwen3CudaModel gpu(w, DType::f32, true, {in.ids.numel(), nj, 1, false});
  const DeviceBuffer d_tlp = gpu_test::upload(tlp, DType::f32);
  const DeviceBuffer d_dloss = gpu_test::upload(Tensor::full({nj}, 1.0 / double(nj), DType::f64), DType::f32);
  DeviceBuffer d_D(size_t(nj) * 4), d_lse(size_t(nj) * 4), d_dlogits(size_t(nj * V) * 4);
  DeviceBuffer d_scratch(std::max<size_t>(cuda::divergence_scratch_bytes(nj, V, spec.divergence), 1));
  CUDA_CHECK(cudaDeviceSynchronize());
  for (int s = 1; s <= steps; ++s) {
    gpu.zero_grads();
    const void* logits = gpu.forward(in.ids, in.positions, std::span(&in.mask, 1), rows, true);
    cuda::divergence_forward(d_tlp.get(), logits, spec.divergence, d_D.as<float>(), d_lse.as<float>(), nj, V,
                             d_scratch.get(), DType::f32, gpu.stream());
    cuda::divergence_backward(d_tlp.get(), logits, d_lse.as<float>(), d_dloss.as<float>(), spec.divergence,
                              d_dlogits.get(), nj, V, d_scratch.get(), DType::f32, gpu.stream());
    gpu.backward(d_dlogits.get());
    gpu.adamw_step(s, cfg);
    const Tensor D = gpu_test::download(d_D.get(), DType::f32, {nj});  // synchronises the device
    double sum = 0;
    for (int64_t i = 0; i < nj; ++i) sum += D.item(i);
    gpu_loss.push_back(sum / double(nj));
  }

  std::printf("[qwen3_cuda] OPD row steps (%lld loss positions, lr %g):\n", static_cast<long long>(nj), cfg.lr);
  for (int s = 0; s < steps; ++s)
    std::printf("[qwen3_cuda]   step %d  cpu loss %.9f  gpu loss %.9f  rel diff %.2e\n", s + 1, cpu_loss[size_t(s)],
                gpu_loss[size_t(s)], std::fabs(gpu_loss[size_t(s)] - cpu_loss[size_t(s)]) / std::fabs(cpu_loss[size_t(s)]));
  EXPECT_PARITY("opd_row_step.loss", DType::f32, "3 steps", Tensor::from_vector(gpu_loss, {steps}),
                Tensor::from_vector(cpu_loss, {steps}), 0.0, 1e-4);
  EXPECT_NE(cpu_loss.front(), cpu_loss.back()) << "the steps changed nothing";

  // Final weights: masters against the CPU's f64 weights.
  const Qwen3Weights got = gpu.download_weights(DType::f64);
  gpu_test::ErrorStats worst;
  std::string worst_name;
  for (const auto& nt : cpu.weights().tensors()) {
    const gpu_test::ErrorStats st = gpu_test::compare(got.get(nt.name), nt.value);
    EXPECT_TRUE(st.nonfinite == 0 && st.max_abs <= 1e-5) << nt.name << ": max_abs " << st.max_abs << " at " << st.worst;
    if (st.max_abs >= worst.max_abs) worst = st, worst_name = nt.name;
  }
  gpu_test::parity("opd_row_step.weights", DType::f32, "worst " + worst_name, worst, 1e-5, 0.0);
}

}  // namespace
}  // namespace opdlm
