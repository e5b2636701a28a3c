// DeviceArena: alignment of carved blocks, mark/release scopes, the overflow error text (arena, request,
// used, capacity), the high-water mark and the report line.
#include <cstdint>
#include <string>

#include "gpu_test_util.hpp"
#include "opdlm/tensor/cuda/device_arena.hpp"
#include "test_util.hpp"

namespace opdlm {
namespace {

using cuda::DeviceArena;

uintptr_t addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

TEST(DeviceArena, AlignsEveryBlock) {
  DeviceArena a(size_t(1) << 20, "align");
  void* p0 = a.alloc(3, 1, "tiny");
  EXPECT_EQ(a.used(), 3u);
  void* p1 = a.alloc(10, 256, "b");
  EXPECT_EQ(addr(p1) % 256, 0u);
  EXPECT_GE(addr(p1), addr(p0) + 3);
  void* p2 = a.alloc(1, 1024, "c");
  EXPECT_EQ(addr(p2) % 1024, 0u);
  float* f = a.alloc_n<float>(7, "floats");
  EXPECT_EQ(addr(f) % 256, 0u);
  EXPECT_GE(addr(f), addr(p2) + 1);
  // The blocks are usable device memory.
  CUDA_CHECK(cudaMemset(f, 0, 7 * sizeof(float)));
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_THROW(a.alloc(8, 3, "odd"), Error);  // not a power of two
}

TEST(DeviceArena, MarkReleaseAndHighWater) {
  DeviceArena a(size_t(4) << 20, "scopes");
  void* base = a.alloc(1000, 256, "params");
  const size_t m = a.mark();
  EXPECT_EQ(m, 1024u);  // rounded up to the alignment
  void* layer = a.alloc(size_t(1) << 20, 256, "layer");
  EXPECT_EQ(a.used(), m + (size_t(1) << 20));
  a.release(m);
  EXPECT_EQ(a.used(), m);
  EXPECT_EQ(a.high_water(), m + (size_t(1) << 20));
  void* again = a.alloc(512, 256, "layer2");
  EXPECT_EQ(again, layer) << "a released scope is reused";
  a.reset();
  EXPECT_EQ(a.used(), 0u);
  EXPECT_EQ(a.alloc(16, 256, "first"), base);
  EXPECT_EQ(a.high_water(), m + (size_t(1) << 20));
  EXPECT_THROW(a.release(a.used() + 1), Error);
}

TEST(DeviceArena, OverflowErrorNamesArenaRequestUsedAndCapacity) {
  DeviceArena a(size_t(1) << 20, "activations");
  a.alloc(size_t(512) << 10, 256, "hidden");
  const std::string e = test::error_of([&] { a.alloc(size_t(2) << 20, 256, "logits"); });
  EXPECT_NE(e.find("activations"), std::string::npos) << e;
  EXPECT_NE(e.find("logits"), std::string::npos) << e;
  EXPECT_NE(e.find("2.00 MiB"), std::string::npos) << e;  // the request
  EXPECT_NE(e.find("0.50 MiB"), std::string::npos) << e;  // used
  EXPECT_NE(e.find("1.00 MiB"), std::string::npos) << e;  // capacity
  EXPECT_EQ(a.used(), size_t(512) << 10) << "a failed alloc changes nothing";
  // Exactly full fits; one more byte does not.
  a.alloc(size_t(512) << 10, 256, "rest");
  EXPECT_EQ(a.used(), a.capacity());
  EXPECT_THROW(a.alloc(1, 1, "one more"), Error);
}

TEST(DeviceArena, Report) {
  DeviceArena a(size_t(64) << 20, "arena");
  a.alloc(size_t(48) << 20, 256, "x");
  EXPECT_EQ(a.report(), "arena: 48.00 MiB of 64.00 MiB used (high water 48.00 MiB)");
  DeviceArena big(size_t(2) << 30, "big");
  const size_t m = big.mark();
  big.alloc(size_t(7) << 28, 256, "most");  // 1.75 GiB
  big.release(m);
  big.alloc(size_t(3) << 29, 256, "some");  // 1.5 GiB
  EXPECT_EQ(big.report(), "big: 1.50 GiB of 2.00 GiB used (high water 1.75 GiB)");
}

}  // namespace
}  // namespace opdlm
