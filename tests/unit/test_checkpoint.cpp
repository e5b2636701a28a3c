// Checkpoint files and the commit protocol (io/checkpoint.hpp): blocks of global tensors round-trip
// and reassemble, a flipped data byte is named by its dataset, truncation by the file's size, the
// newest committed checkpoint that verifies is chosen (with the reasons for the ones passed over),
// keep-K pruning, and malformed fault-injection settings are refused. The crash cases themselves
// (a rank dying at each phase of a save) are tests/cli/ckpt_resume.sh.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "opdlm/base/error.hpp"
#include "opdlm/io/checkpoint.hpp"
#include "test_util.hpp"

namespace {

using namespace opdlm;
namespace fs = std::filesystem;

Tensor f32(const Shape& shape, uint32_t seed) { return test::random_tensor(shape, seed, -1, 1, DType::f32); }

std::string fresh_dir(const std::string& name) {
  const std::string d = testing::TempDir() + "/opdlm_ckpt_" + name + "_" + std::to_string(::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A 4 x 6 tensor written as two row blocks, a 3 x 4 one as two column blocks, a replicated vector,
// and an integer array.
std::vector<io::TensorBlock> sample_blocks(const Tensor& a, const Tensor& b, const Tensor& c) {
  return {{"param/a", {4, 6}, 0, 0, a.slice(0, 1).clone()},   {"param/a_rest", {4, 6}, 0, 1, a.slice(1, 4).clone()},
          {"adam_m/b", {3, 4}, 1, 0, b.columns(0, 3)},          {"adam_m/b_rest", {3, 4}, 1, 3, b.columns(3, 4)},
          {"param/model.norm.weight", {5}, -1, 0, c.clone()}};
}

void flip_byte(const std::string& path, uintmax_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(std::streamoff(offset));
  char ch = 0;
  f.read(&ch, 1);
  ch = char(ch ^ 0x5a);
  f.seekp(std::streamoff(offset));
  f.write(&ch, 1);
}

// The file offset of a contiguous dataset's first byte.
uintmax_t data_offset(const std::string& path, const std::string& dataset) {
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t d = H5Dopen2(f, dataset.c_str(), H5P_DEFAULT);
  const haddr_t off = H5Dget_offset(d);
  H5Dclose(d);
  H5Fclose(f);
  return uintmax_t(off);
}

TEST(CheckpointFile, BlocksRoundTripAndReassembleTheWholeTensors) {
  const std::string dir = fresh_dir("file");
  const Tensor a = f32({4, 6}, 1), b = f32({3, 4}, 2), c = f32({5}, 3);
  const io::IntArrays arrays = {{"rollouts/ids", {1, -2, 3, int64_t(1) << 40}}, {"rollouts/empty", {}}};
  const std::string path = dir + "/shard_tp0.h5";
  io::write_checkpoint_file(path, {{"rl_step", 7}}, sample_blocks(a, b, c), arrays);
  const io::CheckpointFile f = io::read_checkpoint_file(path);
  EXPECT_EQ(f.meta.at("rl_step"), 7);
  ASSERT_EQ(f.blocks.size(), 5u);
  EXPECT_EQ(f.arrays, arrays);
  Tensor wa = Tensor::zeros({4, 6}), wb = Tensor::zeros({3, 4});
  io::place_block(f.blocks[0], wa);
  io::place_block(f.blocks[1], wa);
  io::place_block(f.blocks[2], wb);
  io::place_block(f.blocks[3], wb);
  EXPECT_EQ(wa.to_f64_vector(), a.to_f64_vector());
  EXPECT_EQ(wb.to_f64_vector(), b.to_f64_vector());
  EXPECT_EQ(f.blocks[4].data.to_f64_vector(), c.to_f64_vector());
  EXPECT_EQ(f.blocks[2].cut_dim, 1);
  EXPECT_EQ(f.blocks[3].offset, 3);
  fs::remove_all(dir);
}

TEST(CheckpointFile, AFlippedDataByteIsNamedByItsDataset) {
  const std::string dir = fresh_dir("flip");
  const Tensor a = f32({4, 6}, 1), b = f32({3, 4}, 2), c = f32({5}, 3);
  const std::string path = dir + "/shard_tp0.h5";
  io::write_checkpoint_file(path, {}, sample_blocks(a, b, c), {});
  flip_byte(path, data_offset(path, "adam_m/b_rest") + 2);
  EXPECT_ERROR_HAS(io::read_checkpoint_file(path), "adam_m/b_rest", "checksum mismatch");
  std::ofstream(dir + "/junk.h5") << "not hdf5";
  EXPECT_ERROR_HAS(io::read_checkpoint_file(dir + "/junk.h5"), "junk.h5", "truncated or not HDF5");
  fs::remove_all(dir);
}

// Commits a checkpoint of `step` holding one shard file under root.
void commit(const std::string& root, int64_t step, int keep = 3) {
  const std::string tmp = io::checkpoint_tmp_dir(root, step);
  fs::create_directories(tmp);
  const Tensor a = f32({4, 6}, uint32_t(step)), b = f32({3, 4}, 2), c = f32({5}, 3);
  io::write_checkpoint_file(tmp + "/shard_tp0.h5", {{"rl_step", step}}, sample_blocks(a, b, c), {});
  io::write_checkpoint_file(tmp + "/state.h5", {{"rl_step", step}}, {}, {{"rollouts/x", {step}}});
  io::write_manifest(tmp, {{"rl_step", step}});
  io::publish_checkpoint(tmp, root, step, keep);
}

std::string latest(const std::string& root) {
  std::ifstream in(root + "/LATEST");
  std::string s;
  in >> s;
  return s;
}

// Found with fuzz_ckpt_manifest: a manifest field of the wrong JSON type escaped as a json exception;
// a file name could leave the checkpoint directory.
TEST(CheckpointCommit, AMalformedManifestIsAnErrorNamingTheField) {
  const std::string root = fresh_dir("manifest");
  commit(root, 1, 3);
  const std::string dir = io::committed_checkpoints(root).at(0), m = dir + "/" + io::kCheckpointManifest;
  auto with = [&](const std::string& text) {
    std::ofstream(m, std::ios::trunc) << text;
    return io::verify_checkpoint(dir);
  };
  EXPECT_ERROR_HAS(with(R"({"format": 1, "files": []})"), m.c_str(), "format", "not an opdlm checkpoint manifest");
  EXPECT_ERROR_HAS(with(R"({"format": "opdlm-checkpoint-manifest", "files": [1]})"), "files[0]", "must be an object");
  EXPECT_ERROR_HAS(with(R"({"format": "opdlm-checkpoint-manifest", "files": [{"name": 3}]})"), "files[0].name");
  EXPECT_ERROR_HAS(with(R"({"format": "opdlm-checkpoint-manifest", "files": [{"name": "../x", "bytes": 1, "xxh3_64": ""}]})"),
                   "files[0].name", "not a file name inside the checkpoint");
  EXPECT_ERROR_HAS(with(R"({"format": "opdlm-checkpoint-manifest", "files": [{"name": "state.h5", "bytes": "1"}]})"),
                   "files[0].bytes");
  EXPECT_ERROR_HAS(with(R"({"format": "opdlm-checkpoint-manifest", "files": [{"name": "state.h5", "bytes": 1}]})"),
                   "files[0].xxh3_64");
}

TEST(CheckpointCommit, LatestKeepAndTheNewestValidCheckpointIsChosenSayingWhy) {
  const std::string root = fresh_dir("commit");
  EXPECT_EQ(io::find_resumable_checkpoint(root, nullptr), "");  // nothing yet: a fresh start
  for (int64_t s = 1; s <= 4; ++s) commit(root, s, 3);
  EXPECT_EQ(latest(root), "step_00000004");
  const auto all = io::committed_checkpoints(root);
  ASSERT_EQ(all.size(), 3u);  // keep = 3: step 1 pruned
  EXPECT_EQ(fs::path(all[0]).filename(), "step_00000004");
  EXPECT_EQ(fs::path(all[2]).filename(), "step_00000002");
  EXPECT_EQ(io::verify_checkpoint(all[0]).at("rl_step"), 4);

  // A temporary directory of a save that died: never chosen, removed by the next commit.
  fs::create_directories(io::checkpoint_tmp_dir(root, 5));
  std::ofstream(io::checkpoint_tmp_dir(root, 5) + "/state.h5") << "half";
  EXPECT_EQ(fs::path(io::find_resumable_checkpoint(root, nullptr)).filename(), "step_00000004");

  // Step 4 corrupted (a flipped byte in a dataset), step 3 truncated: step 2 is chosen, and why.
  flip_byte(all[0] + "/shard_tp0.h5", data_offset(all[0] + "/shard_tp0.h5", "param/a_rest") + 5);
  EXPECT_ERROR_HAS(io::verify_checkpoint(all[0]), "shard_tp0.h5", "param/a_rest");
  fs::resize_file(all[1] + "/state.h5", fs::file_size(all[1] + "/state.h5") - 100);
  EXPECT_ERROR_HAS(io::verify_checkpoint(all[1]), "state.h5", "bytes");
  std::vector<std::string> why;
  EXPECT_EQ(io::find_resumable_checkpoint(root, &why), all[2]);
  ASSERT_EQ(why.size(), 2u);
  EXPECT_NE(why[0].find("checksum mismatch"), std::string::npos) << why[0];
  EXPECT_NE(why[1].find("truncated"), std::string::npos) << why[1];

  // A checkpoint renamed into place whose save died before LATEST moved is complete: it is chosen.
  commit(root, 6, 10);
  fs::remove_all(root + "/LATEST");
  std::ofstream(root + "/LATEST") << "step_00000002\n";
  EXPECT_EQ(fs::path(io::find_resumable_checkpoint(root, nullptr)).filename(), "step_00000006");
  EXPECT_FALSE(fs::exists(io::checkpoint_tmp_dir(root, 5)));

  // No manifest: never committed.
  fs::remove(all[2] + "/" + io::kCheckpointManifest);
  EXPECT_ERROR_HAS(io::verify_checkpoint(all[2]), "never committed");
  fs::remove_all(root);
}

TEST(CheckpointCommit, MalformedFaultInjectionSettingsAreRefused) {
  for (const char* bad : {"x:before_data", "0:before_lunch", "0", "0:before_data:3:4"}) {
    ::setenv("OPDLM_CKPT_FAULT", bad, 1);
    EXPECT_ERROR_HAS(io::maybe_inject_fault(io::CkptPhase::before_data, 0, 1), "OPDLM_CKPT_FAULT");
  }
  ::setenv("OPDLM_CKPT_FAULT", "1:before_data", 1);  // another rank: nothing happens here
  EXPECT_NO_THROW(io::maybe_inject_fault(io::CkptPhase::before_data, 0, 1));
  ::setenv("OPDLM_CKPT_FAULT", "0:before_data:9", 1);  // another step
  EXPECT_NO_THROW(io::maybe_inject_fault(io::CkptPhase::before_data, 0, 1));
  ::unsetenv("OPDLM_CKPT_FAULT");
}

}  // namespace
