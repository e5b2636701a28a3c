// libFuzzer target: the attributes of a checkpoint file (HDF5): the root's meta and index JSON and a
// block's global_shape, cut_dim and offset, around a small dataset whose checksum is right, so the
// reader's geometry checks and read_run_state's use of meta are reached. The input's parts, split at
// "\n@@@\n": meta, index, global_shape, then 18 bytes: cut_dim (8), offset (8), dims (2).
#include <hdf5.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "../../src/io/h5_util.hpp"
#include "fuzz_util.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/checkpoint.hpp"
#include "opdlm/io/hash.hpp"
#include "opdlm/train/opd_checkpoint.hpp"

namespace h5 = opdlm::io::h5;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  const std::string meta(opdlm::fuzz::take_part(rest)), index(opdlm::fuzz::take_part(rest)),
      global_shape(opdlm::fuzz::take_part(rest));
  int64_t cut_dim = -1, offset = 0;
  uint8_t dims[2] = {2, 3};
  if (rest.size() >= 18) {
    std::memcpy(&cut_dim, rest.data(), 8);
    std::memcpy(&offset, rest.data() + 8, 8);
    dims[0] = static_cast<uint8_t>(rest[16]) % 9, dims[1] = static_cast<uint8_t>(rest[17]) % 9;
  }
  static const std::string dir = opdlm::fuzz::scratch_dir() + "/ckpt";
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/state.h5";
  // The file, written with the trainer's own HDF5 helpers (any failure to write is not the reader's).
  try {
    h5::H5Quiet quiet;
    h5::H5Id fapl = h5::file_access();
    h5::H5Id file(HDF5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl)), H5Fclose);
    h5::write_str_attr(file, "format", "opdlm-checkpoint");
    h5::write_i64_attr(file, "format_version", 1);
    h5::write_str_attr(file, "meta", meta);
    h5::write_str_attr(file, "index", index);
    const hsize_t hd[2] = {dims[0], dims[1]};
    std::vector<float> zeros(size_t(dims[0]) * dims[1], 0.0f);
    h5::H5Id space(HDF5_CHECK(H5Screate_simple(2, hd, nullptr)), H5Sclose);
    h5::H5Id lcpl(HDF5_CHECK(H5Pcreate(H5P_LINK_CREATE)), H5Pclose);
    HDF5_CHECK(H5Pset_create_intermediate_group(lcpl, 1));
    h5::H5Id ds(HDF5_CHECK(H5Dcreate2(file, "param/w", H5T_IEEE_F32LE, space, lcpl, H5P_DEFAULT, H5P_DEFAULT)), H5Dclose);
    if (!zeros.empty()) HDF5_CHECK(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros.data()));
    h5::write_str_attr(ds, "xxh3_64", opdlm::io::xxh3_hex(zeros.data(), zeros.size() * sizeof(float)));
    h5::write_str_attr(ds, "global_shape", global_shape);
    h5::write_i64_attr(ds, "cut_dim", cut_dim);
    h5::write_i64_attr(ds, "offset", offset);
  } catch (const opdlm::Error&) {
    return 0;
  }
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY((void)opdlm::io::read_checkpoint_file(path));
  OPDLM_FUZZ_EXPECT_ERRORS_ONLY((void)opdlm::train::read_run_state(dir));
  return 0;
}
