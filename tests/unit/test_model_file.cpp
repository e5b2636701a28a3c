// Tests for io/model_file (HDF5 model files: bitwise round trips in f32 and bf16, attributes,
// atomic save, and corrupt files whose errors name the file and the dataset) and io/file_util.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "opdlm/io/file_util.hpp"
#include "opdlm/io/model_file.hpp"
#include "test_util.hpp"

using namespace opdlm;
using namespace opdlm::io;
using opdlm::test::TempDir;
namespace fs = std::filesystem;

namespace {

model::Qwen3Weights tiny(bool tied, DType dtype, uint32_t seed) {
  model::Qwen3Config c;
  c.vocab_size = 24;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 6;
  c.tie_word_embeddings = tied;
  c.mask_token_id = 23;
  model::Qwen3Weights w(c, dtype);
  w.init_random(seed, 0.3);
  return w;
}

void expect_bitwise(const model::Qwen3Weights& a, const model::Qwen3Weights& b) {
  ASSERT_EQ(a.config(), b.config());
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (size_t i = 0; i < a.tensors().size(); ++i) {
    const Tensor &x = a.tensors()[i].value, &y = b.tensors()[i].value;
    EXPECT_EQ(a.tensors()[i].name, b.tensors()[i].name);
    EXPECT_EQ(x.shape(), y.shape());
    EXPECT_EQ(std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()), 0) << a.tensors()[i].name;
  }
}

// Opens a saved model file for editing with the HDF5 C API (the tests' corruption tool).
struct H5Edit {
  hid_t file;
  explicit H5Edit(const std::string& p) : file(H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)) { EXPECT_GE(file, 0); }
  ~H5Edit() { H5Fclose(file); }
};

const std::string kQ1 = "model.layers.1.self_attn.q_proj.weight";

}  // namespace

TEST(ModelFile, RoundTripF32AndBf16AreBitwise) {
  TempDir tmp;
  for (DType dt : {DType::f32, DType::bf16})
    for (bool tied : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (tied ? " tied" : " untied"));
      model::Qwen3Weights w = tiny(tied, dt, 3);
      const std::string p = tmp / "m.h5";
      save_model(p, w, {{"step", 42}, {"tokenizer", "tok.json"}});
      expect_bitwise(w, load_model(p));
      ModelFileInfo info = read_model_info(p);
      EXPECT_EQ(info.format_version, kModelFormatVersion);
      EXPECT_EQ(info.config, w.config());
      EXPECT_EQ(info.dtype, dt);
      EXPECT_EQ(info.extra["step"], 42);
      EXPECT_EQ(info.extra["tokenizer"], "tok.json");
    }
  // No extra attributes: an empty object comes back.
  save_model(tmp / "n.h5", tiny(true, DType::f32, 4));
  EXPECT_TRUE(read_model_info(tmp / "n.h5").extra.empty());
  EXPECT_FALSE(fs::exists(temp_path_for(tmp / "n.h5")));
}

TEST(ModelFile, LargeExtraAttributes) {
  TempDir tmp;
  nlohmann::json big = {{"blob", std::string(200000, 'x')}};  // beyond HDF5's 64 KiB compact limit
  save_model(tmp / "m.h5", tiny(true, DType::f32, 5), big);
  EXPECT_EQ(read_model_info(tmp / "m.h5").extra, big);
}

TEST(ModelFile, FailedSaveKeepsPreviousFile) {
  TempDir tmp;
  const std::string p = tmp / "m.h5";
  model::Qwen3Weights good = tiny(false, DType::f32, 6);
  save_model(p, good);
  const std::string before = test::read_file_bytes(p);
  model::Qwen3Weights bad = tiny(false, DType::f32, 7);
  bad.tensors().back().value = Tensor({2, 2});  // lm_head: fails after the other tensors are written
  EXPECT_ERROR_HAS(save_model(p, bad), p.c_str(), "lm_head.weight", "f32[2, 2]");
  EXPECT_EQ(test::read_file_bytes(p), before);
  EXPECT_FALSE(fs::exists(temp_path_for(p)));
  expect_bitwise(good, load_model(p));
  EXPECT_ERROR_HAS(save_model(tmp.operator/("no_such_dir/m.h5"), good), "no_such_dir");
}

TEST(ModelFile, CorruptFilesNameFileAndDataset) {
  TempDir tmp;
  const model::Qwen3Weights w = tiny(true, DType::f32, 8);
  const std::string p = tmp / "m.h5";
  auto fresh = [&] { save_model(p, w); };

  // A flipped byte inside a tensor's data (bit rot): the sha256 catches it.
  fresh();
  haddr_t off;
  {
    H5Edit e(p);
    hid_t ds = H5Dopen2(e.file, ("tensors/" + kQ1).c_str(), H5P_DEFAULT);
    off = H5Dget_offset(ds);
    H5Dclose(ds);
  }
  ASSERT_NE(off, HADDR_UNDEF);
  {
    std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(off) + 5);
    char c;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(static_cast<std::streamoff>(off) + 5);
    f.write(&c, 1);
  }
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), kQ1.c_str(), "checksum mismatch");

  // Truncated file.
  fresh();
  fs::resize_file(p, fs::file_size(p) / 2);
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), "cannot open HDF5 model file");

  // Missing dataset.
  fresh();
  {
    H5Edit e(p);
    H5Ldelete(e.file, ("tensors/" + kQ1).c_str(), H5P_DEFAULT);
  }
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), kQ1.c_str(), "missing");

  // A dataset with the wrong shape.
  fresh();
  {
    H5Edit e(p);
    H5Ldelete(e.file, ("tensors/" + kQ1).c_str(), H5P_DEFAULT);
    hsize_t dims[2] = {3, 8};
    hid_t sp = H5Screate_simple(2, dims, nullptr);
    hid_t ds = H5Dcreate2(e.file, ("tensors/" + kQ1).c_str(), H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t st = H5Tcopy(H5T_C_S1);
    H5Tset_size(st, 3);
    hid_t sc = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(ds, "dtype", st, sc, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, st, "f32");
    H5Aclose(a);
    H5Sclose(sc);
    H5Tclose(st);
    H5Dclose(ds);
    H5Sclose(sp);
  }
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), kQ1.c_str(), "shape [3, 8]", "[12, 8]");

  // An extra dataset the config does not explain.
  fresh();
  {
    H5Edit e(p);
    hsize_t dims[1] = {4};
    hid_t sp = H5Screate_simple(1, dims, nullptr);
    H5Dclose(H5Dcreate2(e.file, "tensors/lm_head.weight", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    H5Sclose(sp);
  }
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), "lm_head.weight", "unexpected dataset");

  // Not an opdlm model file, a newer format, no file at all.
  {
    hid_t f = H5Fcreate((tmp / "other.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
  }
  EXPECT_ERROR_HAS(load_model(tmp / "other.h5"), "other.h5", "format", "not an opdlm model file");
  fresh();
  {
    H5Edit e(p);
    hid_t a = H5Aopen(e.file, "format_version", H5P_DEFAULT);
    int64_t v = 99;
    H5Awrite(a, H5T_NATIVE_INT64, &v);
    H5Aclose(a);
  }
  EXPECT_ERROR_HAS(load_model(p), p.c_str(), "format_version", "99");
  EXPECT_ERROR_HAS(load_model(tmp / "absent.h5"), "absent.h5", "does not exist");
  std::ofstream(tmp / "text.h5") << "not hdf5 at all";
  EXPECT_ERROR_HAS(load_model(tmp / "text.h5"), "text.h5", "cannot open HDF5");
}

TEST(ModelFile, AtomicWriteAndSha256Helpers) {
  TempDir tmp;
  const std::string p = tmp / "f.txt";
  atomic_write_bytes(p, "hello");
  EXPECT_EQ(test::read_file_bytes(p), "hello");
  EXPECT_THROW(atomic_write_file(p, [](const std::string& t) {
                 std::ofstream(t) << "partial";
                 OPDLM_FAIL("writer failed");
               }),
               Error);
  EXPECT_EQ(test::read_file_bytes(p), "hello");
  EXPECT_FALSE(fs::exists(temp_path_for(p)));
  EXPECT_EQ(sha256_file(p), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
  EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Directories: swapped in whole; a failure leaves the old one.
  const std::string d = tmp / "d";
  atomic_write_dir(d, [](const std::string& t) { std::ofstream(t + "/a") << "1"; });
  atomic_write_dir(d, [](const std::string& t) { std::ofstream(t + "/b") << "2"; });
  EXPECT_FALSE(fs::exists(d + "/a"));
  EXPECT_EQ(test::read_file_bytes(d + "/b"), "2");
  EXPECT_THROW(atomic_write_dir(d, [](const std::string& t) {
                 std::ofstream(t + "/c") << "3";
                 OPDLM_FAIL("writer failed");
               }),
               Error);
  EXPECT_EQ(test::read_file_bytes(d + "/b"), "2");
  EXPECT_FALSE(fs::exists(d + "/c"));
  EXPECT_FALSE(fs::exists(temp_path_for(d)));
}
