// Tests for base/: Philox known answers, keyed draws (uniformity, no modulo bias, independence of
// keys), Error context formatting, and the MPI/HDF5 check macros.
#include <gtest/gtest.h>
#include <unistd.h>
#include <sys/wait.h>
#include <csignal>
#include <hdf5.h>
#include <mpi.h>

#include <cmath>
#include <set>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/base/stop.hpp"
#include "opdlm/base/log.hpp"
#include "opdlm/base/rng.hpp"

using namespace opdlm;

// Random123 kat_vectors, the three "philox4x32 10" lines: counter, key -> output.
TEST(Philox, KnownAnswerVectors) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (PhiloxCounter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}),
            (PhiloxCounter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}),
            (PhiloxCounter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

TEST(CounterRng, StreamLayoutIsPhiloxOfTheKey) {
  RngKey k{7, RngPurpose::rollout_token, 3, 11, 5};
  CounterRng r(k);
  for (uint32_t blk = 0; blk < 3; ++blk) {
    PhiloxCounter want = philox4x32_10({blk, 5, 11, 3}, {7, 3});
    for (uint32_t w = 0; w < 4; ++w) EXPECT_EQ(r.u32(blk * 4 + w), want[w]);
  }
}

TEST(CounterRng, EveryKeyFieldChangesTheStream) {
  RngKey base{1, RngPurpose::state_select, 2, 3, 4};
  const uint32_t ref = CounterRng(base).u32(0);
  std::vector<RngKey> variants(5, base);
  variants[0].seed = 9;
  variants[1].purpose = RngPurpose::random_mask;
  variants[2].step = 9;
  variants[3].sample_id = 9;
  variants[4].position = 9;
  for (const auto& v : variants) EXPECT_NE(CounterRng(v).u32(0), ref);
}

TEST(CounterRng, UniformRangeAndMoments) {
  CounterRng r({42, RngPurpose::test, 0, 0, 0});
  const int n = 200000;
  double sum = 0, sum2 = 0;
  for (int i = 0; i < n; ++i) {
    float u = r.uniform(i), uo = r.uniform_open(i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    ASSERT_GT(uo, 0.0f);
    ASSERT_LT(uo, 1.0f);
    double d = r.uniform_open_f64(i);
    ASSERT_GT(d, 0.0);
    ASSERT_LT(d, 1.0);
    sum += u;
    sum2 += double(u) * u;
  }
  // mean 1/2 and variance 1/12; 5 standard errors.
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(sum2 / n - (sum / n) * (sum / n), 1.0 / 12, 0.002);
}

TEST(CounterRng, BelowIsUnbiasedAndInRange) {
  // n = 3 * 2^30: plain modulo would make residues < 2^30 twice as likely as the others.
  CounterRng r({5, RngPurpose::test, 0, 0, 0});
  CounterRng::Cursor c(r);
  const uint32_t n = 3u << 30;
  const int draws = 60000;
  int low = 0;
  for (int i = 0; i < draws; ++i) {
    uint32_t v = c.below(n);
    ASSERT_LT(v, n);
    low += v < (1u << 30);
  }
  // Unbiased: P(v < 2^30) = 1/3. Modulo bias would give 1/2.
  EXPECT_NEAR(double(low) / draws, 1.0 / 3, 0.01);
  EXPECT_GT(c.consumed(), uint32_t(draws));  // rejections happened (threshold is 2^30)
  // Small n: a chi-square style check on a fair die.
  CounterRng::Cursor d(r, 1000000);
  std::vector<int> counts(6, 0);
  for (int i = 0; i < 60000; ++i) counts[d.below(6)]++;
  for (int k = 0; k < 6; ++k) EXPECT_NEAR(counts[k], 10000, 500);
  EXPECT_THROW(d.below(0), Error);
}

TEST(CounterRng, GumbelMoments) {
  CounterRng r({3, RngPurpose::test, 0, 0, 0});
  const int n = 100000;
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += r.gumbel(i);
  EXPECT_NEAR(sum / n, 0.5772156649, 0.02);  // Euler-Mascheroni constant
}

TEST(CounterRng, NormalMoments) {
  CounterRng r({8, RngPurpose::param_init, 0, 0, 0});
  const int n = 100000;
  double sum = 0, sum2 = 0, sum4 = 0;
  for (int i = 0; i < n; ++i) {
    double z = r.normal(i);
    sum += z;
    sum2 += z * z;
    sum4 += z * z * z * z;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.02);
  EXPECT_NEAR(sum2 / n, 1.0, 0.02);
  EXPECT_NEAR(sum4 / n, 3.0, 0.1);  // kurtosis of a normal
}

TEST(CounterRng, CategoricalGumbelMatchesSoftmaxAndShards) {
  const std::vector<float> logits = {0.0f, std::log(2.0f), std::log(3.0f), -INFINITY};
  std::vector<int> counts(4, 0);
  const int n = 30000;
  for (int s = 0; s < n; ++s) {
    CounterRng r({11, RngPurpose::rollout_token, 0, uint32_t(s), 0});
    int64_t v = categorical_gumbel(r, logits.data(), 4, 0);
    counts[v]++;
    // Vocab-parallel: two shards [0,2) and [2,4) each take their argmax; the larger score wins.
    double s0 = 0, s1 = 0;
    int64_t a = categorical_gumbel(r, logits.data(), 2, 0, &s0);
    int64_t b = categorical_gumbel(r, logits.data() + 2, 2, 2, &s1);
    ASSERT_EQ(v, s0 >= s1 ? a : b + 2);
  }
  EXPECT_EQ(counts[3], 0);
  EXPECT_NEAR(counts[0] / double(n), 1.0 / 6, 0.01);
  EXPECT_NEAR(counts[1] / double(n), 2.0 / 6, 0.01);
  EXPECT_NEAR(counts[2] / double(n), 3.0 / 6, 0.01);
}

TEST(CounterRng, CategoricalInverseCdf) {
  const std::vector<float> w = {1.0f, 0.0f, 3.0f};
  std::vector<int> counts(3, 0);
  for (int s = 0; s < 20000; ++s) counts[categorical_inverse_cdf(CounterRng({1, RngPurpose::test, 0, uint32_t(s), 0}), w.data(), 3)]++;
  EXPECT_EQ(counts[1], 0);
  EXPECT_NEAR(counts[0] / 20000.0, 0.25, 0.015);
  const std::vector<float> zero = {0.0f, 0.0f};
  EXPECT_EQ(categorical_inverse_cdf(CounterRng({1, RngPurpose::test, 0, 0, 0}), zero.data(), 2), -1);
  const std::vector<float> bad = {1.0f, -1.0f};
  EXPECT_THROW(categorical_inverse_cdf(CounterRng({1, RngPurpose::test, 0, 0, 0}), bad.data(), 2), Error);
}

TEST(Error, CarriesFileFieldRankStepAndSource) {
  set_error_rank(3);
  set_error_step(120);
  try {
    OPDLM_FAIL_AT("configs/x.ini", "model.hidden_size", "must be positive, got ", -4);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("must be positive, got -4"), std::string::npos) << w;
    EXPECT_NE(w.find("file configs/x.ini"), std::string::npos) << w;
    EXPECT_NE(w.find("field model.hidden_size"), std::string::npos) << w;
    EXPECT_NE(w.find("rank 3"), std::string::npos) << w;
    EXPECT_NE(w.find("step 120"), std::string::npos) << w;
    EXPECT_NE(w.find("test_base.cpp:"), std::string::npos) << w;
    EXPECT_EQ(e.context().field, "model.hidden_size");
    EXPECT_EQ(e.context().rank, 3);
    EXPECT_EQ(e.context().step, 120);
  }
  set_error_rank(-1);
  set_error_step(-1);
  try {
    OPDLM_CHECK(1 + 1 == 3, "arithmetic is broken");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1 + 1 == 3"), std::string::npos);
    EXPECT_EQ(e.context().rank, -1);
  }
}

TEST(CheckMacros, Hdf5FailureNamesTheCallAndLibraryMessage) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // silence HDF5's own stderr dump
  try {
    HDF5_CHECK(H5Fopen("/nonexistent/dir/file.h5", H5F_ACC_RDONLY, H5P_DEFAULT));
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("H5Fopen"), std::string::npos) << w;
    EXPECT_NE(w.find("test_base.cpp"), std::string::npos) << w;
  }
  // The value of a successful call passes through.
  hid_t space = HDF5_CHECK(H5Screate(H5S_SCALAR));
  EXPECT_GE(space, 0);
  H5Sclose(space);
}

TEST(CheckMacros, MpiFailureNamesTheCall) {
  int init = 0;
  MPI_Initialized(&init);
  if (!init) MPI_Init(nullptr, nullptr);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int x = 0;
  try {
    MPI_CHECK(MPI_Bcast(&x, 1, MPI_INT, /*root=*/99, MPI_COMM_WORLD));
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("MPI_Bcast"), std::string::npos) << w;
    EXPECT_NE(w.find("MPI call failed"), std::string::npos) << w;
  }
}

TEST(Logging, ParsesSeverities) {
  EXPECT_EQ(parse_severity("debug"), Severity::debug);
  EXPECT_THROW(parse_severity("loud"), Error);
  init_logging({});
  OPDLM_LOG(info) << "logging works";
}

#ifdef OPDLM_HAVE_CUDA
// These fail the same way with or without a GPU: the arguments themselves are invalid.
TEST(CheckMacros, CudaFailureNamesTheCallAndCudaMessage) {
  try {
    CUDA_CHECK(cudaSetDevice(-1));
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("cudaSetDevice(-1)"), std::string::npos) << w;
    EXPECT_NE(w.find("CUDA call failed"), std::string::npos) << w;
    EXPECT_NE(w.find("test_base.cpp"), std::string::npos) << w;
  }
}

TEST(CheckMacros, NcclFailureNamesTheCall) {
  try {
    NCCL_CHECK(ncclGetUniqueId(nullptr));
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find("ncclGetUniqueId"), std::string::npos) << w;
    EXPECT_NE(w.find("NCCL call failed"), std::string::npos) << w;
  }
}
#endif

// The stop handlers (base/stop.hpp): SIGTERM, SIGUSR1 and a first SIGINT only set the flag (the
// first signal is kept); a second SIGINT ends the process at once with 130 (checked in a child).
TEST(StopSignals, TheFirstSignalIsKeptAndASecondSigintExitsAtOnce) {
  opdlm::install_stop_handlers();
  opdlm::reset_stop_signal();
  EXPECT_EQ(opdlm::stop_signal(), 0);
  std::raise(SIGUSR1);
  EXPECT_EQ(opdlm::stop_signal(), SIGUSR1);
  std::raise(SIGTERM);
  EXPECT_EQ(opdlm::stop_signal(), SIGUSR1);  // the first one is what the log reports
  std::raise(SIGINT);                         // a first ^C: still running
  EXPECT_EQ(opdlm::stop_signal(), SIGUSR1);
  opdlm::reset_stop_signal();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::raise(SIGINT);
    std::raise(SIGINT);
    _exit(0);  // not reached
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  opdlm::reset_stop_signal();
  signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL), signal(SIGUSR1, SIG_DFL);
}

