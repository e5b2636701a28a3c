// GPU parity of cuda::attention_forward / attention_backward against the CPU ops in f64 on the same
// inputs: every mask kind (causal with pads and a KV-cache offset, block_causal, training rows, per-row
// and shared descriptors), GQA, head dims 16 to 128 and odd lengths, f32 and bf16 (the v2 mma.sync kernels
// of attention_fa2.cu, v1's tensor-core and scalar kernels), plus run-to-run determinism of the backward.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gpu_test_util.hpp"
#include "opdlm/ops/attention.hpp"
#include "opdlm/ops/cuda/attention_cuda.hpp"
#include "opdlm/ops/mask.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using ops::MaskDescriptor;

struct AttnCase {
  std::string name;
  int64_t B, Tq, Tk, Hq, Hkv, D;
  std::vector<MaskDescriptor> masks;  // B of them, or 1 shared
};

size_t bytes_of(int64_t n, DType dt) { return size_t(n) * (dt == DType::bf16 ? 2 : 4); }

// Uniform inputs already representable in dt, widened to f64 (the CPU reference sees the GPU's values).
Tensor exact_input(const Shape& s, uint32_t seed, double lo, double hi, DType dt) {
  Tensor t = test::random_tensor(s, seed, lo, hi, DType::f64);
  return dt == DType::bf16 ? gpu_test::round_bf16(t).to(DType::f64) : t.to(DType::f32).to(DType::f64);
}

std::string shape_of(const AttnCase& c) {
  return c.name + " B" + std::to_string(c.B) + " T" + std::to_string(c.Tq) + "x" + std::to_string(c.Tk) + " H" +
         std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " D" + std::to_string(c.D);
}

// Which kernels a run selects through the environment (the attention calls read it on every call):
// the default (v2, the mma.sync kernels, for bf16 with D 64 / 128, else v1's tensor cores for bf16 with
// D % 16 == 0, else the scalar kernels), OPDLM_ATTN_SCALAR=1 or OPDLM_ATTN_IMPL=v1.
enum class Impl { standard, scalar, v1, v2 };

// Sets the variables of `impl` for the scope.
struct ImplEnv {
  explicit ImplEnv(Impl impl) {
    if (impl == Impl::scalar) setenv("OPDLM_ATTN_SCALAR", "1", 1);
    if (impl == Impl::v1) setenv("OPDLM_ATTN_IMPL", "v1", 1);
  }
  ~ImplEnv() {
    unsetenv("OPDLM_ATTN_SCALAR");
    unsetenv("OPDLM_ATTN_IMPL");
  }
};

const char* impl_tag(Impl impl) {
  switch (impl) {
    case Impl::scalar: return "_scalar";
    case Impl::v1: return "_v1";
    case Impl::v2: return "_v2";
    default: return "";
  }
}

// One dtype and kernel family: forward o and lse against the CPU, then the backward against the CPU fed
// the GPU's o and lse (both recompute from the same values), then the backward's run-to-run determinism.
void run_case(const AttnCase& c, DType dt, uint32_t seed, Impl impl) {
  const std::string tag = impl_tag(impl);
  SCOPED_TRACE(shape_of(c) + " " + dtype_name(dt) + tag);
  ImplEnv env(impl);
  const Shape qs{c.B, c.Tq, c.Hq, c.D}, ks{c.B, c.Tk, c.Hkv, c.D}, ls{c.B, c.Hq, c.Tq};
  const double scale = 1.0 / std::sqrt(double(c.D));
  Tensor q = exact_input(qs, seed + 1, -2.0, 2.0, dt);
  Tensor k = exact_input(ks, seed + 2, -2.0, 2.0, dt);
  Tensor v = exact_input(ks, seed + 3, -1.0, 1.0, dt);
  Tensor dout = exact_input(qs, seed + 4, -1.0, 1.0, dt);
  DeviceBuffer dq_in = gpu_test::upload(q, dt), dk_in = gpu_test::upload(k, dt), dv_in = gpu_test::upload(v, dt);
  DeviceBuffer ddout = gpu_test::upload(dout, dt);
  DeviceBuffer dmasks(sizeof(cuda::DeviceMask) * c.masks.size());
  cuda::upload_masks(c.masks, dmasks.as<cuda::DeviceMask>(), nullptr);
  const auto n_masks = static_cast<int64_t>(c.masks.size());
  const std::string shape = shape_of(c);
  const gpu_test::Tol o_tol = gpu_test::tol_for(dt, {2e-5, 1e-5}, {2e-3, 1e-2});
  const gpu_test::Tol lse_tol = gpu_test::tol_for(dt, {2e-5, 1e-5}, {1e-4, 1e-5});
  const gpu_test::Tol g_tol = gpu_test::tol_for(dt, {1e-5, 5e-5}, {1e-3, 1e-2});

  // ---- forward ----
  DeviceBuffer d_o(bytes_of(q.numel(), dt)), d_lse(sizeof(float) * size_t(c.B * c.Hq * c.Tq));
  cuda::attention_forward(dq_in.get(), dk_in.get(), dv_in.get(), d_o.get(), d_lse.as<float>(), c.B, c.Tq, c.Tk,
                          c.Hq, c.Hkv, c.D, dmasks.as<cuda::DeviceMask>(), n_masks, scale, dt, nullptr);
  Tensor o = gpu_test::download(d_o.get(), dt, qs);
  Tensor lse = gpu_test::download(d_lse.get(), DType::f32, ls);
  Tensor lse_ref;
  Tensor o_ref = ops::attention_forward(q, k, v, c.masks, scale, &lse_ref);
  EXPECT_PARITY("attention_fwd" + tag + ".o", dt, shape, o, o_ref, o_tol.atol, o_tol.rtol);
  EXPECT_PARITY("attention_fwd" + tag + ".lse", dt, shape, lse, lse_ref, lse_tol.atol, lse_tol.rtol);

  // ---- backward: the CPU gets the GPU's o and lse, so both recompute from the same values ----
  DeviceBuffer scratch(cuda::attention_backward_scratch_bytes(c.B, c.Tq, c.Tk, c.Hq, c.Hkv, c.D));
  DeviceBuffer d_dq(bytes_of(q.numel(), dt)), d_dk(bytes_of(k.numel(), dt)), d_dv(bytes_of(k.numel(), dt));
  // NaN-filled outputs: every element must be overwritten.
  for (DeviceBuffer* b : {&d_dq, &d_dk, &d_dv}) CUDA_CHECK(cudaMemset(b->get(), 0xff, b->bytes()));
  auto backward = [&] {
    cuda::attention_backward(dq_in.get(), dk_in.get(), dv_in.get(), d_o.get(), d_lse.as<float>(), ddout.get(),
                             d_dq.get(), d_dk.get(), d_dv.get(), c.B, c.Tq, c.Tk, c.Hq, c.Hkv, c.D,
                             dmasks.as<cuda::DeviceMask>(), n_masks, scale, scratch.get(), dt, nullptr);
  };
  backward();
  Tensor gq = gpu_test::download(d_dq.get(), dt, qs), gk = gpu_test::download(d_dk.get(), dt, ks),
         gv = gpu_test::download(d_dv.get(), dt, ks);
  Tensor rq, rk, rv;
  ops::attention_backward(q, k, v, o, lse, dout, c.masks, scale, rq, rk, rv);
  EXPECT_PARITY("attention_bwd" + tag + ".dq", dt, shape, gq, rq, g_tol.atol, g_tol.rtol);
  EXPECT_PARITY("attention_bwd" + tag + ".dk", dt, shape, gk, rk, g_tol.atol, g_tol.rtol);
  EXPECT_PARITY("attention_bwd" + tag + ".dv", dt, shape, gv, rv, g_tol.atol, g_tol.rtol);

  // Deterministic: a second run gives the same bits.
  std::vector<char> first(d_dk.bytes() + d_dv.bytes() + d_dq.bytes()), second(first.size());
  auto fetch = [&](std::vector<char>& out) {
    CUDA_CHECK(cudaDeviceSynchronize());
    size_t off = 0;
    for (DeviceBuffer* b : {&d_dq, &d_dk, &d_dv}) {
      CUDA_CHECK(cudaMemcpy(out.data() + off, b->get(), b->bytes(), cudaMemcpyDeviceToHost));
      off += b->bytes();
    }
  };
  fetch(first);
  backward();
  fetch(second);
  EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size()), 0) << "backward is not bitwise reproducible";
}

void run_both(const AttnCase& c, uint32_t seed) {
  for (MaskDescriptor m : c.masks) m.validate(c.Tq, c.Tk, c.name);
  run_case(c, DType::f32, seed, Impl::standard);
  if (c.D == 64 || c.D == 128) {
    // bf16 at these head dims defaults to v2: check it and v1's tensor-core kernels side by side.
    run_case(c, DType::bf16, seed, Impl::v2);
    run_case(c, DType::bf16, seed, Impl::v1);
  } else {
    run_case(c, DType::bf16, seed, Impl::standard);
  }
  if (c.D % 16 == 0) run_case(c, DType::bf16, seed, Impl::scalar);  // the default used tensor cores: check scalar too
}

// bf16 through v2 and v1 only (the shapes added for v2: tile edges, GQA groups, multi-tile decoding).
void run_v1_v2(const AttnCase& c, uint32_t seed) {
  for (MaskDescriptor m : c.masks) m.validate(c.Tq, c.Tk, c.name);
  run_case(c, DType::bf16, seed, Impl::v2);
  run_case(c, DType::bf16, seed, Impl::v1);
}

TEST(AttentionCuda, CausalOddLengthSharedMask) {
  run_both({"causal", 2, 37, 37, 4, 2, 16, {MaskDescriptor::causal(2)}}, 10);
}

TEST(AttentionCuda, CausalKvCacheDecodingPerRow) {
  // Tq < Tk: rows continue after q_offset cached positions; different pads and offsets per row.
  run_both({"causal_decode", 2, 5, 37, 4, 2, 64, {MaskDescriptor::causal(3, 32), MaskDescriptor::causal(0, 30)}},
           20);
  run_both({"causal_decode1", 3, 1, 70, 4, 2, 128,
            {MaskDescriptor::causal(5, 69), MaskDescriptor::causal(0, 40), MaskDescriptor::causal(33, 50)}},
           25);
}

TEST(AttentionCuda, BlockCausalPartialPromptBlock) {
  // b = 4, prompt 7 (not a multiple of b), pad_left 2; and a decoding row of the same grid.
  run_both({"block_causal", 2, 37, 37, 4, 2, 64, {MaskDescriptor::block_causal(4, 7, 2)}}, 30);
  run_both({"block_causal_dec", 1, 6, 37, 4, 2, 16, {MaskDescriptor::block_causal(4, 7, 2, 31)}}, 35);
}

TEST(AttentionCuda, TrainingMasksPerRowGqa) {
  // N = pad + prompt + 2 * response = 23 for every row.
  run_both({"training", 3, 23, 23, 4, 2, 128,
            {MaskDescriptor::training(4, 5, 8, 2), MaskDescriptor::training(4, 7, 8, 0),
             MaskDescriptor::training(4, 3, 8, 4)}},
           40);
  run_both({"training_shared", 2, 23, 23, 4, 2, 64, {MaskDescriptor::training(4, 5, 8, 2)}}, 45);
}

TEST(AttentionCuda, MixedKindsPerRowWideGroup) {
  // Three different descriptors, Hq = 4 query heads on one kv head, and a head dim (40) that is not a
  // multiple of 16 (the bf16 scalar kernel by default).
  const std::vector<MaskDescriptor> m{MaskDescriptor::causal(3), MaskDescriptor::block_causal(4, 9, 1),
                                      MaskDescriptor::block_causal(8, 5, 0)};
  run_both({"mixed", 3, 37, 37, 4, 1, 128, m}, 50);
  run_both({"mixed_d40", 3, 37, 37, 4, 1, 40, m}, 55);
}

TEST(AttentionCuda, NearRealShapes) {
  // The real head dim 128, lengths past several tiles: a training row of 256 (b = 32) and causal 300.
  run_both({"training_real", 1, 256, 256, 4, 2, 128, {MaskDescriptor::training(32, 61, 96, 3)}}, 60);
  run_both({"causal_real", 1, 300, 300, 2, 1, 128, {MaskDescriptor::causal(0)}}, 70);
}

TEST(AttentionCuda, V2TileEdgesAndGroups) {
  // Lengths around the 64-row / 64-key tiles of v2, a GQA group of 4, training masks with b = 4 and
  // b = 32 (two key ranges per noisy row), per-row pads, and KV-cache decoding over several key tiles.
  run_v1_v2({"v2_causal_t100", 2, 100, 100, 8, 2, 64, {MaskDescriptor::causal(0), MaskDescriptor::causal(7)}}, 80);
  run_v1_v2({"v2_causal_t64", 1, 64, 64, 2, 2, 128, {MaskDescriptor::causal(0)}}, 81);
  run_v1_v2({"v2_causal_t129", 1, 129, 129, 4, 1, 128, {MaskDescriptor::causal(65)}}, 82);
  run_v1_v2({"v2_training_b4", 2, 150, 150, 4, 2, 128,
             {MaskDescriptor::training(4, 33, 56, 5), MaskDescriptor::training(4, 38, 56, 0)}},
            83);
  run_v1_v2({"v2_training_b32", 2, 300, 300, 4, 2, 64,
             {MaskDescriptor::training(32, 70, 112, 6), MaskDescriptor::training(32, 76, 112, 0)}},
            84);
  run_v1_v2({"v2_decode", 2, 100, 300, 4, 2, 128, {MaskDescriptor::causal(3, 200), MaskDescriptor::causal(0, 150)}},
            85);
  run_v1_v2({"v2_block_causal_dec", 1, 37, 200, 4, 1, 64, {MaskDescriptor::block_causal(32, 90, 10, 163)}}, 86);
}

TEST(AttentionCuda, V2WideTileEdges) {
  // Around the 128-row query tiles (two m16 tiles per warp) and the 32-key tiles of its dQ kernel: rows
  // 127 / 128 / 129 / 257, keys 31 / 33, a GQA group of 8, training masks whose ranges end mid-tile, and
  // decoding with fewer rows than one warp's 32.
  run_v1_v2({"v2_causal_t127", 1, 127, 127, 2, 1, 128, {MaskDescriptor::causal(0)}}, 90);
  run_v1_v2({"v2_causal_t128", 2, 128, 128, 2, 2, 64, {MaskDescriptor::causal(0), MaskDescriptor::causal(5)}}, 91);
  run_v1_v2({"v2_causal_t257", 1, 257, 257, 8, 1, 128, {MaskDescriptor::causal(3)}}, 92);
  run_v1_v2({"v2_training_b8", 2, 200, 200, 4, 2, 128,
             {MaskDescriptor::training(8, 49, 72, 7), MaskDescriptor::training(8, 56, 72, 0)}},
            93);
  run_v1_v2({"v2_decode_k33", 1, 9, 33, 4, 2, 64, {MaskDescriptor::causal(0, 24)}}, 94);
  run_v1_v2({"v2_decode_k31", 2, 20, 31, 2, 1, 128, {MaskDescriptor::causal(1, 11), MaskDescriptor::causal(0, 11)}},
            95);
}

TEST(AttentionCuda, ZeroQueryRowsZeroKeyGradients) {
  // Tq = 0: the forward is a no-op and the backward still overwrites dk, dv with zeros.
  const int64_t B = 1, Tk = 9, H = 2, D = 16;
  DeviceBuffer k(sizeof(float) * B * Tk * H * D), dk(k.bytes()), dv(k.bytes()), masks(sizeof(cuda::DeviceMask));
  k.zero();
  CUDA_CHECK(cudaMemset(dk.get(), 0xff, dk.bytes()));
  CUDA_CHECK(cudaMemset(dv.get(), 0xff, dv.bytes()));
  const MaskDescriptor m = MaskDescriptor::causal(0, 9);
  cuda::upload_masks({&m, 1}, masks.as<cuda::DeviceMask>(), nullptr);
  DeviceBuffer scratch(cuda::attention_backward_scratch_bytes(B, 0, Tk, H, H, D));
  cuda::attention_forward(nullptr, k.get(), k.get(), nullptr, nullptr, B, 0, Tk, H, H, D,
                          masks.as<cuda::DeviceMask>(), 1, 0.25, DType::f32, nullptr);
  cuda::attention_backward(nullptr, k.get(), k.get(), nullptr, nullptr, nullptr, nullptr, dk.get(), dv.get(), B, 0,
                           Tk, H, H, D, masks.as<cuda::DeviceMask>(), 1, 0.25, scratch.get(), DType::f32, nullptr);
  Tensor gk = gpu_test::download(dk.get(), DType::f32, {B, Tk, H, D});
  Tensor gv = gpu_test::download(dv.get(), DType::f32, {B, Tk, H, D});
  for (double x : gk.to_f64_vector()) ASSERT_EQ(x, 0.0);
  for (double x : gv.to_f64_vector()) ASSERT_EQ(x, 0.0);
}

TEST(AttentionCuda, RejectsUnsupportedDtype) {
  const std::string e = test::error_of([] {
    cuda::attention_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 1, 1, 1, 1, 16, nullptr, 1, 1.0,
                            DType::f64, nullptr);
  });
  EXPECT_NE(e.find("attention_forward"), std::string::npos) << e;
  EXPECT_NE(e.find("f64"), std::string::npos) << e;
}

}  // namespace
}  // namespace opdlm
