// CPU RoPE (rotate-half, explicit positions): table construction in double, rotation in the
// tensor's precision.
#include "opdlm/ops/rope.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace opdlm::ops {
namespace {

// `name`: the tensor whose dimension 2 is head_dim, or nullptr for the head_dim argument.
void check_head_dim(int64_t head_dim, const char* name) {
  if (head_dim > 0 && head_dim % 2 == 0) return;
  if (name)
    OPDLM_FAIL("rope: tensor '", name, "' dimension 2 (head_dim) is ", head_dim,
               ", must be even and > 0 (rotate-half pairs j with j + head_dim/2)");
  OPDLM_FAIL("rope: head_dim is ", head_dim, ", must be even and > 0 (rotate-half pairs j with j + head_dim/2)");
}

template <class T>
void fill_table(const int32_t* pos, int64_t tokens, int64_t half, double theta, T* c, T* s) {
  std::vector<double> inv(static_cast<size_t>(half));
  // Same expression as torch: 1 / theta ** (arange(0, hd, 2) / hd), in float64.
  for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(2 * half));
#pragma omp parallel for schedule(static) if (tokens * half > (1 << 12))
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double a = double(pos[t]) * inv[size_t(i)];
      c[t * half + i] = static_cast<T>(std::cos(a));
      s[t * half + i] = static_cast<T>(std::sin(a));
    }
}

template <class T>
void rotate(T* x, const T* c, const T* s, int64_t tokens, int64_t heads, int64_t half, bool inverse) {
  const int64_t hd = 2 * half;
#pragma omp parallel for schedule(static) if (tokens * heads * hd > (1 << 14))
  for (int64_t t = 0; t < tokens; ++t) {
    const T* ct = c + t * half;
    const T* st = s + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (t * heads + h) * hd;
      if (!inverse) {
        for (int64_t j = 0; j < half; ++j) {
          const T a = v[j], b = v[j + half];
          v[j] = a * ct[j] - b * st[j];
          v[j + half] = b * ct[j] + a * st[j];
        }
      } else {
        for (int64_t j = 0; j < half; ++j) {
          const T a = v[j], b = v[j + half];
          v[j] = a * ct[j] + b * st[j];
          v[j + half] = b * ct[j] - a * st[j];
        }
      }
    }
  }
}

}  // namespace

RopeTable rope_table(const Tensor& positions, int64_t head_dim, double theta, DType dtype) {
  expect_cpu(positions, "positions");
  expect_dtype(positions, "positions", {DType::i32});
  expect_ndim(positions, "positions", 1);
  check_head_dim(head_dim, nullptr);
  if (!(theta > 0)) OPDLM_FAIL("rope: theta = ", theta, " must be > 0");
  if (dtype != DType::f32 && dtype != DType::f64)
    OPDLM_FAIL("rope: table dtype ", dtype_name(dtype), " unsupported; expected f32 or f64");
  const int64_t tokens = positions.size(0), half = head_dim / 2;
  RopeTable t{Tensor::empty({tokens, half}, dtype), Tensor::empty({tokens, half}, dtype), head_dim};
  if (dtype == DType::f32)
    fill_table(positions.data<int32_t>(), tokens, half, theta, t.cos.data<float>(), t.sin.data<float>());
  else
    fill_table(positions.data<int32_t>(), tokens, half, theta, t.cos.data<double>(), t.sin.data<double>());
  return t;
}

// Validates x (called `name` in messages) against the table and rotates it in place.
static void apply(Tensor& x, const char* name, const RopeTable& table, bool inverse) {
  expect_float_cpu(x, name);
  expect_ndim(x, name, 3);
  check_head_dim(x.size(2), name);
  expect_float_cpu(table.cos, "cos");
  expect_float_cpu(table.sin, "sin");
  expect_same_dtype(x, name, table.cos, "cos");
  expect_same_dtype(x, name, table.sin, "sin");
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  const std::string why = std::string("[tokens, head_dim/2] of '") + name + "'";
  expect_shape(table.cos, "cos", {tokens, half}, why);
  expect_shape(table.sin, "sin", {tokens, half}, why);
  if (x.dtype() == DType::f32)
    rotate(x.data<float>(), table.cos.data<float>(), table.sin.data<float>(), tokens, heads, half, inverse);
  else
    rotate(x.data<double>(), table.cos.data<double>(), table.sin.data<double>(), tokens, heads, half, inverse);
}

void rope_inplace(Tensor& x, const RopeTable& table, bool inverse) { apply(x, "x", table, inverse); }

Tensor rope_forward(const Tensor& x, const RopeTable& table) {
  expect_float_cpu(x, "x");
  Tensor y = x.clone();
  apply(y, "x", table, false);
  return y;
}

Tensor rope_backward(const Tensor& dy, const RopeTable& table) {
  expect_float_cpu(dy, "dy");
  Tensor dx = dy.clone();
  apply(dx, "dy", table, true);
  return dx;
}

// Checks x before building the table so shape errors name 'x' (or 'dy'), not the table.
static RopeTable table_for(const Tensor& x, const char* name, const Tensor& positions, double theta) {
  expect_float_cpu(x, name);
  expect_ndim(x, name, 3);
  check_head_dim(x.size(2), name);
  expect_cpu(positions, "positions");
  expect_ndim(positions, "positions", 1);
  expect_dim(positions, "positions", 0, x.size(0), std::string("tokens of '") + name + "'");
  return rope_table(positions, x.size(2), theta, x.dtype());
}

Tensor rope_forward(const Tensor& x, const Tensor& positions, double theta) {
  return rope_forward(x, table_for(x, "x", positions, theta));
}

Tensor rope_backward(const Tensor& dy, const Tensor& positions, double theta) {
  return rope_backward(dy, table_for(dy, "dy", positions, theta));
}

}  // namespace opdlm::ops
