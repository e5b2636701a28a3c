// GPU parity of the loss kernels (src/ops/cuda/losses.cu): row log-sum-exp, log-softmax,
// cross-entropy (ignore rows, weights) and every divergence kind (teacher -inf entries, top-K ties),
// forward and backward, f32 and bf16, against the CPU ops in f64 on the same inputs.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gpu_test_util.hpp"
#include "opdlm/ops/cross_entropy.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "opdlm/ops/kl.hpp"
#include "opdlm/ops/softmax.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::download;
using gpu_test::Tol;
using gpu_test::tol_for;
using gpu_test::upload;

constexpr double kInf = std::numeric_limits<double>::infinity();
const DType kDts[] = {DType::f32, DType::bf16};

// Row statistics and losses are f32 whatever the storage dtype: the inputs are exact either way.
constexpr Tol kStatTol{1e-6, 1e-5};
constexpr Tol kLseTol{1e-6, 2e-6};
// Per-element outputs stored in dt: bf16 adds one rounding (2^-9 relative) per element.
Tol elem_tol(DType dt) { return tol_for(dt, Tol{1e-7, 1e-5}, Tol{1e-6, 8e-3}); }

std::string shape_of(int64_t n, int64_t V) { return std::to_string(n) + "x" + std::to_string(V); }

// The values the GPU sees for storage dtype `dt`, widened to f64 for the CPU reference.
Tensor seen(const Tensor& x, DType dt) {
  return (dt == DType::bf16 ? gpu_test::round_bf16(x) : x.to(DType::f32)).to(DType::f64);
}

double& at(Tensor& t, int64_t i, int64_t v) { return t.data<double>()[i * t.size(1) + v]; }

// Teacher log-probs [n, V] (f64): a log-softmax of random logits (quantised to steps of 0.5 when
// `ties`, so many values tie), with -inf on the last 3 columns (vocabulary padding), on a scattered
// pattern, and on all but 2 tokens of row 1 (fewer finite tokens than K for top-K).
Tensor make_teacher(int64_t n, int64_t V, uint32_t seed, bool ties) {
  Tensor logits = test::random_tensor({n, V}, seed, -4.0, 4.0);
  if (ties)
    for (int64_t i = 0; i < logits.numel(); ++i) {
      double& x = logits.data<double>()[i];
      x = std::round(x * 2) / 2;
    }
  Tensor t = ops::log_softmax_forward(logits);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v) {
      const bool pad = V > 4 && v >= V - 3;
      const bool scattered = (i % 3 == 0) && (v % 7 == 3);
      const bool sparse_row = n > 1 && V > 4 && i == 1 && v != 0 && v != V / 2;
      if (pad || scattered || sparse_row) at(t, i, v) = -kInf;
    }
  return t;
}

// Student logits [n, V] (f64): random, -inf on the first padding column (where the teacher is -inf
// too); with `inf_on_support` also one -inf where the teacher has mass (only reverse KL and JSD stay
// finite there).
Tensor make_student(int64_t n, int64_t V, uint32_t seed, bool inf_on_support) {
  Tensor s = test::random_tensor({n, V}, seed, -4.0, 4.0);
  if (V > 4) at(s, 0, V - 3) = -kInf;
  if (inf_on_support && n > 2 && V > 4) at(s, 2, 1) = -kInf;  // row 2 is not a scattered -inf row at v = 1
  return s;
}

// ---- log-sum-exp and log-softmax ---------------------------------------------------------------------

TEST(GpuLosses, LogSumExpAndLogSoftmax) {
  const struct {
    int64_t n, V;
  } shapes[] = {{1, 1}, {9, 7}, {37, 3001}, {4, 151936}};
  for (DType dt : kDts)
    for (const auto& sh : shapes) {
      const int64_t n = sh.n, V = sh.V;
      Tensor x = test::random_tensor({n, V}, 11, -6.0, 6.0);
      if (n > 2) {
        for (int64_t v = 0; v < V; ++v) at(x, 0, v) = -kInf;  // an all -inf row: lse -inf, log-softmax NaN
        at(x, 1, V / 3) = -kInf;
      }
      x = seen(x, dt);
      const Tensor lse_ref = ops::logsumexp_rows(x);
      const Tensor y_ref = ops::log_softmax_forward(x);
      DeviceBuffer dx = upload(x, dt), dlse(size_t(n) * 4), dy(size_t(n * V) * dtype_size(dt));
      cuda::logsumexp_rows(dx.get(), dlse.as<float>(), n, V, dt, nullptr);
      cuda::log_softmax_forward(dx.get(), dy.get(), n, V, dt, nullptr);
      EXPECT_PARITY("logsumexp_rows", dt, shape_of(n, V), download(dlse.get(), DType::f32, {n}), lse_ref,
                    kLseTol.atol, kLseTol.rtol);
      const Tol t = tol_for(dt, Tol{1e-6, 1e-6}, Tol{1e-6, 8e-3});
      EXPECT_PARITY("log_softmax_fwd", dt, shape_of(n, V), download(dy.get(), dt, {n, V}), y_ref, t.atol, t.rtol);
      // In place (y == x).
      cuda::log_softmax_forward(dx.get(), dx.get(), n, V, dt, nullptr);
      EXPECT_PARITY("log_softmax_fwd.inplace", dt, shape_of(n, V), download(dx.get(), dt, {n, V}), y_ref, t.atol,
                    t.rtol);
    }
}

// ---- cross-entropy ---------------------------------------------------------------------------------

void check_cross_entropy(int64_t n, int64_t V, DType dt, uint32_t seed, bool weighted, int32_t ignore_index) {
  const std::string shape = shape_of(n, V) + (weighted ? " w" : "") + " ign" + std::to_string(ignore_index);
  const Tensor logits = seen(test::random_tensor({n, V}, seed, -5.0, 5.0), dt);
  Tensor targets = test::random_ids({n}, seed + 1, static_cast<int32_t>(V));
  for (int64_t i = 0; i < n; ++i)
    if (i % 5 == 2) targets.data<int32_t>()[i] = ignore_index;
  // Weights and the upstream gradient are f32 on the device: the reference sees the same values.
  const Tensor weight =
      weighted ? test::random_tensor({n}, seed + 2, 0.1, 2.0).to(DType::f32).to(DType::f64) : Tensor();
  const Tensor dloss = test::random_tensor({n}, seed + 3, 0.5, 1.5).to(DType::f32).to(DType::f64);

  Tensor lse_ref;
  const Tensor loss_ref = ops::cross_entropy_forward(logits, targets, weight, &lse_ref, ignore_index);
  const Tensor dz_ref = ops::cross_entropy_backward(logits, targets, weight, lse_ref, dloss, ignore_index);

  DeviceBuffer dz = upload(logits, dt), dtg = upload(targets, DType::i32), dg = upload(dloss, DType::f32);
  DeviceBuffer dw = weighted ? upload(weight, DType::f32) : DeviceBuffer();
  DeviceBuffer dloss_out(size_t(n) * 4), dlse(size_t(n) * 4), dgrad(size_t(n * V) * dtype_size(dt));
  cuda::cross_entropy_forward(dz.get(), dtg.as<int32_t>(), dw.as<float>(), dloss_out.as<float>(), dlse.as<float>(), n,
                              V, ignore_index, dt, nullptr);
  cuda::cross_entropy_backward(dz.get(), dtg.as<int32_t>(), dw.as<float>(), dlse.as<float>(), dg.as<float>(),
                               dgrad.get(), n, V, ignore_index, dt, nullptr);
  EXPECT_PARITY("ce_fwd.loss", dt, shape, download(dloss_out.get(), DType::f32, {n}), loss_ref, kStatTol.atol,
                kStatTol.rtol);
  EXPECT_PARITY("ce_fwd.lse", dt, shape, download(dlse.get(), DType::f32, {n}), lse_ref, kLseTol.atol, kLseTol.rtol);
  const Tol t = elem_tol(dt);
  EXPECT_PARITY("ce_bwd.dlogits", dt, shape, download(dgrad.get(), dt, {n, V}), dz_ref, t.atol, t.rtol);

  // lse is nullable in the forward: the loss is the same without it.
  DeviceBuffer dloss2(size_t(n) * 4);
  cuda::cross_entropy_forward(dz.get(), dtg.as<int32_t>(), dw.as<float>(), dloss2.as<float>(), nullptr, n, V,
                              ignore_index, dt, nullptr);
  EXPECT_EQ(download(dloss2.get(), DType::f32, {n}).to_f64_vector(),
            download(dloss_out.get(), DType::f32, {n}).to_f64_vector());
}

TEST(GpuLosses, CrossEntropy) {
  for (DType dt : kDts) {
    check_cross_entropy(1, 1, dt, 5, false, ops::kIgnoreIndex);
    check_cross_entropy(23, 3001, dt, 7, false, ops::kIgnoreIndex);
    check_cross_entropy(23, 3001, dt, 9, true, ops::kIgnoreIndex);
    check_cross_entropy(17, 1000, dt, 13, true, 7);  // an in-vocabulary ignore_index
  }
}

// The real shape in the training dtype only: the CPU side (conversions, f64 reference) costs ~2 s a case.
TEST(GpuLosses, CrossEntropyVocab151936) { check_cross_entropy(64, 151936, DType::bf16, 21, true, ops::kIgnoreIndex); }

// Odd vocabularies: rows start at every 16-byte phase, so the one-pass forward and the 16-byte backward
// run their scalar heads and tails. The backward also writes to a gradient buffer one element off
// (z and dz rows out of phase: the scalar loop), which must give the same bits as the vector path.
void check_cross_entropy_odd(int64_t n, int64_t V, DType dt, uint32_t seed) {
  const std::string shape = shape_of(n, V) + " odd";
  Tensor raw = test::random_tensor({n, V}, seed, -5.0, 5.0);
  // Row 0 rises to its max at the end (a new running max almost every step); row 1 falls from it.
  for (int64_t v = 0; v < V && n > 1; ++v) {
    at(raw, 0, v) = -5.0 + 10.0 * double(v) / double(V);
    at(raw, 1, v) = 5.0 - 10.0 * double(v) / double(V);
  }
  if (n > 2 && V > 3) at(raw, 2, 0) = at(raw, 2, V - 1) = -kInf;  // -inf in a head and in a tail
  const Tensor logits = seen(raw, dt);
  Tensor targets = test::random_ids({n}, seed + 1, static_cast<int32_t>(V));
  if (n > 2) targets.data<int32_t>()[2] = static_cast<int32_t>(V / 2);  // a finite target in the -inf row
  if (n > 3) targets.data<int32_t>()[3] = static_cast<int32_t>(V - 1);  // the target in a row's tail
  if (n > 4) targets.data<int32_t>()[4] = 0;                            // ... and in its head
  const Tensor dloss = test::random_tensor({n}, seed + 3, 0.5, 1.5).to(DType::f32).to(DType::f64);
  Tensor lse_ref;
  const Tensor loss_ref = ops::cross_entropy_forward(logits, targets, Tensor(), &lse_ref, ops::kIgnoreIndex);
  const Tensor dz_ref = ops::cross_entropy_backward(logits, targets, Tensor(), lse_ref, dloss, ops::kIgnoreIndex);

  const size_t es = dtype_size(dt), bytes = size_t(n * V) * es;
  DeviceBuffer dz = upload(logits, dt), dtg = upload(targets, DType::i32), dg = upload(dloss, DType::f32);
  DeviceBuffer dloss_out(size_t(n) * 4), dlse(size_t(n) * 4), dgrad(bytes), dgrad_off(bytes + es);
  void* grad_off = static_cast<char*>(dgrad_off.get()) + es;
  cuda::cross_entropy_forward(dz.get(), dtg.as<int32_t>(), nullptr, dloss_out.as<float>(), dlse.as<float>(), n, V,
                              ops::kIgnoreIndex, dt, nullptr);
  cuda::cross_entropy_backward(dz.get(), dtg.as<int32_t>(), nullptr, dlse.as<float>(), dg.as<float>(), dgrad.get(), n,
                               V, ops::kIgnoreIndex, dt, nullptr);
  cuda::cross_entropy_backward(dz.get(), dtg.as<int32_t>(), nullptr, dlse.as<float>(), dg.as<float>(), grad_off, n, V,
                               ops::kIgnoreIndex, dt, nullptr);
  EXPECT_PARITY("ce_fwd.loss.oddV", dt, shape, download(dloss_out.get(), DType::f32, {n}), loss_ref, kStatTol.atol,
                kStatTol.rtol);
  EXPECT_PARITY("ce_fwd.lse.oddV", dt, shape, download(dlse.get(), DType::f32, {n}), lse_ref, kLseTol.atol,
                kLseTol.rtol);
  const Tol t = elem_tol(dt);
  EXPECT_PARITY("ce_bwd.dlogits.oddV", dt, shape, download(dgrad.get(), dt, {n, V}), dz_ref, t.atol, t.rtol);
  std::vector<unsigned char> a(bytes), b(bytes);
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(a.data(), dgrad.get(), bytes, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(b.data(), grad_off, bytes, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(a == b) << "ce_bwd: 16-byte and scalar paths differ, " << shape << " " << dtype_name(dt);
}

TEST(GpuLosses, CrossEntropyOddVocabulary) {
  for (DType dt : kDts) {
    check_cross_entropy_odd(9, 7, dt, 31);      // shorter than one 16-byte vector
    check_cross_entropy_odd(9, 9, dt, 33);
    check_cross_entropy_odd(13, 803, dt, 35);   // 8 * 100 + 3
    check_cross_entropy_odd(5, 151935, dt, 37); // the real vocabulary minus one
  }
}

// The one-pass log-sum-exp's special values: a NaN or +inf entry makes the row NaN (as the CPU's two
// passes), -inf entries anywhere add nothing, and an all -inf row gives -inf.
TEST(GpuLosses, LogSumExpSpecialValues) {
  const int64_t n = 6, V = 1001;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (DType dt : kDts) {
    Tensor x = test::random_tensor({n, V}, 41, -6.0, 6.0);
    at(x, 0, 500) = nan;
    at(x, 1, 3) = kInf;
    for (int64_t v = 0; v < V; v += 2) at(x, 2, v) = -kInf;
    for (int64_t v = 0; v < V; ++v) at(x, 3, v) = -kInf;
    at(x, 4, 0) = -kInf;
    at(x, 4, V - 1) = 30.0;  // the max last: every earlier term rescaled
    x = seen(x, dt);
    const Tensor ref = ops::logsumexp_rows(x);
    DeviceBuffer dx = upload(x, dt), dlse(size_t(n) * 4);
    cuda::logsumexp_rows(dx.get(), dlse.as<float>(), n, V, dt, nullptr);
    const Tensor got = download(dlse.get(), DType::f32, {n});
    EXPECT_TRUE(std::isnan(got.data<double>()[0])) << "NaN entry, " << dtype_name(dt);
    EXPECT_TRUE(std::isnan(got.data<double>()[1])) << "+inf entry, " << dtype_name(dt);
    EXPECT_TRUE(std::isinf(got.data<double>()[3]) && got.data<double>()[3] < 0) << "all -inf row, " << dtype_name(dt);
    for (int64_t i : {2, 4, 5})
      EXPECT_NEAR(got.data<double>()[i], ref.data<double>()[i], 1e-6 + 2e-6 * std::abs(ref.data<double>()[i]))
          << "row " << i << ", " << dtype_name(dt);
  }
}

// ---- the divergence family ---------------------------------------------------------------------------

std::string spec_name(const ops::DivergenceSpec& s) {
  char buf[64];
  switch (s.kind) {
    case ops::Divergence::mixture: std::snprintf(buf, sizeof buf, "mixture_w%g", s.reverse_weight); break;
    case ops::Divergence::jsd: std::snprintf(buf, sizeof buf, "jsd_a%g", s.jsd_alpha); break;
    case ops::Divergence::topk_forward_kl: std::snprintf(buf, sizeof buf, "topk%lld", (long long)s.topk); break;
    default: std::snprintf(buf, sizeof buf, "%s", ops::divergence_name(s.kind));
  }
  return buf;
}

ops::DivergenceSpec make_spec(ops::Divergence kind, double w = 0.0, double alpha = 0.5, int64_t k = 16) {
  ops::DivergenceSpec s;
  s.kind = kind;
  s.reverse_weight = w;
  s.jsd_alpha = alpha;
  s.topk = k;
  return s;
}

void check_divergence(const ops::DivergenceSpec& spec, int64_t n, int64_t V, DType dt, uint32_t seed, bool ties) {
  const bool inf_on_support = spec.kind == ops::Divergence::reverse_kl || spec.kind == ops::Divergence::jsd;
  const std::string op = "kl." + spec_name(spec);
  const std::string shape = shape_of(n, V) + (ties ? " ties" : "");
  const Tensor teacher = seen(make_teacher(n, V, seed, ties), dt);
  const Tensor student = seen(make_student(n, V, seed + 1, inf_on_support), dt);
  const Tensor dloss = test::random_tensor({n}, seed + 2, 0.5, 1.5).to(DType::f32).to(DType::f64);

  Tensor lse_ref;
  const Tensor D_ref = ops::divergence_forward(teacher, student, spec, &lse_ref);
  const Tensor ds_ref = ops::divergence_backward(teacher, student, lse_ref, dloss, spec);

  DeviceBuffer da = upload(teacher, dt), ds = upload(student, dt), dg = upload(dloss, DType::f32);
  DeviceBuffer dD(size_t(n) * 4), dlse(size_t(n) * 4), dgrad(size_t(n * V) * dtype_size(dt));
  DeviceBuffer scratch(cuda::divergence_scratch_bytes(n, V, spec));
  cuda::divergence_forward(da.get(), ds.get(), spec, dD.as<float>(), dlse.as<float>(), n, V, scratch.get(), dt,
                           nullptr);
  cuda::divergence_backward(da.get(), ds.get(), dlse.as<float>(), dg.as<float>(), spec, dgrad.get(), n, V,
                            scratch.get(), dt, nullptr);
  EXPECT_PARITY(op + ".D", dt, shape, download(dD.get(), DType::f32, {n}), D_ref, kStatTol.atol, kStatTol.rtol);
  EXPECT_PARITY(op + ".lse", dt, shape, download(dlse.get(), DType::f32, {n}), lse_ref, kLseTol.atol, kLseTol.rtol);
  const Tol t = elem_tol(dt);
  EXPECT_PARITY(op + ".dstudent", dt, shape, download(dgrad.get(), dt, {n, V}), ds_ref, t.atol, t.rtol);
}

TEST(GpuKl, EveryKindForwardBackward) {
  const ops::DivergenceSpec specs[] = {
      make_spec(ops::Divergence::forward_kl),
      make_spec(ops::Divergence::reverse_kl),
      make_spec(ops::Divergence::mixture, 0.3),
      make_spec(ops::Divergence::jsd, 0.0, 0.5),
      make_spec(ops::Divergence::jsd, 0.0, 0.2),
      make_spec(ops::Divergence::topk_forward_kl, 0.0, 0.5, 1),
      make_spec(ops::Divergence::topk_forward_kl, 0.0, 0.5, 5),
      make_spec(ops::Divergence::topk_forward_kl, 0.0, 0.5, 64),
  };
  for (DType dt : kDts)
    for (const auto& spec : specs) {
      check_divergence(spec, 13, 3001, dt, 31, false);
      check_divergence(spec, 6, 4099, dt, 37, true);
    }
}

TEST(GpuKl, TopKTiesAndSmallVocabularies) {
  for (DType dt : kDts) {
    for (int64_t k : {int64_t{1}, int64_t{5}, int64_t{7}})
      check_divergence(make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, k), 9, 7, dt, 41, true);
    // Every token kept (K = V): the forward KL over the whole vocabulary.
    check_divergence(make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, 1000), 5, 1000, dt, 43, true);
    // A row that is one tie: the first K tokens.
    for (int64_t k : {int64_t{1}, int64_t{5}, int64_t{600}}) {
      const int64_t n = 3, V = 1537;
      const auto spec = make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, k);
      const Tensor teacher = Tensor::full({n, V}, -std::log(double(V)), DType::f64);
      const Tensor student = seen(test::random_tensor({n, V}, 47, -3.0, 3.0), dt);
      const Tensor dloss = Tensor::full({n}, 1.0, DType::f64);
      Tensor lse_ref;
      const Tensor t_seen = seen(teacher, dt);
      const Tensor D_ref = ops::divergence_forward(t_seen, student, spec, &lse_ref);
      const Tensor ds_ref = ops::divergence_backward(t_seen, student, lse_ref, dloss, spec);
      DeviceBuffer da = upload(t_seen, dt), ds = upload(student, dt), dg = upload(dloss, DType::f32);
      DeviceBuffer dD(size_t(n) * 4), dlse(size_t(n) * 4), dgrad(size_t(n * V) * dtype_size(dt));
      DeviceBuffer scratch(cuda::divergence_scratch_bytes(n, V, spec));
      cuda::divergence_forward(da.get(), ds.get(), spec, dD.as<float>(), dlse.as<float>(), n, V, scratch.get(), dt,
                               nullptr);
      cuda::divergence_backward(da.get(), ds.get(), dlse.as<float>(), dg.as<float>(), spec, dgrad.get(), n, V,
                                scratch.get(), dt, nullptr);
      const std::string op = "kl." + spec_name(spec) + ".alltie";
      EXPECT_PARITY(op + ".D", dt, shape_of(n, V), download(dD.get(), DType::f32, {n}), D_ref, kStatTol.atol,
                    kStatTol.rtol);
      const Tol t = elem_tol(dt);
      EXPECT_PARITY(op + ".dstudent", dt, shape_of(n, V), download(dgrad.get(), dt, {n, V}), ds_ref, t.atol, t.rtol);
    }
  }
}

TEST(GpuKl, ForwardKlVocab151936) {
  check_divergence(make_spec(ops::Divergence::forward_kl), 64, 151936, DType::bf16, 53, false);
}

// Same launch, same bits; student_lse is nullable in the forward.
TEST(GpuKl, DeterministicAndNullableLse) {
  const int64_t n = 11, V = 5003;
  for (const auto& spec :
       {make_spec(ops::Divergence::jsd, 0, 0.2), make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, 5)}) {
    const DType dt = DType::bf16;
    const Tensor teacher = seen(make_teacher(n, V, 61, true), dt);
    const Tensor student = seen(make_student(n, V, 62, false), dt);
    const Tensor dloss = Tensor::full({n}, 1.0, DType::f64);
    DeviceBuffer da = upload(teacher, dt), ds = upload(student, dt), dg = upload(dloss, DType::f32);
    DeviceBuffer dD1(size_t(n) * 4), dD2(size_t(n) * 4), dlse(size_t(n) * 4);
    DeviceBuffer g1(size_t(n * V) * 2), g2(size_t(n * V) * 2);
    DeviceBuffer scratch(cuda::divergence_scratch_bytes(n, V, spec));
    cuda::divergence_forward(da.get(), ds.get(), spec, dD1.as<float>(), dlse.as<float>(), n, V, scratch.get(), dt,
                             nullptr);
    cuda::divergence_forward(da.get(), ds.get(), spec, dD2.as<float>(), nullptr, n, V, scratch.get(), dt, nullptr);
    cuda::divergence_backward(da.get(), ds.get(), dlse.as<float>(), dg.as<float>(), spec, g1.get(), n, V,
                              scratch.get(), dt, nullptr);
    cuda::divergence_backward(da.get(), ds.get(), dlse.as<float>(), dg.as<float>(), spec, g2.get(), n, V,
                              scratch.get(), dt, nullptr);
    EXPECT_EQ(download(dD1.get(), DType::f32, {n}).to_f64_vector(),
              download(dD2.get(), DType::f32, {n}).to_f64_vector())
        << spec_name(spec);
    EXPECT_EQ(download(g1.get(), dt, {n, V}).to_f64_vector(), download(g2.get(), dt, {n, V}).to_f64_vector())
        << spec_name(spec);
  }
}

// ---- argument checks -----------------------------------------------------------------------------------

TEST(GpuLosses, RejectsBadArgumentsAndSkipsEmptyInputs) {
  EXPECT_ERROR_HAS(cuda::logsumexp_rows(nullptr, nullptr, 2, 4, DType::f64, nullptr), "logsumexp_rows", "f64");
  EXPECT_ERROR_HAS(cuda::cross_entropy_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 2, 4, -100, DType::i32,
                                               nullptr),
                   "cross_entropy_forward", "i32");
  const auto top9 = make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, 9);  // K > V
  const auto jsd1 = make_spec(ops::Divergence::jsd, 0, 1.0);                  // alpha outside (0, 1)
  const auto top2 = make_spec(ops::Divergence::topk_forward_kl, 0, 0.5, 2);
  EXPECT_ERROR_HAS(cuda::divergence_forward(nullptr, nullptr, top9, nullptr, nullptr, 2, 4, nullptr, DType::f32,
                                            nullptr),
                   "divergence_forward", "topk");
  EXPECT_ERROR_HAS(cuda::divergence_backward(nullptr, nullptr, nullptr, nullptr, jsd1, nullptr, 2, 4, nullptr,
                                             DType::bf16, nullptr),
                   "divergence_backward", "jsd_alpha");
  DeviceBuffer buf(64);  // set but never read: the calls fail before any launch
  EXPECT_ERROR_HAS(cuda::divergence_forward(buf.get(), buf.get(), top2, buf.as<float>(), nullptr, 2, 4, nullptr,
                                            DType::f32, nullptr),
                   "divergence_forward", "scratch");
  EXPECT_ERROR_HAS(cuda::cross_entropy_backward(buf.get(), buf.as<int32_t>(), nullptr, nullptr, buf.as<float>(),
                                                buf.get(), 2, 4, -100, DType::f32, nullptr),
                   "cross_entropy_backward", "lse");
  // n == 0: nothing is launched (null pointers are never touched).
  const auto& spec = top2;
  EXPECT_EQ(cuda::divergence_scratch_bytes(0, 4, spec), 0u);
  cuda::logsumexp_rows(nullptr, nullptr, 0, 4, DType::f32, nullptr);
  cuda::log_softmax_forward(nullptr, nullptr, 0, 4, DType::bf16, nullptr);
  cuda::cross_entropy_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, -100, DType::f32, nullptr);
  cuda::cross_entropy_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, -100, DType::f32, nullptr);
  cuda::divergence_forward(nullptr, nullptr, spec, nullptr, nullptr, 0, 4, nullptr, DType::f32, nullptr);
  cuda::divergence_backward(nullptr, nullptr, nullptr, nullptr, spec, nullptr, 0, 4, nullptr, DType::bf16, nullptr);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace opdlm
