// GPU parity of cuda::BlasLt against the CPU ops in f64 on the same inputs (bf16-rounded for bf16):
// every trans combination at odd sizes, alpha/beta accumulation, bf16 and f32 outputs, strided
// batches with a shared B, the Linear forward/backward (dw accumulated in f32), and the error text.
#include <string>

#include "gpu_test_util.hpp"
#include "opdlm/ops/cuda/gemm_cuda.hpp"
#include "opdlm/ops/matmul.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::download;
using gpu_test::upload;

// ---- helpers --------------------------------------------------------------------------------------------

// A random f64 tensor whose values the GPU sees exactly in `dt` (rounded to f32 or bf16 first).
Tensor input(const Shape& shape, uint32_t seed, DType dt, double lo = -1.0, double hi = 1.0) {
  Tensor t = test::random_tensor(shape, seed, lo, hi, DType::f64).to(DType::f32);
  if (dt == DType::bf16) t = gpu_test::round_bf16(t);
  return t.to(DType::f64);
}

std::string mnk(int64_t m, int64_t n, int64_t k) {
  return std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
}

// Output tolerance: f32 accumulation (tight), or an output rounded to bf16 (half an ulp: 2^-9 relative).
gpu_test::Tol out_tol(DType c_dt) {
  return c_dt == DType::bf16 ? gpu_test::Tol{1e-6, 8e-3} : gpu_test::Tol{1e-6, 1e-5};
}

// ---- plain GEMMs ------------------------------------------------------------------------------------------

TEST(GemmCuda, AllTransCombinationsOddSizes) {
  const int64_t M = 37, N = 53, K = 29;
  cuda::BlasLt lt;
  const struct {
    DType ab, c;
  } types[] = {{DType::f32, DType::f32}, {DType::bf16, DType::bf16}, {DType::bf16, DType::f32}};
  uint32_t seed = 100;
  for (const auto& ty : types)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        Tensor a = input(ta ? Shape{K, M} : Shape{M, K}, seed++, ty.ab);
        Tensor b = input(tb ? Shape{N, K} : Shape{K, N}, seed++, ty.ab);
        Tensor want = ops::matmul(a, ta, b, tb);
        DeviceBuffer da = upload(a, ty.ab), db = upload(b, ty.ab), dc(size_t(M * N) * dtype_size(ty.c));
        lt.gemm(da.get(), ta, db.get(), tb, dc.get(), M, N, K, ty.ab, ty.c, 1.0f, 0.0f, nullptr);
        Tensor got = download(dc.get(), ty.c, {M, N});
        const std::string op = std::string("gemm.") + (ta ? "T" : "N") + (tb ? "T" : "N") +
                               (ty.c != ty.ab ? ".f32out" : "");
        const auto tol = out_tol(ty.c);
        EXPECT_PARITY(op, ty.ab, mnk(M, N, K), got, want, tol.atol, tol.rtol);
      }
}

TEST(GemmCuda, AlphaBetaAccumulates) {
  const int64_t M = 37, N = 53, K = 29;
  cuda::BlasLt lt;
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int ta = 0; ta < 2; ++ta) {
      Tensor a = input(ta ? Shape{K, M} : Shape{M, K}, 7 + ta, dt);
      Tensor b = input({K, N}, 9, dt);
      Tensor c0 = input({M, N}, 11, DType::f32);  // C is f32 here: beta = 1 accumulation as for dw
      Tensor want = c0.clone();
      ops::matmul(a, ta, b, false, want, 0.5, 1.0);
      DeviceBuffer da = upload(a, dt), db = upload(b, dt), dc = upload(c0, DType::f32);
      lt.gemm(da.get(), ta, db.get(), false, dc.get(), M, N, K, dt, DType::f32, 0.5f, 1.0f, nullptr);
      Tensor got = download(dc.get(), DType::f32, {M, N});
      EXPECT_PARITY(std::string("gemm.beta1") + (ta ? ".TN" : ".NN"), dt, mnk(M, N, K), got, want, 1e-6, 1e-5);
    }
    // beta = 1 with a bf16 C (the C read is exact, the result rounded once).
    if (dt == DType::bf16) {
      Tensor a = input({M, K}, 21, dt), b = input({K, N}, 22, dt), c0 = input({M, N}, 23, dt);
      Tensor want = c0.clone();
      ops::matmul(a, false, b, false, want, 1.0, 1.0);
      DeviceBuffer da = upload(a, dt), db = upload(b, dt), dc = upload(c0, dt);
      lt.gemm(da.get(), false, db.get(), false, dc.get(), M, N, K, dt, dt, 1.0f, 1.0f, nullptr);
      Tensor got = download(dc.get(), dt, {M, N});
      EXPECT_PARITY("gemm.beta1.bf16out", dt, mnk(M, N, K), got, want, 1e-6, 8e-3);
    }
  }
}

TEST(GemmCuda, BatchedWithSharedB) {
  const int64_t Bn = 3, M = 37, N = 53, K = 29;
  cuda::BlasLt lt;
  for (DType dt : {DType::f32, DType::bf16}) {
    const auto tol = out_tol(dt);
    // Shared B, contiguous A and C (folded into one GEMM of Bn * M rows).
    {
      Tensor a = input({Bn, M, K}, 31, dt), b = input({K, N}, 32, dt);
      Tensor want = ops::matmul(a, false, b, false);
      DeviceBuffer da = upload(a, dt), db = upload(b, dt), dc(size_t(Bn * M * N) * dtype_size(dt));
      lt.gemm(da.get(), false, db.get(), false, dc.get(), M, N, K, dt, dt, 1.0f, 0.0f, nullptr, Bn, M * K, 0, M * N);
      EXPECT_PARITY("gemm.batched.sharedB.NN", dt, "3x" + mnk(M, N, K), download(dc.get(), dt, {Bn, M, N}), want,
                    tol.atol, tol.rtol);
    }
    // Shared B with trans_a (a real strided batch with a 0 stride) and trans_b.
    {
      Tensor a = input({Bn, K, M}, 33, dt), b = input({N, K}, 34, dt);
      Tensor want = ops::matmul(a, true, b, true);
      DeviceBuffer da = upload(a, dt), db = upload(b, dt), dc(size_t(Bn * M * N) * dtype_size(dt));
      lt.gemm(da.get(), true, db.get(), true, dc.get(), M, N, K, dt, dt, 1.0f, 0.0f, nullptr, Bn, M * K, 0, M * N);
      EXPECT_PARITY("gemm.batched.sharedB.TT", dt, "3x" + mnk(M, N, K), download(dc.get(), dt, {Bn, M, N}), want,
                    tol.atol, tol.rtol);
    }
    // Every operand batched.
    {
      Tensor a = input({Bn, M, K}, 35, dt), b = input({Bn, N, K}, 36, dt);
      Tensor want = ops::matmul(a, false, b, true);
      DeviceBuffer da = upload(a, dt), db = upload(b, dt), dc(size_t(Bn * M * N) * dtype_size(dt));
      lt.gemm(da.get(), false, db.get(), true, dc.get(), M, N, K, dt, dt, 1.0f, 0.0f, nullptr, Bn, M * K, N * K,
              M * N);
      EXPECT_PARITY("gemm.batched.NT", dt, "3x" + mnk(M, N, K), download(dc.get(), dt, {Bn, M, N}), want, tol.atol,
                    tol.rtol);
    }
  }
}

TEST(GemmCuda, EmptyKZeroesOrKeepsC) {
  cuda::BlasLt lt;
  const int64_t M = 5, N = 7;
  Tensor c0 = input({M, N}, 41, DType::f32, 1.0, 2.0);
  DeviceBuffer dc = upload(c0, DType::f32), dummy(256);
  lt.gemm(dummy.get(), false, dummy.get(), false, dc.get(), M, N, 0, DType::f32, DType::f32, 1.0f, 1.0f, nullptr);
  EXPECT_EQ(test::max_abs_err(download(dc.get(), DType::f32, {M, N}), c0), 0.0) << "K = 0, beta = 1 keeps C";
  lt.gemm(dummy.get(), false, dummy.get(), false, dc.get(), M, N, 0, DType::f32, DType::f32, 1.0f, 0.0f, nullptr);
  EXPECT_EQ(test::max_abs_err(download(dc.get(), DType::f32, {M, N}), Tensor::zeros({M, N}, DType::f64)), 0.0)
      << "K = 0, beta = 0 zeroes C";
  // M = 0 is a no-op (no launch, no error).
  lt.gemm(dummy.get(), false, dummy.get(), false, dc.get(), 0, N, 3, DType::f32, DType::f32, 1.0f, 0.0f, nullptr);
}

TEST(GemmCuda, ErrorsNameTheProblem) {
  cuda::BlasLt lt;
  DeviceBuffer d(4096);
  std::string e = test::error_of([&] {
    lt.gemm(d.get(), false, d.get(), false, d.get(), 4, 4, 4, DType::i32, DType::f32, 1.0f, 0.0f, nullptr);
  });
  EXPECT_NE(e.find("i32"), std::string::npos) << e;
  e = test::error_of([&] {
    lt.gemm(d.get(), false, d.get(), false, d.get(), 4, 5, 6, DType::f32, DType::bf16, 1.0f, 0.0f, nullptr);
  });
  EXPECT_NE(e.find("M=4 N=5 K=6"), std::string::npos) << e;
  EXPECT_NE(e.find("bf16"), std::string::npos) << e;
}

// ---- Linear -----------------------------------------------------------------------------------------------

void check_linear(cuda::BlasLt& lt, DType dt, int64_t n, int64_t in, int64_t out, uint32_t seed, bool backward) {
  const std::string shape = "n" + std::to_string(n) + " " + std::to_string(in) + "->" + std::to_string(out);
  Tensor x = input({n, in}, seed, dt), w = input({out, in}, seed + 1, dt, -0.1, 0.1);
  DeviceBuffer dx_in = upload(x, dt), dw_in = upload(w, dt);
  {
    Tensor want = ops::linear_forward(x, w);
    DeviceBuffer dy(size_t(n * out) * dtype_size(dt));
    lt.linear_forward(dx_in.get(), dw_in.get(), dy.get(), n, in, out, dt, nullptr);
    const auto tol = out_tol(dt);
    EXPECT_PARITY("linear_fwd", dt, shape, download(dy.get(), dt, {n, out}), want, tol.atol, tol.rtol);
  }
  if (!backward) return;
  Tensor dy = input({n, out}, seed + 2, dt);
  Tensor dw0 = input({out, in}, seed + 3, DType::f32, -0.01, 0.01);  // dw accumulates onto this
  Tensor want_dx, want_dw = dw0.clone();
  ops::linear_backward(x, w, dy, &want_dx, &want_dw);
  DeviceBuffer d_dy = upload(dy, dt), d_dx(size_t(n * in) * dtype_size(dt)), d_dw = upload(dw0, DType::f32);
  lt.linear_backward(dx_in.get(), dw_in.get(), d_dy.get(), d_dx.get(), d_dw.as<float>(), n, in, out, dt, nullptr);
  const auto tol = out_tol(dt);
  EXPECT_PARITY("linear_bwd.dx", dt, shape, download(d_dx.get(), dt, {n, in}), want_dx, tol.atol, tol.rtol);
  EXPECT_PARITY("linear_bwd.dw", dt, shape, download(d_dw.get(), DType::f32, {out, in}), want_dw, 1e-6, 1e-5);
  // Null outputs are skipped; dw accumulates again (micro-batches add up).
  lt.linear_backward(dx_in.get(), dw_in.get(), d_dy.get(), nullptr, d_dw.as<float>(), n, in, out, dt, nullptr);
  Tensor want_dw2 = want_dw.clone();
  ops::linear_backward(x, w, dy, nullptr, &want_dw2);
  EXPECT_PARITY("linear_bwd.dw.twice", dt, shape, download(d_dw.get(), DType::f32, {out, in}), want_dw2, 1e-6, 1e-5);
}

TEST(GemmCuda, LinearForwardBackwardOddSizes) {
  cuda::BlasLt lt;
  for (DType dt : {DType::f32, DType::bf16}) check_linear(lt, dt, 37, 29, 53, 51, true);
}

TEST(GemmCuda, LinearNearRealShapes) {
  cuda::BlasLt lt;
  for (DType dt : {DType::f32, DType::bf16}) {
    check_linear(lt, dt, 512, 1024, 3072, 61, true);     // the MLP up projection
    check_linear(lt, dt, 16, 64, 151936, 71, false);  // the LM head's vocabulary (D cut to 64 so the f64 CPU
                                                      // reference stays small; forward only)
  }
}

}  // namespace
}  // namespace opdlm
