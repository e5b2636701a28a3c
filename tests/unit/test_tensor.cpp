// Tests for tensor/: construction, views and slices, bf16 round-to-nearest-even, conversions, and
// the shape/dtype checks whose messages must name the tensor and the dimension.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "opdlm/base/error.hpp"
#include "opdlm/tensor/tensor.hpp"

using namespace opdlm;

static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(Bf16, RoundToNearestEven) {
  // Exactly representable.
  EXPECT_EQ(f32_to_bf16_bits(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16_bits(-2.0f), 0xc000);
  // Halfway cases: ties go to the even mantissa.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f808000u)), 0x3f80);  // tie, 0x3f80 even -> down
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f818000u)), 0x3f82);  // tie, 0x3f81 odd -> up
  // Just above / below halfway.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x3f807fffu)), 0x3f80);
  // Overflow rounds to infinity; infinities and NaN survive.
  EXPECT_EQ(f32_to_bf16_bits(from_bits(0x7f7fffffu)), 0x7f80);
  EXPECT_EQ(f32_to_bf16_bits(INFINITY), 0x7f80);
  EXPECT_EQ(f32_to_bf16_bits(-INFINITY), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(NAN))));
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(from_bits(0x7f800001u)))));  // signalling NaN stays NaN
  // Round trip of every bf16 value that is not NaN is exact.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    float f = bf16_bits_to_f32(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_bf16_bits(f), b);
  }
}

TEST(Tensor, ZerosViewsSlices) {
  Tensor t({2, 3, 4});
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.size(-1), 4);
  for (int64_t i = 0; i < 24; ++i) EXPECT_EQ(t.item(i), 0.0);
  for (int64_t i = 0; i < 24; ++i) t.data<float>()[i] = float(i);
  Tensor v = t.view({6, -1});
  EXPECT_EQ(v.shape(), (Shape{6, 4}));
  Tensor s = v.slice(2, 4);
  EXPECT_EQ(s.shape(), (Shape{2, 4}));
  EXPECT_EQ(s.item(0), 8.0);
  s.data<float>()[0] = -1;  // shares storage
  EXPECT_EQ(t.item(8), -1.0);
  Tensor c = t.clone();
  c.data<float>()[8] = 5;
  EXPECT_EQ(t.item(8), -1.0);
  EXPECT_THROW(t.view({5, 5}), Error);
  EXPECT_THROW(t.view({-1, -1}), Error);
  EXPECT_THROW(t.slice(1, 3), Error);
  EXPECT_THROW(t.size(3), Error);
  EXPECT_THROW(Tensor({2, -1}), Error);
}

TEST(Tensor, ColumnsCopiesABlockOfColumns) {
  const Tensor t = Tensor::from_vector(std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}, {2, 4});
  const Tensor c = t.columns(1, 3);
  EXPECT_EQ(c.shape(), (Shape{2, 2}));
  EXPECT_EQ(c.to_f64_vector(), (std::vector<double>{1, 2, 5, 6}));
  EXPECT_NE(c.raw_data(), t.raw_data());  // a copy
  EXPECT_EQ(t.columns(4, 4).numel(), 0);
  EXPECT_THROW(t.columns(2, 5), opdlm::Error);
  EXPECT_THROW(t.view({8}).columns(0, 1), opdlm::Error);
}

TEST(Tensor, DtypeConversions) {
  Tensor a = Tensor::from_vector(std::vector<float>{1.0f, 1.00390625f, -3.5f, 1e-3f}, {4});
  Tensor b = a.to(DType::bf16);
  EXPECT_EQ(b.dtype(), DType::bf16);
  EXPECT_EQ(b.item(0), 1.0);
  EXPECT_EQ(b.item(1), 1.0);  // tie at 1 + 2^-8 rounds to even (1.0)
  EXPECT_EQ(b.item(2), -3.5);
  EXPECT_NEAR(b.item(3), 1e-3, 4e-6);
  Tensor d = a.to(DType::f64);
  EXPECT_EQ(d.item(1), 1.00390625);
  Tensor i = Tensor::from_vector(std::vector<float>{1, 2, -3}, {3}).to(DType::i32);
  EXPECT_EQ(i.data<int32_t>()[2], -3);
  EXPECT_THROW(a.to(DType::i32), Error);  // 1.0039 is not an integer
  EXPECT_THROW(a.data<double>(), Error);
}

TEST(Tensor, ChecksNameTensorAndDimension) {
  Tensor x({4, 8});
  try {
    expect_dim(x, "x", 1, 16, "hidden size of 'weight'");
    FAIL();
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("'x'"), std::string::npos) << w;
    EXPECT_NE(w.find("dimension 1 is 8, expected 16"), std::string::npos) << w;
    EXPECT_NE(w.find("hidden size of 'weight'"), std::string::npos) << w;
  }
  try {
    expect_dtype(x, "ids", {DType::i32});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'ids'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("unsupported dtype f32"), std::string::npos);
  }
  EXPECT_THROW(expect_ndim(x, "x", 3), Error);
  EXPECT_THROW(expect_float_cpu(Tensor({2}, DType::bf16), "w"), Error);
  EXPECT_NO_THROW(expect_float_cpu(Tensor({2}, DType::f64), "w"));
  EXPECT_THROW(expect_defined(Tensor(), "grad"), Error);
}

#ifndef OPDLM_HAVE_CUDA
TEST(Tensor, CudaTensorWithoutCudaBuildIsAClearError) {
  try {
    Tensor t({2}, DType::f32, Device::cuda);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos);
  }
}
#endif
