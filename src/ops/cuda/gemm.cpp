// Dense GEMMs on the GPU through cuBLASLt: row-major operands as ops::matmul, fp32 accumulation
// (exact fp32 for f32 inputs: CUBLAS_COMPUTE_32F, never TF32), one heuristic query per distinct
// problem (its algo, descriptor and layouts cached), plus the bias-free Linear forward/backward.
#include "opdlm/ops/cuda/gemm_cuda.hpp"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <map>
#include <tuple>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"

namespace opdlm::cuda {

namespace {

// ---- the per-handle state -----------------------------------------------------------------------------

// Everything that identifies one cuBLASLt problem: the shape, the operand forms and types, the
// batching, whether C is read, and the operand alignments (the heuristic's algo may need them).
struct GemmKey {
  int64_t M, N, K, batch, stride_a, stride_b, stride_c;
  bool trans_a, trans_b, beta_zero;
  int ab_dt, c_dt;
  uint32_t align_a, align_b, align_c;
  auto tie() const {
    return std::tie(M, N, K, batch, stride_a, stride_b, stride_c, trans_a, trans_b, beta_zero, ab_dt, c_dt, align_a,
                    align_b, align_c);
  }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

// A cached plan: descriptor, layouts (X = the B operand, Y = the A operand, see gemm()) and algo.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lx = nullptr, ly = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// What handle_ points at: the cuBLASLt handle plus the plan cache (the header keeps one opaque pointer).
struct LtState {
  cublasLtHandle_t handle = nullptr;
  std::map<GemmKey, GemmPlan> plans;
};

void destroy_plan(GemmPlan& p) {
  if (p.lx) cublasLtMatrixLayoutDestroy(p.lx);
  if (p.ly) cublasLtMatrixLayoutDestroy(p.ly);
  if (p.lc) cublasLtMatrixLayoutDestroy(p.lc);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = GemmPlan{};
}

cudaDataType_t cuda_type(DType dt, const char* role) {
  switch (dt) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    default: OPDLM_FAIL("cuda::BlasLt::gemm: ", role, " dtype ", dtype_name(dt), " is not supported (f32 or bf16)");
  }
}

const char* status_name(cublasStatus_t s) {
  const char* n = cublasLtGetStatusString(s);
  return n ? n : "unknown cublasStatus_t";
}

// The largest power of two (<= 256) dividing the address and every batch's offset.
uint32_t alignment_of(const void* p, int64_t stride, size_t esize, int64_t batch) {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256u;
  if (batch > 1) bits |= static_cast<uint64_t>(stride) * esize;
  return static_cast<uint32_t>(bits & (~bits + 1));  // lowest set bit
}

}  // namespace

// ---- errors ---------------------------------------------------------------------------------------------

#define LT_CHECK(call, ...)                                                                                   \
  do {                                                                                                        \
    cublasStatus_t opdlm_lt_rc_ = (call);                                                                     \
    if (opdlm_lt_rc_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                                   \
      OPDLM_FAIL("cuda::BlasLt: ", #call, " failed with ", status_name(opdlm_lt_rc_), " (", int(opdlm_lt_rc_), \
                 ") ", __VA_ARGS__);                                                                          \
  } while (0)

// ---- BlasLt ---------------------------------------------------------------------------------------------

BlasLt::BlasLt(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  auto* st = new LtState();
  cublasStatus_t rc = cublasLtCreate(&st->handle);
  if (rc != CUBLAS_STATUS_SUCCESS) {
    delete st;
    OPDLM_FAIL("cuda::BlasLt: cublasLtCreate failed with ", status_name(rc), " (", int(rc), ")");
  }
  handle_ = st;
  if (workspace_bytes_ > 0) {
    cudaError_t e = cudaMalloc(&workspace_, workspace_bytes_);
    if (e != cudaSuccess) {
      cublasLtDestroy(st->handle);
      delete st;
      handle_ = nullptr;
      workspace_ = nullptr;
      OPDLM_FAIL("cuda::BlasLt: cudaMalloc of the ", workspace_bytes_ >> 20, " MiB workspace failed: ",
                 cudaGetErrorString(e));
    }
  }
}

BlasLt::~BlasLt() {
  auto* st = static_cast<LtState*>(handle_);
  if (st) {
    for (auto& [key, plan] : st->plans) destroy_plan(plan);
    if (st->handle) cublasLtDestroy(st->handle);
    delete st;
  }
  if (workspace_) cudaFree(workspace_);
}

// Row-major C [M, N] = op(A) op(B) is column-major C^T [N, M] = op(B)^T op(A)^T: cuBLASLt multiplies
// X = the B buffer by Y = the A buffer with m = N, n = M, k = K. A row-major [r, c] buffer is a
// column-major [c, r] matrix with ld = c, so B stored [K, N] is already op(B)^T (no transpose), and B
// stored [N, K] (trans_b) needs CUBLAS_OP_T; the same for A.
void BlasLt::gemm(const void* A, bool trans_a, const void* B, bool trans_b, void* C, int64_t M, int64_t N, int64_t K,
                  DType ab_dt, DType c_dt, float alpha, float beta, cudaStream_t stream, int64_t batch,
                  int64_t stride_a, int64_t stride_b, int64_t stride_c) {
  auto* st = static_cast<LtState*>(handle_);
  OPDLM_CHECK(st != nullptr, "cuda::BlasLt used after a failed construction");
  OPDLM_CHECK(M >= 0 && N >= 0 && K >= 0 && batch >= 0, "cuda::BlasLt::gemm: negative size M=", M, " N=", N, " K=",
              K, " batch=", batch);
  const cudaDataType_t ab_type = cuda_type(ab_dt, "A/B"), c_type = cuda_type(c_dt, "C");
  if (ab_dt == DType::f32 && c_dt != DType::f32)
    OPDLM_FAIL("cuda::BlasLt::gemm: f32 inputs need an f32 output (got C ", dtype_name(c_dt), "), M=", M, " N=", N,
               " K=", K);
  if (M == 0 || N == 0 || batch == 0) return;
  if (batch > 1)
    OPDLM_CHECK(stride_c >= M * N, "cuda::BlasLt::gemm: batched C stride ", stride_c, " < M*N = ", M * N,
                " (outputs would overlap)");
  const size_t ab_es = dtype_size(ab_dt), c_es = dtype_size(c_dt);

  // K == 0: the product is empty, C = beta * C. cuBLASLt may reject k = 0, so handle it here.
  if (K == 0) {
    if (beta == 1.0f) return;
    OPDLM_CHECK(beta == 0.0f, "cuda::BlasLt::gemm: K = 0 with beta ", beta, " (only 0 or 1) for M=", M, " N=", N);
    for (int64_t b = 0; b < batch; ++b)
      CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(C) + size_t(b * stride_c) * c_es, 0, size_t(M * N) * c_es, stream));
    return;
  }

  // A shared B with contiguous A and C batches is one GEMM of batch * M rows.
  if (batch > 1 && stride_b == 0 && !trans_a && stride_a == M * K && stride_c == M * N) {
    M *= batch;
    batch = 1;
    stride_a = stride_c = 0;
  }
  if (batch == 1) stride_a = stride_b = stride_c = 0;

  const GemmKey key{M,
                    N,
                    K,
                    batch,
                    stride_a,
                    stride_b,
                    stride_c,
                    trans_a,
                    trans_b,
                    beta == 0.0f,
                    int(ab_dt),
                    int(c_dt),
                    alignment_of(A, stride_a, ab_es, batch),
                    alignment_of(B, stride_b, ab_es, batch),
                    alignment_of(C, stride_c, c_es, batch)};
  auto it = st->plans.find(key);
  if (it == st->plans.end()) {
    GemmPlan p;
    try {
      const cublasOperation_t op_x = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_y = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
      LT_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "M=", M, " N=", N, " K=", K);
      LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_x, sizeof(op_x)), "M=", M);
      LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_y, sizeof(op_y)), "M=", M);
      // Column-major (rows, cols, ld) of each buffer as stored.
      const uint64_t x_rows = trans_b ? K : N, x_cols = trans_b ? N : K;
      const uint64_t y_rows = trans_a ? M : K, y_cols = trans_a ? K : M;
      LT_CHECK(cublasLtMatrixLayoutCreate(&p.lx, ab_type, x_rows, x_cols, int64_t(x_rows)), "B layout");
      LT_CHECK(cublasLtMatrixLayoutCreate(&p.ly, ab_type, y_rows, y_cols, int64_t(y_rows)), "A layout");
      LT_CHECK(cublasLtMatrixLayoutCreate(&p.lc, c_type, N, M, N), "C layout");
      if (batch > 1) {
        const int32_t bc = static_cast<int32_t>(batch);
        OPDLM_CHECK(int64_t(bc) == batch, "cuda::BlasLt::gemm: batch ", batch, " exceeds int32");
        const std::tuple<cublasLtMatrixLayout_t, int64_t> ls[] = {{p.lx, stride_b}, {p.ly, stride_a}, {p.lc, stride_c}};
        for (const auto& [l, s] : ls) {
          LT_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof(bc)), "batch");
          LT_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s, sizeof(s)),
                   "batch stride");
        }
      }
      cublasLtMatmulPreference_t pref = nullptr;
      LT_CHECK(cublasLtMatmulPreferenceCreate(&pref), "preference");
      const uint64_t ws = workspace_bytes_;
      cublasStatus_t rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                               sizeof(ws));
      const uint32_t aligns[] = {key.align_b, key.align_a, key.align_c, key.align_c};  // X = B, Y = A, C, D
      const cublasLtMatmulPreferenceAttributes_t align_attrs[] = {
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
      for (int i = 0; i < 4 && rc == CUBLAS_STATUS_SUCCESS; ++i)
        rc = cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &aligns[i], sizeof(aligns[i]));
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulAlgoGetHeuristic(st->handle, p.desc, p.lx, p.ly, p.lc, p.lc, pref, 1, &result, &returned);
      cublasLtMatmulPreferenceDestroy(pref);
      if (rc == CUBLAS_STATUS_SUCCESS && returned == 0) rc = CUBLAS_STATUS_NOT_SUPPORTED;
      if (rc != CUBLAS_STATUS_SUCCESS)
        OPDLM_FAIL("cuda::BlasLt::gemm: no cuBLASLt algorithm for M=", M, " N=", N, " K=", K, " batch=", batch,
                   " trans_a=", trans_a, " trans_b=", trans_b, " A/B ", dtype_name(ab_dt), " C ", dtype_name(c_dt),
                   ": ", status_name(rc), " (", int(rc), ")");
      p.algo = result.algo;
    } catch (...) {
      destroy_plan(p);
      throw;
    }
    it = st->plans.emplace(key, p).first;
  }

  const GemmPlan& p = it->second;
  const cublasStatus_t rc = cublasLtMatmul(st->handle, p.desc, &alpha, B, p.lx, A, p.ly, &beta, C, p.lc, C, p.lc,
                                           &p.algo, workspace_, workspace_bytes_, stream);
  if (rc != CUBLAS_STATUS_SUCCESS)
    OPDLM_FAIL("cuda::BlasLt::gemm: cublasLtMatmul failed for M=", M, " N=", N, " K=", K, " batch=", batch,
               " trans_a=", trans_a, " trans_b=", trans_b, " A/B ", dtype_name(ab_dt), " C ", dtype_name(c_dt), ": ",
               status_name(rc), " (", int(rc), ")");
}

// ---- Linear ---------------------------------------------------------------------------------------------

void BlasLt::linear_forward(const void* x, const void* w, void* y, int64_t n, int64_t in, int64_t out, DType dt,
                            cudaStream_t stream) {
  gemm(x, false, w, true, y, n, out, in, dt, dt, 1.0f, 0.0f, stream);  // y = x @ w^T
}

void BlasLt::linear_backward(const void* x, const void* w, const void* dy, void* dx, float* dw, int64_t n, int64_t in,
                             int64_t out, DType dt, cudaStream_t stream) {
  if (dx) gemm(dy, false, w, false, dx, n, in, out, dt, dt, 1.0f, 0.0f, stream);               // dx = dy @ w
  if (dw) gemm(dy, true, x, false, dw, out, in, n, dt, DType::f32, 1.0f, 1.0f, stream);  // dw += dy^T @ x
}

}  // namespace opdlm::cuda
