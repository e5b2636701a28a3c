// opdlm model files in HDF5 (layout in model_file.hpp): atomic save, verified load. Every HDF5
// call goes through HDF5_CHECK; failures are re-raised naming the file and the dataset.
#include "opdlm/io/model_file.hpp"

#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "opdlm/base/check.hpp"
#include "opdlm/io/file_util.hpp"
#include "h5_util.hpp"

namespace opdlm::io {
namespace {

using namespace h5;

constexpr const char* kFormat = "opdlm-model";
constexpr const char* kTensorGroup = "tensors";

const char* dtype_tag(DType t) { return t == DType::bf16 ? "bf16" : "f32"; }

ModelFileInfo read_info(hid_t file, const std::string& path) {
  ModelFileInfo info;
  with_context(path, "/", [&] {
    auto fmt = read_str_attr(file, "format", path, "format");
    if (!fmt || *fmt != kFormat)
      OPDLM_FAIL_AT(path, "format", "not an opdlm model file (root attribute format is ",
                    fmt ? "'" + *fmt + "'" : std::string("missing"), ", expected '", kFormat, "')");
    auto ver = read_i64_attr(file, "format_version", path);
    if (!ver) OPDLM_FAIL_AT(path, "format_version", "root attribute format_version is missing");
    if (*ver < 1 || *ver > kModelFormatVersion)
      OPDLM_FAIL_AT(path, "format_version", "format_version ", *ver, " is not supported (this opdlm reads 1..",
                    kModelFormatVersion, ")");
    info.format_version = *ver;
    auto cfg = read_str_attr(file, "config", path, "config");
    if (!cfg) OPDLM_FAIL_AT(path, "config", "root attribute config is missing");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(*cfg);
    } catch (const nlohmann::json::exception& e) {
      OPDLM_FAIL_AT(path, "config", "config attribute is not valid JSON: ", e.what());
    }
    info.config = model::Qwen3Config::from_json(j, path);
    auto dt = read_str_attr(file, "dtype", path, "dtype");
    if (!dt || (*dt != "f32" && *dt != "bf16"))
      OPDLM_FAIL_AT(path, "dtype", "root attribute dtype must be 'f32' or 'bf16', got ",
                    dt ? "'" + *dt + "'" : std::string("nothing"));
    info.dtype = *dt == "bf16" ? DType::bf16 : DType::f32;
    auto extra = read_str_attr(file, "extra", path, "extra");
    info.extra = nlohmann::json::object();
    if (extra && !extra->empty()) {
      try {
        info.extra = nlohmann::json::parse(*extra);
      } catch (const nlohmann::json::exception& e) {
        OPDLM_FAIL_AT(path, "extra", "extra attribute is not valid JSON: ", e.what());
      }
    }
  });
  return info;
}

}  // namespace

void save_model(const std::string& path, const model::Qwen3Weights& w, const nlohmann::json& extra_attrs) {
  H5Quiet quiet;
  w.config().validate(path);
  const DType dt = w.dtype();
  if (dt != DType::f32 && dt != DType::bf16)
    OPDLM_FAIL_AT(path, "dtype", "model files hold f32 or bf16 weights, not ", dtype_name(dt));
  const auto expected = model::Qwen3Weights::expected_shapes(w.config());
  const auto& tensors = w.tensors();
  const std::string extra_text = extra_attrs.is_null() ? std::string("{}") : extra_attrs.dump();

  atomic_write_file(path, [&](const std::string& tmp) {
    H5Id fapl = file_access();
    H5Id file = with_context(path, "", [&] {
      return H5Id(HDF5_CHECK(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl)), H5Fclose);
    });
    {
      with_context(path, "/", [&] {
        write_str_attr(file, "format", kFormat);
        write_i64_attr(file, "format_version", kModelFormatVersion);
        write_str_attr(file, "config", w.config().to_json().dump());
        write_str_attr(file, "dtype", dtype_tag(dt));
        write_str_attr(file, "extra", extra_text);
      });
      H5Id group = with_context(path, kTensorGroup, [&] {
        return H5Id(HDF5_CHECK(H5Gcreate2(file, kTensorGroup, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)), H5Gclose);
      });
      if (tensors.size() != expected.size())
        OPDLM_FAIL_AT(path, "", "weights hold ", tensors.size(), " tensors, the config implies ", expected.size());
      for (size_t i = 0; i < tensors.size(); ++i) {
        // Named references, not a structured binding: clang 14 cannot capture those in lambdas.
        const auto& name = tensors[i].name;
        const auto& value = tensors[i].value;
        const std::string field = std::string("/") + kTensorGroup + "/" + name;
        // Checked here, mid-write, rather than up front: the atomic rename is what protects the
        // previous file, and the tests exercise exactly this path.
        if (name != expected[i].first)
          OPDLM_FAIL_AT(path, field, "tensor ", i, " is '", name, "', expected '", expected[i].first, "'");
        if (!value.defined() || value.device() != Device::cpu || value.dtype() != dt ||
            value.shape() != expected[i].second)
          OPDLM_FAIL_AT(path, field, "tensor '", name, "' is ",
                        value.defined() ? value.describe() : std::string("undefined"), ", expected ", dtype_name(dt),
                        shape_str(expected[i].second), " cpu");
        with_context(path, field, [&] {
          std::vector<hsize_t> dims(value.shape().begin(), value.shape().end());
          H5Id space(HDF5_CHECK(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr)), H5Sclose);
          const hid_t ftype = dt == DType::f32 ? H5T_IEEE_F32LE : H5T_STD_U16LE;
          const hid_t mtype = dt == DType::f32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_UINT16;
          H5Id ds(HDF5_CHECK(H5Dcreate2(group, name.c_str(), ftype, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)),
                  H5Dclose);
          HDF5_CHECK(H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, value.raw_data()));
          write_str_attr(ds, "dtype", dtype_tag(dt));
          write_str_attr(ds, "sha256", sha256_hex(value.raw_data(), value.nbytes()));
        });
      }
    }
    with_context(path, "", [&] { file.close_checked(); });
  });
}

ModelFileInfo read_model_info(const std::string& path) {
  H5Quiet quiet;
  H5Id file = open_readonly(path, "model file");
  return read_info(file, path);
}

model::Qwen3Weights load_model(const std::string& path) {
  H5Quiet quiet;
  H5Id file = open_readonly(path, "model file");
  const ModelFileInfo info = read_info(file, path);
  model::Qwen3Weights w(info.config, info.dtype);
  const std::string gpath = std::string("/") + kTensorGroup;
  H5Id group = with_context(path, gpath, [&] {
    if (HDF5_CHECK(H5Lexists(file, kTensorGroup, H5P_DEFAULT)) <= 0)
      OPDLM_FAIL_AT(path, gpath, "group ", gpath, " is missing");
    return H5Id(HDF5_CHECK(H5Gopen2(file, kTensorGroup, H5P_DEFAULT)), H5Gclose);
  });
  const size_t esize = dtype_size(info.dtype);
  std::set<std::string> expected_names;
  for (auto& nt : w.tensors()) {
    const std::string& name = nt.name;  // not a structured binding (clang 14: lambdas below)
    Tensor& value = nt.value;
    expected_names.insert(name);
    const std::string field = gpath + "/" + name;
    with_context(path, field, [&] {
      if (HDF5_CHECK(H5Lexists(group, name.c_str(), H5P_DEFAULT)) <= 0)
        OPDLM_FAIL_AT(path, field, "dataset for tensor '", name, "' is missing");
      H5Id ds(HDF5_CHECK(H5Dopen2(group, name.c_str(), H5P_DEFAULT)), H5Dclose);
      H5Id ftype(HDF5_CHECK(H5Dget_type(ds)), H5Tclose);
      const H5T_class_t cls = H5Tget_class(ftype);
      const bool type_ok = info.dtype == DType::f32
                               ? cls == H5T_FLOAT && H5Tget_size(ftype) == 4
                               : cls == H5T_INTEGER && H5Tget_size(ftype) == 2 && H5Tget_sign(ftype) == H5T_SGN_NONE;
      if (!type_ok)
        OPDLM_FAIL_AT(path, field, "tensor '", name, "' is not stored as ",
                      info.dtype == DType::f32 ? "32-bit float" : "uint16 (bf16 bits)");
      auto tag = read_str_attr(ds, "dtype", path, field);
      if (!tag || *tag != dtype_tag(info.dtype))
        OPDLM_FAIL_AT(path, field, "tensor '", name, "' dtype attribute is ", tag ? "'" + *tag + "'" : std::string("missing"),
                      ", the file's dtype is ", dtype_tag(info.dtype));
      H5Id space(HDF5_CHECK(H5Dget_space(ds)), H5Sclose);
      const int nd = HDF5_CHECK(H5Sget_simple_extent_ndims(space));
      std::vector<hsize_t> dims(static_cast<size_t>(std::max(nd, 0)));
      HDF5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
      const Shape got(dims.begin(), dims.end());
      if (got != value.shape())
        OPDLM_FAIL_AT(path, field, "tensor '", name, "' has shape ", shape_str(got), ", the config implies ",
                      shape_str(value.shape()));
      const hid_t mtype = info.dtype == DType::f32 ? H5T_NATIVE_FLOAT : H5T_NATIVE_UINT16;
      HDF5_CHECK(H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, value.raw_data()));
      auto sum = read_str_attr(ds, "sha256", path, field);
      if (!sum) OPDLM_FAIL_AT(path, field, "tensor '", name, "' has no sha256 attribute");
      const std::string actual = sha256_hex(value.raw_data(), static_cast<size_t>(value.numel()) * esize);
      if (actual != *sum)
        OPDLM_FAIL_AT(path, field, "tensor '", name, "' checksum mismatch: sha256 of the data is ", actual,
                      ", the file records ", *sum, " (corrupt file)");
    });
  }
  // Datasets the config does not explain mean the file and the config disagree.
  with_context(path, gpath, [&] {
    H5G_info_t gi{};
    HDF5_CHECK(H5Gget_info(group, &gi));
    if (gi.nlinks == expected_names.size()) return;
    for (hsize_t i = 0; i < gi.nlinks; ++i) {
      const ssize_t n = HDF5_CHECK(H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT));
      std::string nm(static_cast<size_t>(n) + 1, '\0');
      HDF5_CHECK(H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nm.data(), nm.size(), H5P_DEFAULT));
      nm.resize(static_cast<size_t>(n));
      if (!expected_names.count(nm))
        OPDLM_FAIL_AT(path, gpath + "/" + nm, "unexpected dataset '", nm, "' (not a tensor of this config)");
    }
  });
  return w;
}

}  // namespace opdlm::io
