// Helpers of the GPU parity suite (see gpu_test_util.hpp) and its main: skips (exit 77) without a GPU.
#include "gpu_test_util.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>

namespace opdlm::gpu_test {

DeviceBuffer upload(const Tensor& t, DType dt) {
  Tensor h = t;
  if (t.dtype() != dt) h = t.to(dt);
  DeviceBuffer b(h.nbytes());
  if (h.nbytes()) CUDA_CHECK(cudaMemcpy(b.get(), h.raw_data(), h.nbytes(), cudaMemcpyHostToDevice));
  return b;
}

Tensor download(const void* dev, DType dt, const Shape& shape) {
  Tensor h = Tensor::empty(shape, dt);
  if (h.nbytes()) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(h.raw_data(), dev, h.nbytes(), cudaMemcpyDeviceToHost));
  }
  return dt == DType::i32 ? h : h.to(DType::f64);
}

Tensor round_bf16(const Tensor& t) { return t.to(DType::bf16).to(DType::f32); }

ErrorStats compare(const Tensor& got, const Tensor& want, double rel_floor) {
  ErrorStats s;
  auto g = got.to_f64_vector(), w = want.to_f64_vector();
  if (g.size() != w.size()) {
    s.nonfinite = -1;
    s.max_abs = INFINITY;
    return s;
  }
  for (size_t i = 0; i < g.size(); ++i) {
    if (!std::isfinite(w[i])) {
      if (!(g[i] == w[i]) && !(std::isnan(g[i]) && std::isnan(w[i]))) {
        ++s.nonfinite;
        s.worst = int64_t(i);
      }
      continue;
    }
    s.ref_max = std::max(s.ref_max, std::fabs(w[i]));
    if (!std::isfinite(g[i])) {
      ++s.nonfinite;
      s.worst = int64_t(i);
      continue;
    }
    double a = std::fabs(g[i] - w[i]);
    if (a > s.max_abs) s.max_abs = a, s.worst = int64_t(i);
    s.max_rel = std::max(s.max_rel, a / std::max(std::fabs(w[i]), rel_floor));
  }
  return s;
}

bool parity(const std::string& op, DType dt, const std::string& shape, const ErrorStats& st, double atol,
            double rtol) {
  bool ok = st.nonfinite == 0 && st.max_abs <= atol + rtol * st.ref_max;
  char line[512];
  std::snprintf(line, sizeof line, "PARITY %-28s %-5s %-24s max_abs %.3e max_rel %.3e ref_max %.3e tol %.1e+%.1e*ref %s",
                op.c_str(), dtype_name(dt), shape.c_str(), st.max_abs, st.max_rel, st.ref_max, atol, rtol,
                ok ? "ok" : "FAIL");
  std::printf("%s\n", line);
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (const char* path = std::getenv("OPDLM_GPU_REPORT"); path && *path) {
    std::ofstream f(path, std::ios::app);
    f << line << "\n";
  }
  return ok;
}

}  // namespace opdlm::gpu_test

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("opdlm_gpu_tests: no CUDA device visible: skipped (the GPU suite runs with tools/gpu-check.sh on a GPU)\n");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
