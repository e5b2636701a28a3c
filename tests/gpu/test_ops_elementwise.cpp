// GPU parity of the elementwise and normalisation CUDA ops and AdamW (ops/cuda/ops_cuda.hpp): each op
// against its CPU twin computed in f64 on the same inputs (bf16 inputs rounded first), in f32 and bf16,
// at odd sizes and near the real ones; plus the bit-exact checks (convert, the embedding gather and
// its f32 scatter, the AdamW step against adamw_step_range, repeatable sums of squares).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gpu_test_util.hpp"
#include "opdlm/ops/adamw.hpp"
#include "opdlm/ops/cuda/ops_cuda.hpp"
#include "opdlm/ops/embedding.hpp"
#include "opdlm/ops/grad_norm.hpp"
#include "opdlm/ops/residual.hpp"
#include "opdlm/ops/rmsnorm.hpp"
#include "opdlm/ops/rope.hpp"
#include "opdlm/ops/swiglu.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::download;
using gpu_test::round_bf16;
using gpu_test::Tol;
using gpu_test::tol_for;
using gpu_test::upload;

// ---- helpers ---------------------------------------------------------------------------------------

// Uniform values as an f32 tensor that `dt` holds exactly (bf16: rounded), so the GPU and the f64 CPU
// reference see the same inputs.
Tensor rand_in(const Shape& s, uint32_t seed, DType dt, double lo = -1.0, double hi = 1.0) {
  Tensor x = test::random_tensor(s, seed, lo, hi, DType::f32);
  return dt == DType::bf16 ? round_bf16(x) : x;
}

Tensor f64(const Tensor& t) { return t.to(DType::f64); }

DeviceBuffer dev_empty(int64_t n, DType dt) { return DeviceBuffer(size_t(n) * dtype_size(dt)); }

// The raw bytes of a device buffer as a CPU tensor of `dt` (no widening), for bitwise comparisons.
Tensor download_raw(const void* dev, DType dt, const Shape& shape) {
  Tensor h = Tensor::empty(shape, dt);
  if (h.nbytes()) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(h.raw_data(), dev, h.nbytes(), cudaMemcpyDeviceToHost));
  }
  return h;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

std::string dims(const Shape& s) {
  std::string r;
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "x" : "") + std::to_string(s[i]);
  return r;
}

const DType kDtypes[] = {DType::f32, DType::bf16};

// Tolerances: f32 kernels against f64; bf16 outputs carry one bf16 rounding (2^-8 relative at most).
constexpr Tol kF32{1e-5, 1e-5};
constexpr Tol kBf16Out{1e-5, 8e-3};
constexpr Tol kF32Acc{1e-5, 1e-5};  // f32 accumulators (dw, dtable, acc) whatever the input dtype

class GpuElementwise : public ::testing::Test {
 protected:
  void SetUp() override { CUDA_CHECK(cudaStreamCreate(&stream)); }
  void TearDown() override {
    CUDA_CHECK(cudaStreamSynchronize(stream));
    cudaStreamDestroy(stream);
  }
  cudaStream_t stream = nullptr;
};

// ---- convert ---------------------------------------------------------------------------------------

TEST_F(GpuElementwise, ConvertIsBitExactBothWaysAndCopiesSameDtype) {
  for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{512} * 1024}) {
    Tensor x = test::random_tensor({n}, 11, -300.0, 300.0, DType::f32);
    x.data<float>()[0] = 1.00390625f;  // a tie: rounds to even
    auto d32 = upload(x, DType::f32);
    DeviceBuffer d16 = dev_empty(n, DType::bf16), back = dev_empty(n, DType::f32);
    DeviceBuffer c32 = dev_empty(n, DType::f32), c16 = dev_empty(n, DType::bf16);
    cuda::convert(d32.get(), DType::f32, d16.get(), DType::bf16, n, stream);
    cuda::convert(d16.get(), DType::bf16, back.get(), DType::f32, n, stream);
    cuda::convert(d32.get(), DType::f32, c32.get(), DType::f32, n, stream);
    cuda::convert(d16.get(), DType::bf16, c16.get(), DType::bf16, n, stream);
    const Tensor cpu16 = x.to(DType::bf16);
    EXPECT_TRUE(same_bytes(download_raw(d16.get(), DType::bf16, {n}), cpu16)) << "f32->bf16, n " << n;
    EXPECT_TRUE(same_bytes(download_raw(back.get(), DType::f32, {n}), cpu16.to(DType::f32))) << "bf16->f32, n " << n;
    EXPECT_TRUE(same_bytes(download_raw(c32.get(), DType::f32, {n}), x)) << "f32 copy, n " << n;
    EXPECT_TRUE(same_bytes(download_raw(c16.get(), DType::bf16, {n}), cpu16)) << "bf16 copy, n " << n;
  }
}

// ---- RMSNorm ---------------------------------------------------------------------------------------

void check_rmsnorm(int64_t rows, int64_t D, DType dt, uint32_t seed, cudaStream_t stream) {
  const double eps = 1e-6;
  const std::string sh = dims({rows, D});
  const Tensor x = rand_in({rows, D}, seed, dt, -2.0, 2.0), w = rand_in({D}, seed + 1, dt, 0.5, 1.5);
  const Tensor dy = rand_in({rows, D}, seed + 2, dt);
  const Tensor dw0 = test::random_tensor({D}, seed + 3, -1.0, 1.0, DType::f32);  // dw accumulates onto this

  Tensor rstd_ref, dx_ref, dw_ref = f64(dw0);
  const Tensor y_ref = ops::rmsnorm_forward(f64(x), f64(w), eps, &rstd_ref);
  ops::rmsnorm_backward(f64(x), f64(w), rstd_ref, f64(dy), &dx_ref, &dw_ref);

  auto dx_in = upload(x, dt), dw_in = upload(w, dt), ddy = upload(dy, dt), ddw = upload(dw0, DType::f32);
  DeviceBuffer dy_out = dev_empty(rows * D, dt), drstd = dev_empty(rows, DType::f32), ddx = dev_empty(rows * D, dt);
  cuda::rmsnorm_forward(dx_in.get(), dw_in.get(), dy_out.get(), drstd.as<float>(), rows, D, eps, dt, stream);
  cuda::rmsnorm_backward(dx_in.get(), dw_in.get(), drstd.as<float>(), ddy.get(), ddx.get(), ddw.as<float>(), rows, D,
                         dt, stream);

  const Tol t = tol_for(dt, kF32, kBf16Out);
  EXPECT_PARITY("rmsnorm_fwd", dt, sh, download(dy_out.get(), dt, {rows, D}), y_ref, t.atol, t.rtol);
  EXPECT_PARITY("rmsnorm_fwd.rstd", dt, sh, download(drstd.get(), DType::f32, {rows}), rstd_ref, 0.0, 1e-6);
  EXPECT_PARITY("rmsnorm_bwd.dx", dt, sh, download(ddx.get(), dt, {rows, D}), dx_ref, t.atol, t.rtol);
  EXPECT_PARITY("rmsnorm_bwd.dw", dt, sh, download(ddw.get(), DType::f32, {D}), dw_ref, kF32Acc.atol, kF32Acc.rtol);

  // Nullable outputs: dx alone leaves dw alone, and the dw reduction repeats bit for bit.
  auto ddw2 = upload(dw0, DType::f32);
  DeviceBuffer ddx2 = dev_empty(rows * D, dt);
  cuda::rmsnorm_backward(dx_in.get(), dw_in.get(), drstd.as<float>(), ddy.get(), ddx2.get(), nullptr, rows, D, dt,
                         stream);
  cuda::rmsnorm_backward(dx_in.get(), dw_in.get(), drstd.as<float>(), ddy.get(), nullptr, ddw2.as<float>(), rows, D,
                         dt, stream);
  EXPECT_TRUE(same_bytes(download_raw(ddx2.get(), dt, {rows, D}), download_raw(ddx.get(), dt, {rows, D}))) << sh;
  EXPECT_TRUE(same_bytes(download_raw(ddw2.get(), DType::f32, {D}), download_raw(ddw.get(), DType::f32, {D}))) << sh;

  // The row-parallel dw (caller scratch): against the CPU, and repeatable bit for bit.
  DeviceBuffer scratch(std::max<size_t>(cuda::rmsnorm_backward_scratch_bytes(rows, D), 8));
  auto ddw3 = upload(dw0, DType::f32), ddw4 = upload(dw0, DType::f32);
  DeviceBuffer ddx3 = dev_empty(rows * D, dt);
  cuda::rmsnorm_backward(dx_in.get(), dw_in.get(), drstd.as<float>(), ddy.get(), ddx3.get(), ddw3.as<float>(), rows, D,
                         dt, stream, scratch.get());
  cuda::rmsnorm_backward(dx_in.get(), dw_in.get(), drstd.as<float>(), ddy.get(), nullptr, ddw4.as<float>(), rows, D,
                         dt, stream, scratch.get());
  EXPECT_PARITY("rmsnorm_bwd.dw_rowpar", dt, sh, download(ddw3.get(), DType::f32, {D}), dw_ref, kF32Acc.atol,
                kF32Acc.rtol);
  EXPECT_TRUE(same_bytes(download_raw(ddx3.get(), dt, {rows, D}), download_raw(ddx.get(), dt, {rows, D}))) << sh;
  EXPECT_TRUE(same_bytes(download_raw(ddw3.get(), DType::f32, {D}), download_raw(ddw4.get(), DType::f32, {D}))) << sh;
}

TEST_F(GpuElementwise, RmsNormMatchesCpu) {
  for (DType dt : kDtypes) {
    check_rmsnorm(1, 3, dt, 100, stream);
    check_rmsnorm(37, 77, dt, 110, stream);
    check_rmsnorm(300, 2050, dt, 120, stream);      // D beyond one pass of the block
    check_rmsnorm(512, 1024, dt, 130, stream);      // the hidden norm
    check_rmsnorm(512 * 16, 128, dt, 140, stream);  // the per-head q/k norm
  }
}

// ---- RoPE ------------------------------------------------------------------------------------------

void check_rope(int64_t tokens, int64_t heads, int64_t head_dim, DType dt, uint32_t seed, cudaStream_t stream) {
  const double theta = 1e6;  // Qwen3
  const int64_t half = head_dim / 2;
  const std::string sh = dims({tokens, heads, head_dim});
  // Repeated positions (the training layout restarts them per segment) and a few large ones.
  std::vector<int32_t> pv(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) pv[size_t(t)] = t % 5 == 4 ? int32_t(40000 - t) : int32_t(t % 97);
  const Tensor pos = Tensor::from_vector(pv, {tokens});
  const ops::RopeTable ref = ops::rope_table(pos, head_dim, theta, DType::f64);

  auto dpos = upload(pos, DType::i32);
  DeviceBuffer dcos = dev_empty(tokens * half, DType::f32), dsin = dev_empty(tokens * half, DType::f32);
  cuda::rope_table(dpos.as<int32_t>(), tokens, head_dim, theta, dcos.as<float>(), dsin.as<float>(), stream);
  EXPECT_PARITY("rope_table.cos", DType::f32, dims({tokens, half}), download(dcos.get(), DType::f32, {tokens, half}),
                ref.cos, 1e-6, 0.0);
  EXPECT_PARITY("rope_table.sin", DType::f32, dims({tokens, half}), download(dsin.get(), DType::f32, {tokens, half}),
                ref.sin, 1e-6, 0.0);

  const Tensor x = rand_in({tokens, heads, head_dim}, seed, dt), dy = rand_in({tokens, heads, head_dim}, seed + 1, dt);
  const Tensor y_ref = ops::rope_forward(f64(x), ref), dx_ref = ops::rope_backward(f64(dy), ref);
  auto dx = upload(x, dt), ddy = upload(dy, dt);
  cuda::rope_inplace(dx.get(), dcos.as<float>(), dsin.as<float>(), tokens, heads, head_dim, false, dt, stream);
  cuda::rope_inplace(ddy.get(), dcos.as<float>(), dsin.as<float>(), tokens, heads, head_dim, true, dt, stream);
  const Tol t = tol_for(dt, kF32, kBf16Out);
  EXPECT_PARITY("rope_fwd", dt, sh, download(dx.get(), dt, {tokens, heads, head_dim}), y_ref, t.atol, t.rtol);
  EXPECT_PARITY("rope_bwd", dt, sh, download(ddy.get(), dt, {tokens, heads, head_dim}), dx_ref, t.atol, t.rtol);
}

TEST_F(GpuElementwise, RopeMatchesCpu) {
  for (DType dt : kDtypes) {
    check_rope(1, 1, 2, dt, 200, stream);
    check_rope(13, 3, 10, dt, 210, stream);    // half = 5: a partial warp
    check_rope(37, 5, 300, dt, 220, stream);   // half = 150: more pairs than threads in x
    check_rope(512, 16, 128, dt, 230, stream); // Qwen3 q: 16 heads of 128
    check_rope(512, 8, 128, dt, 240, stream);  // Qwen3 k/v: 8 heads
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------------

void check_swiglu(int64_t rows, int64_t F, DType dt, uint32_t seed, cudaStream_t stream) {
  const int64_t n = rows * F;
  const std::string sh = dims({rows, F});
  // gate spans both branches of the stable sigmoid and its saturated tails.
  const Tensor g = rand_in({rows, F}, seed, dt, -12.0, 12.0), u = rand_in({rows, F}, seed + 1, dt, -2.0, 2.0);
  const Tensor dh = rand_in({rows, F}, seed + 2, dt);
  const Tensor h_ref = ops::swiglu_forward(f64(g), f64(u));
  Tensor dg_ref, du_ref;
  ops::swiglu_backward(f64(g), f64(u), f64(dh), &dg_ref, &du_ref);

  auto dg_in = upload(g, dt), du_in = upload(u, dt), ddh = upload(dh, dt);
  DeviceBuffer dh_out = dev_empty(n, dt), ddg = dev_empty(n, dt), ddu = dev_empty(n, dt), ddg2 = dev_empty(n, dt);
  cuda::swiglu_forward(dg_in.get(), du_in.get(), dh_out.get(), n, dt, stream);
  cuda::swiglu_backward(dg_in.get(), du_in.get(), ddh.get(), ddg.get(), ddu.get(), n, dt, stream);
  cuda::swiglu_backward(dg_in.get(), du_in.get(), ddh.get(), ddg2.get(), nullptr, n, dt, stream);
  const Tol t = tol_for(dt, kF32, kBf16Out);
  EXPECT_PARITY("swiglu_fwd", dt, sh, download(dh_out.get(), dt, {rows, F}), h_ref, t.atol, t.rtol);
  EXPECT_PARITY("swiglu_bwd.dgate", dt, sh, download(ddg.get(), dt, {rows, F}), dg_ref, t.atol, t.rtol);
  EXPECT_PARITY("swiglu_bwd.dup", dt, sh, download(ddu.get(), dt, {rows, F}), du_ref, t.atol, t.rtol);
  EXPECT_TRUE(same_bytes(download_raw(ddg2.get(), dt, {n}), download_raw(ddg.get(), dt, {n}))) << "dgate alone " << sh;
}

TEST_F(GpuElementwise, SwigluMatchesCpu) {
  for (DType dt : kDtypes) {
    check_swiglu(1, 1, dt, 300, stream);
    check_swiglu(37, 101, dt, 310, stream);
    check_swiglu(512, 3072, dt, 320, stream);  // Qwen3-0.6B intermediate size
  }
}

// ---- embedding -------------------------------------------------------------------------------------

void check_embedding(int64_t n, int64_t V, int64_t D, DType dt, uint32_t seed, cudaStream_t stream) {
  const std::string sh = dims({n, V, D});
  const Tensor table = rand_in({V, D}, seed, dt), dy = rand_in({n, D}, seed + 1, dt);
  const Tensor ids = test::random_ids({n}, seed + 2, int32_t(V));
  const Tensor dtab0 = test::random_tensor({V, D}, seed + 3, -1.0, 1.0, DType::f32);  // accumulated onto
  const Tensor out_ref = ops::embedding_forward(f64(table), ids);
  Tensor dtab_ref = f64(dtab0);
  ops::embedding_backward(ids, f64(dy), dtab_ref);

  auto dtable = upload(table, dt), dids = upload(ids, DType::i32), ddy = upload(dy, dt);
  auto ddtab = upload(dtab0, DType::f32);
  DeviceBuffer dout = dev_empty(n * D, dt);
  cuda::embedding_forward(dtable.get(), dids.as<int32_t>(), dout.get(), n, V, D, dt, stream);
  cuda::embedding_backward(dids.as<int32_t>(), ddy.get(), ddtab.as<float>(), n, V, D, dt, stream);
  EXPECT_PARITY("embedding_fwd", dt, sh, download(dout.get(), dt, {n, D}), out_ref, 0.0, 0.0);
  EXPECT_PARITY("embedding_bwd.dtable", dt, sh, download(ddtab.get(), DType::f32, {V, D}), dtab_ref, kF32Acc.atol,
                kF32Acc.rtol);
  if (dt == DType::f32) {  // same adds in the same (token) order as the CPU's f32 op: the same bits
    Tensor cpu = dtab0.clone();
    ops::embedding_backward(ids, dy, cpu);
    EXPECT_TRUE(same_bytes(download_raw(ddtab.get(), DType::f32, {V, D}), cpu)) << "embedding_bwd f32 bits " << sh;
  }
}

TEST_F(GpuElementwise, EmbeddingMatchesCpu) {
  for (DType dt : kDtypes) {
    check_embedding(1, 1, 1, dt, 400, stream);
    check_embedding(257, 13, 77, dt, 410, stream);     // every id repeats many times
    check_embedding(512, 4099, 1024, dt, 420, stream);  // the real width
    check_embedding(300, 151936, 24, dt, 430, stream);  // the real vocabulary
    check_embedding(2000, 3, 40, dt, 440, stream);      // ~670 tokens per id: runs over many id tiles
  }
}

// ---- residual and elementwise ------------------------------------------------------------------------

TEST_F(GpuElementwise, AddAccumulateScaleMatchCpu) {
  const float scale = 0.37f;
  for (DType dt : kDtypes)
    for (int64_t n : {int64_t{1}, int64_t{12345}, int64_t{512} * 1024}) {
      const std::string sh = dims({n});
      const Tensor x = rand_in({n}, 500, dt, -2.0, 2.0), d = rand_in({n}, 501, dt);
      const Tensor acc0 = test::random_tensor({n}, 502, -1.0, 1.0, DType::f32);
      Tensor add_ref = f64(x);
      ops::residual_add_inplace(add_ref, f64(d));
      Tensor acc_ref = f64(acc0), x_scaled = f64(x);
      ops::scale_grads({&x_scaled}, double(scale));
      ops::residual_backward(x_scaled, acc_ref);  // acc += x * scale
      Tensor scale_ref = f64(x);
      ops::scale_grads({&scale_ref}, double(scale));

      auto dx = upload(x, dt), dd = upload(d, dt), dacc = upload(acc0, DType::f32), dxs = upload(x, dt);
      cuda::accumulate_f32(dacc.as<float>(), dx.get(), scale, n, dt, stream);  // before x changes
      cuda::add_inplace(dx.get(), dd.get(), n, dt, stream);
      cuda::scale_inplace(dxs.get(), scale, n, dt, stream);
      const Tol t = tol_for(dt, Tol{1e-6, 1e-6}, kBf16Out);
      EXPECT_PARITY("add_inplace", dt, sh, download(dx.get(), dt, {n}), add_ref, t.atol, t.rtol);
      EXPECT_PARITY("accumulate_f32", dt, sh, download(dacc.get(), DType::f32, {n}), acc_ref, 1e-6, 1e-6);
      EXPECT_PARITY("scale_inplace", dt, sh, download(dxs.get(), dt, {n}), scale_ref, t.atol, t.rtol);
    }
}

// ---- vector paths: tails and misaligned pointers ---------------------------------------------------

// `x` uploaded as `dt` at element offset `off` of a buffer one element longer: off = 1 makes the pointer
// miss 16-byte alignment (the scalar kernels), off = 0 keeps it (the 16-byte kernels and their tails).
struct Placed {
  DeviceBuffer buf;
  void* ptr;
};
Placed place(const Tensor& x, DType dt, int64_t off) {
  const size_t es = dtype_size(dt), bytes = size_t(x.numel()) * es;
  DeviceBuffer src = upload(x, dt), buf(bytes + es);
  void* p = static_cast<char*>(buf.get()) + size_t(off) * es;
  if (bytes) CUDA_CHECK(cudaMemcpy(p, src.get(), bytes, cudaMemcpyDeviceToDevice));
  return {std::move(buf), p};
}

// Runs every vectorised elementwise op at offsets 0 and 1 on the same data: both against the CPU, and the
// two paths equal bit for bit (the vector kernels use the scalar kernels' per-element formulas).
void check_vector_paths(int64_t n, DType dt, uint32_t seed, cudaStream_t stream) {
  const float scale = -1.7f;
  const Tensor x = rand_in({n}, seed, dt, -2.0, 2.0), d = rand_in({n}, seed + 1, dt);
  const Tensor g = rand_in({n}, seed + 2, dt, -12.0, 12.0), u = rand_in({n}, seed + 3, dt, -2.0, 2.0);
  const Tensor acc0 = test::random_tensor({n}, seed + 4, -1.0, 1.0, DType::f32);
  Tensor add_ref = f64(x), acc_ref = f64(acc0), x_scaled = f64(x), scale_ref = f64(x);
  ops::residual_add_inplace(add_ref, f64(d));
  ops::scale_grads({&x_scaled}, double(scale));
  ops::residual_backward(x_scaled, acc_ref);
  ops::scale_grads({&scale_ref}, double(scale));
  const Tensor h_ref = ops::swiglu_forward(f64(g).view({1, n}), f64(u).view({1, n}));
  Tensor dg_ref, du_ref;
  ops::swiglu_backward(f64(g).view({1, n}), f64(u).view({1, n}), f64(d).view({1, n}), &dg_ref, &du_ref);

  Tensor got[2][7];  // [offset][add, acc, scale, swiglu h, dgate, dup, dgate alone]
  for (int64_t off : {0, 1}) {
    const std::string sh = dims({n}) + (off ? "+1" : "");
    Placed px = place(x, dt, off), pd = place(d, dt, off), pacc = place(acc0, DType::f32, off);
    Placed pxs = place(x, dt, off), pg = place(g, dt, off), pu = place(u, dt, off);
    Placed ph = place(Tensor::zeros({n}, DType::f32), dt, off), pdg = place(Tensor::zeros({n}, DType::f32), dt, off);
    Placed pdu = place(Tensor::zeros({n}, DType::f32), dt, off), pdg2 = place(Tensor::zeros({n}, DType::f32), dt, off);
    cuda::accumulate_f32(static_cast<float*>(pacc.ptr), px.ptr, scale, n, dt, stream);
    cuda::add_inplace(px.ptr, pd.ptr, n, dt, stream);
    cuda::scale_inplace(pxs.ptr, scale, n, dt, stream);
    cuda::swiglu_forward(pg.ptr, pu.ptr, ph.ptr, n, dt, stream);
    cuda::swiglu_backward(pg.ptr, pu.ptr, pd.ptr, pdg.ptr, pdu.ptr, n, dt, stream);
    cuda::swiglu_backward(pg.ptr, pu.ptr, pd.ptr, pdg2.ptr, nullptr, n, dt, stream);
    const Tol t = tol_for(dt, Tol{1e-6, 1e-6}, kBf16Out);
    const Tol ts = tol_for(dt, kF32, kBf16Out);
    EXPECT_PARITY("add_inplace.vec", dt, sh, download(px.ptr, dt, {n}), add_ref, t.atol, t.rtol);
    EXPECT_PARITY("accumulate_f32.vec", dt, sh, download(pacc.ptr, DType::f32, {n}), acc_ref, 1e-6, 1e-6);
    EXPECT_PARITY("scale_inplace.vec", dt, sh, download(pxs.ptr, dt, {n}), scale_ref, t.atol, t.rtol);
    EXPECT_PARITY("swiglu_fwd.vec", dt, sh, download(ph.ptr, dt, {n}), h_ref, ts.atol, ts.rtol);
    EXPECT_PARITY("swiglu_bwd.dgate.vec", dt, sh, download(pdg.ptr, dt, {n}), dg_ref, ts.atol, ts.rtol);
    EXPECT_PARITY("swiglu_bwd.dup.vec", dt, sh, download(pdu.ptr, dt, {n}), du_ref, ts.atol, ts.rtol);
    Tensor* o = got[off];
    o[0] = download_raw(px.ptr, dt, {n});
    o[1] = download_raw(pacc.ptr, DType::f32, {n});
    o[2] = download_raw(pxs.ptr, dt, {n});
    o[3] = download_raw(ph.ptr, dt, {n});
    o[4] = download_raw(pdg.ptr, dt, {n});
    o[5] = download_raw(pdu.ptr, dt, {n});
    o[6] = download_raw(pdg2.ptr, dt, {n});
  }
  const char* names[7] = {"add_inplace", "accumulate_f32", "scale_inplace", "swiglu_fwd", "swiglu_bwd.dgate",
                          "swiglu_bwd.dup", "swiglu_bwd.dgate alone"};
  for (int k = 0; k < 7; ++k)
    EXPECT_TRUE(same_bytes(got[0][k], got[1][k])) << names[k] << ": vector and scalar paths differ, n " << n << " "
                                                  << dtype_name(dt);
  EXPECT_TRUE(same_bytes(got[0][6], got[0][4])) << "dgate alone, n " << n;
}

TEST_F(GpuElementwise, VectorPathsHandleTailsAndMisalignment) {
  for (DType dt : kDtypes)
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{8 * 37 + 5}, int64_t{65536 + 3}})
      check_vector_paths(n, dt, 700 + uint32_t(n % 97), stream);
}

TEST_F(GpuElementwise, ConvertVectorPathsHandleTailsAndMisalignment) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{9}, int64_t{8 * 37 + 5}, int64_t{65536 + 3}})
    for (int64_t off : {0, 1}) {
      Tensor x = test::random_tensor({n}, 800, -300.0, 300.0, DType::f32);
      x.data<float>()[n - 1] = 1.00390625f;  // a tie in the tail: rounds to even
      const Tensor cpu16 = x.to(DType::bf16);
      Placed p32 = place(x, DType::f32, off);
      Placed p16 = place(Tensor::zeros({n}, DType::f32), DType::bf16, off);
      Placed back = place(Tensor::zeros({n}, DType::f32), DType::f32, off);
      cuda::convert(p32.ptr, DType::f32, p16.ptr, DType::bf16, n, stream);
      cuda::convert(p16.ptr, DType::bf16, back.ptr, DType::f32, n, stream);
      EXPECT_TRUE(same_bytes(download_raw(p16.ptr, DType::bf16, {n}), cpu16)) << "f32->bf16, n " << n << "+" << off;
      EXPECT_TRUE(same_bytes(download_raw(back.ptr, DType::f32, {n}), cpu16.to(DType::f32)))
          << "bf16->f32, n " << n << "+" << off;
    }
}

// RoPE with half a multiple of 8 (the 16-byte kernel) against the same data one element off (scalar).
TEST_F(GpuElementwise, RopeVectorPathMatchesScalarPath) {
  const int64_t tokens = 37, heads = 3, head_dim = 48, half = head_dim / 2, n = tokens * heads * head_dim;
  std::vector<int32_t> pv(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) pv[size_t(t)] = int32_t(t * 7 % 101);
  auto dpos = upload(Tensor::from_vector(pv, {tokens}), DType::i32);
  DeviceBuffer dcos = dev_empty(tokens * half, DType::f32), dsin = dev_empty(tokens * half, DType::f32);
  cuda::rope_table(dpos.as<int32_t>(), tokens, head_dim, 1e6, dcos.as<float>(), dsin.as<float>(), stream);
  for (DType dt : kDtypes)
    for (bool inverse : {false, true}) {
      const Tensor x = rand_in({n}, 900 + uint32_t(inverse), dt);
      Placed a = place(x, dt, 0), b = place(x, dt, 1);
      cuda::rope_inplace(a.ptr, dcos.as<float>(), dsin.as<float>(), tokens, heads, head_dim, inverse, dt, stream);
      cuda::rope_inplace(b.ptr, dcos.as<float>(), dsin.as<float>(), tokens, heads, head_dim, inverse, dt, stream);
      EXPECT_TRUE(same_bytes(download_raw(a.ptr, dt, {n}), download_raw(b.ptr, dt, {n})))
          << "rope vector vs scalar, inverse " << inverse << " " << dtype_name(dt);
    }
}

// ---- sum of squares ---------------------------------------------------------------------------------

TEST_F(GpuElementwise, SumSquaresMatchesCpuAndRepeats) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{4097}, int64_t{100003}, int64_t{3000017}}) {
    const std::string sh = dims({n});
    const Tensor x = test::random_tensor({n}, 600, -1.0, 1.0, DType::f32);
    const Tensor x64 = f64(x);
    const double want = ops::grad_sq_sum({&x64});
    auto dx = upload(x, DType::f32);
    DeviceBuffer scratch(cuda::sum_squares_scratch_bytes(n)), out(2 * sizeof(double));
    CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));  // NaN: a missed store shows
    cuda::sum_squares(dx.as<float>(), n, out.as<double>(), scratch.get(), stream);
    cuda::sum_squares(dx.as<float>(), n, out.as<double>() + 1, scratch.get(), stream);
    const Tensor got = download_raw(out.get(), DType::f64, {2});
    EXPECT_PARITY("sum_squares", DType::f32, sh, got.view({2}).to(DType::f64),
                  Tensor::from_vector(std::vector<double>{want, want}, {2}), 0.0, 1e-12);
    EXPECT_EQ(std::memcmp(got.data<double>(), got.data<double>() + 1, sizeof(double)), 0) << "not repeatable, n " << n;
  }
}

// ---- AdamW -------------------------------------------------------------------------------------------

// Several consecutive steps on the GPU and with adamw_step_range on the CPU from the same state: the f32
// param, m and v must be equal bit for bit after every step, and the bf16 copy must be the CPU's
// rounding of the param.
void check_adamw(int64_t n, const ops::AdamWConfig& cfg, bool zero_state, uint32_t seed, cudaStream_t stream) {
  const std::string sh = dims({n});
  Tensor p = test::random_tensor({n}, seed, -1.0, 1.0, DType::f32);
  Tensor m = zero_state ? Tensor::zeros({n}, DType::f32) : test::random_tensor({n}, seed + 1, -1e-3, 1e-3, DType::f32);
  Tensor v = zero_state ? Tensor::zeros({n}, DType::f32) : test::random_tensor({n}, seed + 2, 0.0, 1e-5, DType::f32);
  auto dp = upload(p, DType::f32), dm = upload(m, DType::f32), dv = upload(v, DType::f32);
  DeviceBuffer dp16 = dev_empty(n, DType::bf16);
  for (int64_t step : {1, 2, 3, 1000}) {
    Tensor g = test::random_tensor({n}, seed + 10 + uint32_t(step), -1e-2, 1e-2, DType::f32);
    if (n > 3) g.data<float>()[1] = 0.f, g.data<float>()[2] = 1e-30f;  // zero and tiny gradients
    // f64 reference of this one step from the current (f32) state, for the parity table.
    Tensor p64 = f64(p), m64 = f64(m), v64 = f64(v);
    ops::adamw_step(p64, f64(g), m64, v64, step, cfg);
    ops::adamw_step_range(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), n, step, cfg);

    auto dg = upload(g, DType::f32);
    cuda::adamw_step(dp.as<float>(), dg.as<float>(), dm.as<float>(), dv.as<float>(), n, step, cfg, dp16.get(), stream);
    const std::string at = sh + " step " + std::to_string(step);
    EXPECT_PARITY("adamw.param", DType::f32, at, download(dp.get(), DType::f32, {n}), p64, 1e-7, 1e-6);
    EXPECT_TRUE(same_bytes(download_raw(dp.get(), DType::f32, {n}), p)) << "param bits, " << at;
    EXPECT_TRUE(same_bytes(download_raw(dm.get(), DType::f32, {n}), m)) << "m bits, " << at;
    EXPECT_TRUE(same_bytes(download_raw(dv.get(), DType::f32, {n}), v)) << "v bits, " << at;
    EXPECT_TRUE(same_bytes(download_raw(dp16.get(), DType::bf16, {n}), p.to(DType::bf16))) << "bf16 param, " << at;
  }
}

TEST_F(GpuElementwise, AdamwMatchesCpuBitForBit) {
  ops::AdamWConfig a;  // torch defaults with decay
  a.lr = 1e-3, a.weight_decay = 0.01;
  ops::AdamWConfig b;
  b.lr = 3e-4, b.beta1 = 0.9, b.beta2 = 0.95, b.eps = 1e-6, b.weight_decay = 0.1;
  check_adamw(1, a, true, 700, stream);
  check_adamw(100003, a, true, 710, stream);
  check_adamw(100003, b, false, 720, stream);
  check_adamw(1 << 20, b, false, 730, stream);
  // Without the bf16 copy.
  Tensor p = test::random_tensor({1000}, 740, -1.0, 1.0, DType::f32), g = test::random_tensor({1000}, 741);
  g = g.to(DType::f32);
  Tensor m = Tensor::zeros({1000}, DType::f32), v = Tensor::zeros({1000}, DType::f32);
  auto dp = upload(p, DType::f32), dg = upload(g, DType::f32), dm = upload(m, DType::f32), dv = upload(v, DType::f32);
  cuda::adamw_step(dp.as<float>(), dg.as<float>(), dm.as<float>(), dv.as<float>(), 1000, 5, b, nullptr, stream);
  ops::adamw_step_range(p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), 1000, 5, b);
  EXPECT_TRUE(same_bytes(download_raw(dp.get(), DType::f32, {1000}), p));
}

// ---- errors and empty inputs ---------------------------------------------------------------------------

TEST_F(GpuElementwise, UnsupportedDtypeIsAnErrorNamingTheOp) {
  DeviceBuffer buf(1024);
  void* b = buf.get();
  auto msg = [](const std::function<void()>& f) { return test::error_of(f); };
  EXPECT_NE(msg([&] { cuda::add_inplace(b, b, 4, DType::f64, stream); }).find("add_inplace"), std::string::npos);
  EXPECT_NE(msg([&] { cuda::swiglu_forward(b, b, b, 4, DType::i32, stream); }).find("swiglu_forward"), std::string::npos);
  EXPECT_NE(msg([&] { cuda::rmsnorm_forward(b, b, b, nullptr, 2, 2, 1e-6, DType::f64, stream); }).find("rmsnorm_forward"),
            std::string::npos);
  EXPECT_NE(msg([&] { cuda::rope_inplace(b, nullptr, nullptr, 1, 1, 2, false, DType::f64, stream); }).find("rope_inplace"),
            std::string::npos);
  EXPECT_NE(msg([&] { cuda::embedding_forward(b, nullptr, b, 1, 1, 1, DType::f64, stream); }).find("embedding_forward"),
            std::string::npos);
  EXPECT_NE(msg([&] { cuda::convert(b, DType::f64, b, DType::f32, 4, stream); }).find("convert"), std::string::npos);
  EXPECT_NE(msg([&] { cuda::rope_table(nullptr, 1, 3, 1e4, nullptr, nullptr, stream); }).find("head_dim"),
            std::string::npos);
  ops::AdamWConfig c;
  EXPECT_NE(msg([&] { cuda::adamw_step(nullptr, nullptr, nullptr, nullptr, 1, 0, c, nullptr, stream); }).find("step"),
            std::string::npos);
}

TEST_F(GpuElementwise, EmptyInputsAreNoOps) {
  ops::AdamWConfig c;
  for (DType dt : kDtypes) {
    cuda::convert(nullptr, dt, nullptr, DType::f32, 0, stream);
    cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 0, 8, 1e-6, dt, stream);
    cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 8, dt, stream);
    cuda::rope_inplace(nullptr, nullptr, nullptr, 0, 4, 8, false, dt, stream);
    cuda::swiglu_forward(nullptr, nullptr, nullptr, 0, dt, stream);
    cuda::swiglu_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, dt, stream);
    cuda::embedding_forward(nullptr, nullptr, nullptr, 0, 10, 8, dt, stream);
    cuda::embedding_backward(nullptr, nullptr, nullptr, 0, 10, 8, dt, stream);
    cuda::add_inplace(nullptr, nullptr, 0, dt, stream);
    cuda::accumulate_f32(nullptr, nullptr, 1.f, 0, dt, stream);
    cuda::scale_inplace(nullptr, 2.f, 0, dt, stream);
  }
  cuda::rope_table(nullptr, 0, 8, 1e4, nullptr, nullptr, stream);
  cuda::adamw_step(nullptr, nullptr, nullptr, nullptr, 0, 1, c, nullptr, stream);
  EXPECT_EQ(cuda::sum_squares_scratch_bytes(0), size_t{0});
  CUDA_CHECK(cudaStreamSynchronize(stream));
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace opdlm
