// Checkpoint files (HDF5 blocks of global tensors, integer arrays, JSON state), the manifest, the
// commit protocol, verification and the resume choice. Layout and protocol: docs/checkpoint.md.
#include "opdlm/io/checkpoint.hpp"

#include <hdf5.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "h5_util.hpp"
#include "opdlm/base/check.hpp"
#include "opdlm/io/file_util.hpp"
#include "opdlm/io/hash.hpp"

namespace opdlm::io {

namespace fs = std::filesystem;
using namespace h5;

namespace {

constexpr const char* kFormat = "opdlm-checkpoint";

nlohmann::json parse_json(const std::string& text, const std::string& path, const std::string& field) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    OPDLM_FAIL_AT(path, field, "not valid JSON: ", e.what());
  }
}


// Creates a dataset (parents created on the way) and writes `data`.
void write_dataset(hid_t file, const std::string& name, hid_t ftype, hid_t mtype, const Shape& shape, const void* data,
                   size_t bytes) {
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  H5Id space(HDF5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)), H5Sclose);
  H5Id lcpl(HDF5_CHECK(H5Pcreate(H5P_LINK_CREATE)), H5Pclose);
  HDF5_CHECK(H5Pset_create_intermediate_group(lcpl, 1));
  H5Id ds(HDF5_CHECK(H5Dcreate2(file, name.c_str(), ftype, space, lcpl, H5P_DEFAULT, H5P_DEFAULT)), H5Dclose);
  if (bytes > 0) HDF5_CHECK(H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
  write_str_attr(ds, "xxh3_64", xxh3_hex(data, bytes));
}

Shape dataset_shape(hid_t ds) {
  H5Id space(HDF5_CHECK(H5Dget_space(ds)), H5Sclose);
  const int nd = HDF5_CHECK(H5Sget_simple_extent_ndims(space));
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(nd, 0)));
  HDF5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
  return Shape(dims.begin(), dims.end());
}

void check_checksum(hid_t ds, const void* data, size_t bytes, const std::string& path, const std::string& field) {
  const auto want = read_str_attr(ds, "xxh3_64", path, field);
  if (!want) OPDLM_FAIL_AT(path, field, "dataset has no xxh3_64 attribute");
  const std::string got = xxh3_hex(data, bytes);
  if (got != *want)
    OPDLM_FAIL_AT(path, field, "checksum mismatch: XXH3-64 of the data is ", got, ", the file records ", *want,
                  " (corrupt checkpoint)");
}

}  // namespace

// ---- the files ------------------------------------------------------------------------------------

void write_checkpoint_file(const std::string& path, const nlohmann::json& meta, const std::vector<TensorBlock>& blocks,
                           const IntArrays& arrays, const std::function<void(size_t)>& between) {
  H5Quiet quiet;
  nlohmann::json index = nlohmann::json::array();
  for (const auto& b : blocks) index.push_back(b.name);
  for (const auto& a : arrays) index.push_back(a.first);
  {
    H5Id fapl = file_access();
    H5Id file = with_context(path, "", [&] {
      return H5Id(HDF5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl)), H5Fclose);
    });
    with_context(path, "/", [&] {
      write_str_attr(file, "format", kFormat);
      write_i64_attr(file, "format_version", kCheckpointFormatVersion);
      write_str_attr(file, "meta", meta.dump());
      write_str_attr(file, "index", index.dump());
    });
    size_t i = 0;
    for (const auto& b : blocks) {
      if (between) between(i);
      ++i;
      with_context(path, b.name, [&] {
        OPDLM_CHECK(b.data.dtype() == DType::f32 && b.data.device() == Device::cpu, "checkpoint block ", b.name,
                    " must be f32 on the CPU");
        write_dataset(file, b.name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, b.data.shape(), b.data.raw_data(),
                      size_t(b.data.nbytes()));
        H5Id ds(HDF5_CHECK(H5Dopen2(file, b.name.c_str(), H5P_DEFAULT)), H5Dclose);
        write_str_attr(ds, "global_shape", nlohmann::json(b.global_shape).dump());
        write_i64_attr(ds, "cut_dim", b.cut_dim);
        write_i64_attr(ds, "offset", b.offset);
      });
    }
    for (const auto& array : arrays) {
      const std::string& name = array.first;  // not a structured binding: clang 14 cannot capture those
      const std::vector<int64_t>& values = array.second;
      if (between) between(i);
      ++i;
      with_context(path, name, [&] {
        write_dataset(file, name, H5T_STD_I64LE, H5T_NATIVE_INT64, {int64_t(values.size())}, values.data(),
                      values.size() * sizeof(int64_t));
      });
    }
    if (between) between(i);  // every dataset written: before close and fsync
    with_context(path, "", [&] { file.close_checked(); });
  }
  fsync_file(path);
}

CheckpointFile read_checkpoint_file(const std::string& path) {
  H5Quiet quiet;
  H5Id file = open_readonly(path, "checkpoint file");
  CheckpointFile out;
  nlohmann::json index;
  with_context(path, "/", [&] {
    const auto fmt = read_str_attr(file, "format", path, "format");
    if (!fmt || *fmt != kFormat)
      OPDLM_FAIL_AT(path, "format", "not an opdlm checkpoint file (root attribute format is ",
                    fmt ? "'" + *fmt + "'" : std::string("missing"), ", expected '", kFormat, "')");
    const auto ver = read_i64_attr(file, "format_version", path);
    if (!ver || *ver < 1 || *ver > kCheckpointFormatVersion)
      OPDLM_FAIL_AT(path, "format_version", "checkpoint format_version ", ver ? std::to_string(*ver) : "missing",
                    " is not supported (this opdlm reads 1..", kCheckpointFormatVersion, ")");
    const auto meta = read_str_attr(file, "meta", path, "meta");
    if (!meta) OPDLM_FAIL_AT(path, "meta", "root attribute meta is missing");
    out.meta = parse_json(*meta, path, "meta");
    const auto idx = read_str_attr(file, "index", path, "index");
    if (!idx) OPDLM_FAIL_AT(path, "index", "root attribute index is missing");
    index = parse_json(*idx, path, "index");
    if (!index.is_array()) OPDLM_FAIL_AT(path, "index", "root attribute index must be a JSON array of names");
  });
  for (const auto& jn : index) {
    const std::string name = jn.is_string() ? jn.get<std::string>() : std::string("?");
    with_context(path, name, [&] {
      if (!jn.is_string() || HDF5_CHECK(H5Lexists(file, name.c_str(), H5P_DEFAULT)) <= 0)
        OPDLM_FAIL_AT(path, name, "dataset listed in the index is missing");
      H5Id ds(HDF5_CHECK(H5Dopen2(file, name.c_str(), H5P_DEFAULT)), H5Dclose);
      H5Id ftype(HDF5_CHECK(H5Dget_type(ds)), H5Tclose);
      const Shape shape = dataset_shape(ds);
      if (HDF5_CHECK(H5Aexists(ds, "cut_dim")) > 0) {
        if (H5Tget_class(ftype) != H5T_FLOAT || H5Tget_size(ftype) != 4)
          OPDLM_FAIL_AT(path, name, "a tensor block must be stored as 32-bit float");
        TensorBlock b;
        b.name = name;
        b.data = Tensor::empty(shape, DType::f32);
        if (b.data.numel() > 0) HDF5_CHECK(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, b.data.raw_data()));
        check_checksum(ds, b.data.raw_data(), size_t(b.data.nbytes()), path, name);
        const auto gs = read_str_attr(ds, "global_shape", path, name);
        const nlohmann::json g = gs ? parse_json(*gs, path, name + ".global_shape") : nlohmann::json();
        if (!g.is_array()) OPDLM_FAIL_AT(path, name, "attribute global_shape is missing or not a JSON array");
        b.global_shape = g.get<Shape>();
        b.cut_dim = static_cast<int>(read_i64_attr(ds, "cut_dim", path).value_or(-2));
        b.offset = read_i64_attr(ds, "offset", path).value_or(-1);
        bool ok = b.global_shape.size() == shape.size() && b.cut_dim >= -1 && b.cut_dim < int(shape.size()) && b.offset >= 0;
        for (size_t d = 0; ok && d < shape.size(); ++d)
          ok = int(d) == b.cut_dim ? b.offset + shape[d] <= b.global_shape[d] : shape[d] == b.global_shape[d];
        if (!ok)
          OPDLM_FAIL_AT(path, name, "block ", shape_str(shape), " at offset ", b.offset, " along dimension ", b.cut_dim,
                        " does not fit the tensor ", shape_str(b.global_shape));
        out.blocks.push_back(std::move(b));
      } else {
        if (H5Tget_class(ftype) != H5T_INTEGER || H5Tget_size(ftype) != 8 || shape.size() != 1)
          OPDLM_FAIL_AT(path, name, "an array must be stored as 1-D 64-bit integers");
        std::vector<int64_t> v(static_cast<size_t>(shape[0]));
        if (!v.empty()) HDF5_CHECK(H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()));
        check_checksum(ds, v.data(), v.size() * sizeof(int64_t), path, name);
        out.arrays.emplace_back(name, std::move(v));
      }
    });
  }
  return out;
}

void place_block(const TensorBlock& b, Tensor& whole) {
  OPDLM_CHECK(whole.dtype() == DType::f32 && whole.shape() == b.global_shape, "place_block: ", b.name, " into ",
              whole.describe());
  const float* src = b.data.data<float>();
  float* dst = whole.data<float>();
  if (b.cut_dim < 0) {
    std::memcpy(dst, src, size_t(b.data.nbytes()));
  } else if (b.cut_dim == 0) {
    const int64_t row = whole.numel() / std::max<int64_t>(whole.size(0), 1);
    std::memcpy(dst + b.offset * row, src, size_t(b.data.nbytes()));
  } else {
    OPDLM_CHECK(whole.ndim() == 2, "place_block: column blocks of 2-D tensors only (", b.name, ")");
    const int64_t w = b.data.size(1), ld = whole.size(1);
    for (int64_t i = 0; i < whole.size(0); ++i) std::memcpy(dst + i * ld + b.offset, src + i * w, size_t(w) * 4);
  }
}

// ---- the commit protocol ----------------------------------------------------------------------------

std::string checkpoint_dir_name(int64_t rl_step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(rl_step));
  return buf;
}

std::string checkpoint_tmp_dir(const std::string& root, int64_t rl_step) {
  return root + "/.tmp_" + checkpoint_dir_name(rl_step);
}

const char* ckpt_phase_name(CkptPhase p) {
  switch (p) {
    case CkptPhase::before_data: return "before_data";
    case CkptPhase::mid_dataset: return "mid_dataset";
    case CkptPhase::before_fsync: return "before_fsync";
    case CkptPhase::before_manifest: return "before_manifest";
    case CkptPhase::before_rename: return "before_rename";
    case CkptPhase::before_latest: return "before_latest";
  }
  return "?";
}

void maybe_inject_fault(CkptPhase phase, int world_rank, int64_t rl_step) {
  const char* env = std::getenv("OPDLM_CKPT_FAULT");
  if (!env || !*env) return;
  const std::string v = env;
  std::vector<std::string> parts;
  std::stringstream ss(v);
  for (std::string p; std::getline(ss, p, ':');) parts.push_back(p);
  constexpr CkptPhase kPhases[] = {CkptPhase::before_data, CkptPhase::mid_dataset, CkptPhase::before_fsync,
                                   CkptPhase::before_manifest, CkptPhase::before_rename, CkptPhase::before_latest};
  const bool known = parts.size() >= 2 && parts.size() <= 3 &&
                     std::any_of(std::begin(kPhases), std::end(kPhases),
                                 [&](CkptPhase q) { return parts[1] == ckpt_phase_name(q); });
  char* end = nullptr;
  const long rank = parts.empty() ? -1 : std::strtol(parts[0].c_str(), &end, 10);
  if (!known || parts[0].empty() || *end != '\0')
    OPDLM_FAIL_AT("environment", "OPDLM_CKPT_FAULT", "'", v, "' is not <rank>:<phase>[:<rl step>] with phase one of ",
                  "before_data, mid_dataset, before_fsync, before_manifest, before_rename, before_latest");
  if (rank != world_rank || parts[1] != ckpt_phase_name(phase)) return;
  if (parts.size() == 3 && std::atoll(parts[2].c_str()) != rl_step) return;
  std::cerr << "opdlm: OPDLM_CKPT_FAULT: rank " << world_rank << " fails at " << ckpt_phase_name(phase)
            << " of the checkpoint of RL step " << rl_step << std::endl;
  std::_Exit(kInjectedFaultExitCode);
}

void write_manifest(const std::string& dir, nlohmann::json info) {
  nlohmann::json files = nlohmann::json::array();
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != kCheckpointManifest) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  for (const auto& n : names) {
    const std::string p = dir + "/" + n;
    files.push_back({{"name", n}, {"bytes", int64_t(fs::file_size(p))}, {"xxh3_64", xxh3_file_hex(p)}});
  }
  info["format"] = "opdlm-checkpoint-manifest";
  info["format_version"] = kCheckpointFormatVersion;
  info["files"] = files;
  atomic_write_bytes(dir + "/" + kCheckpointManifest, info.dump(2) + "\n");
}

void publish_checkpoint(const std::string& tmp_dir, const std::string& root, int64_t rl_step, int keep,
                        const std::function<void()>& before_latest) {
  const std::string name = checkpoint_dir_name(rl_step), dest = root + "/" + name;
  std::error_code ec;
  if (fs::exists(dest, ec)) fs::remove_all(dest);  // a re-save of the same step (a resumed run)
  fs::rename(tmp_dir, dest);
  fsync_dir(root);
  if (before_latest) before_latest();
  atomic_write_bytes(root + "/LATEST", name + "\n");
  // Older checkpoints beyond `keep`, and temporary directories of saves that died.
  const auto committed = committed_checkpoints(root);
  for (size_t i = size_t(std::max(keep, 1)); i < committed.size(); ++i) fs::remove_all(committed[i], ec);
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if ((e.is_directory() && n.rfind(".tmp_", 0) == 0) || n.rfind("LATEST.tmp.", 0) == 0) fs::remove_all(e.path(), ec);
  }
  fsync_dir(root);
}

std::vector<std::string> committed_checkpoints(const std::string& root) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0 && fs::is_regular_file(e.path() / kCheckpointManifest, ec))
      out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end(), std::greater<>());  // zero-padded step numbers: newest first
  return out;
}

nlohmann::json verify_checkpoint(const std::string& dir) {
  const std::string mpath = dir + "/" + kCheckpointManifest;
  std::error_code ec;
  if (!fs::is_regular_file(mpath, ec)) OPDLM_FAIL_AT(mpath, "", "no manifest: the checkpoint was never committed");
  const nlohmann::json m = parse_json(read_file_bytes(mpath), mpath, "manifest");
  // Every field is checked for its JSON type before use: the manifest is read from disk like any input
  // (a wrong type must be this error, not a json exception; fuzz_ckpt_manifest).
  const auto fmt = m.is_object() ? m.find("format") : m.end();
  if (!m.is_object() || fmt == m.end() || !fmt->is_string() || *fmt != "opdlm-checkpoint-manifest")
    OPDLM_FAIL_AT(mpath, "format", "not an opdlm checkpoint manifest");
  if (!m.contains("files") || !m["files"].is_array()) OPDLM_FAIL_AT(mpath, "files", "the file list is missing");
  size_t i = 0;
  for (const auto& f : m["files"]) {
    const std::string field = "files[" + std::to_string(i++) + "]";
    if (!f.is_object()) OPDLM_FAIL_AT(mpath, field, "a file entry must be an object {name, bytes, xxh3_64}");
    const auto name_it = f.find("name"), bytes_it = f.find("bytes"), sum_it = f.find("xxh3_64");
    if (name_it == f.end() || !name_it->is_string() || name_it->get_ref<const std::string&>().empty())
      OPDLM_FAIL_AT(mpath, field + ".name", "a file entry has no name");
    const std::string& name = name_it->get_ref<const std::string&>();
    // A plain file name inside the checkpoint: never a path that leaves it.
    if (name == "." || name == ".." || name.find('/') != std::string::npos || name.find('\0') != std::string::npos)
      OPDLM_FAIL_AT(mpath, field + ".name", "'", name, "' is not a file name inside the checkpoint");
    if (bytes_it == f.end() || !bytes_it->is_number_integer())
      OPDLM_FAIL_AT(mpath, field + ".bytes", "the size of ", name, " is missing or not an integer");
    if (sum_it == f.end() || !sum_it->is_string())
      OPDLM_FAIL_AT(mpath, field + ".xxh3_64", "the checksum of ", name, " is missing or not a string");
    const std::string p = dir + "/" + name;
    if (!fs::is_regular_file(p, ec)) OPDLM_FAIL_AT(p, "", "listed in the manifest but missing");
    const int64_t bytes = int64_t(fs::file_size(p));
    if (bytes != bytes_it->get<int64_t>())
      OPDLM_FAIL_AT(p, "bytes", "the file has ", bytes, " bytes, the manifest records ", bytes_it->dump(),
                    " (truncated or overwritten)");
    if (p.size() > 3 && p.compare(p.size() - 3, 3, ".h5") == 0) (void)read_checkpoint_file(p);  // names the dataset
    const std::string sum = xxh3_file_hex(p);
    if (sum != sum_it->get_ref<const std::string&>())
      OPDLM_FAIL_AT(p, "xxh3_64", "XXH3-64 of the file is ", sum, ", the manifest records ", sum_it->dump());
  }
  return m;
}

std::string find_resumable_checkpoint(const std::string& root, std::vector<std::string>* skipped) {
  // Newest committed first: a checkpoint renamed into place is complete even if the save died before
  // it moved LATEST (LATEST is the pointer for tools and people; the manifest is the commit record).
  for (const auto& dir : committed_checkpoints(root)) {
    try {
      verify_checkpoint(dir);
      return dir;
    } catch (const Error& e) {
      if (skipped) skipped->push_back(dir + ": " + e.what());
    }
  }
  return "";
}

}  // namespace opdlm::io
