// Shared HDF5 helpers of the io layer (model files, checkpoints): an owning id, error-stack
// silencing, re-raising errors with the file and dataset, scalar attributes, and the file-access
// properties every opdlm HDF5 file is opened with. Private to src/io.
#pragma once

#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>

#include "opdlm/base/check.hpp"
#include "opdlm/base/error.hpp"

namespace opdlm::io::h5 {

// Owns one HDF5 identifier; closes it on scope exit (errors while closing are ignored here, the
// file close that matters is checked explicitly).
class H5Id {
 public:
  H5Id() = default;
  H5Id(hid_t id, herr_t (*closer)(hid_t)) : id_(id), closer_(closer) {}
  H5Id(H5Id&& o) noexcept : id_(std::exchange(o.id_, -1)), closer_(o.closer_) {}
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, -1);
      closer_ = o.closer_;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }
  operator hid_t() const { return id_; }
  // Closes now and reports failure (used for the file, where close writes metadata).
  void close_checked() {
    hid_t id = std::exchange(id_, -1);
    if (id >= 0) HDF5_CHECK(closer_(id));
  }

 private:
  void reset() {
    if (id_ >= 0 && closer_) closer_(id_);
    id_ = -1;
  }
  hid_t id_ = -1;
  herr_t (*closer_)(hid_t) = nullptr;
};

// HDF5 prints its error stack to stderr by default; we turn failures into Errors instead.
class H5Quiet {
 public:
  H5Quiet() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~H5Quiet() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  H5Quiet(const H5Quiet&) = delete;
  H5Quiet& operator=(const H5Quiet&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// Runs f; an Error without a file (HDF5_CHECK's) is re-raised naming `path` and `field`.
template <class F>
auto with_context(const std::string& path, const std::string& field, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    if (!e.context().file.empty()) throw;
    OPDLM_FAIL_AT(path, field, e.message());
  }
}

inline void write_str_attr(hid_t obj, const char* name, const std::string& v) {
  H5Id type(HDF5_CHECK(H5Tcopy(H5T_C_S1)), H5Tclose);
  HDF5_CHECK(H5Tset_size(type, std::max<size_t>(v.size(), 1)));
  HDF5_CHECK(H5Tset_strpad(type, H5T_STR_NULLPAD));
  HDF5_CHECK(H5Tset_cset(type, H5T_CSET_UTF8));
  H5Id space(HDF5_CHECK(H5Screate(H5S_SCALAR)), H5Sclose);
  H5Id attr(HDF5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT)), H5Aclose);
  const std::string buf = v.empty() ? std::string(1, '\0') : v;
  HDF5_CHECK(H5Awrite(attr, type, buf.data()));
}

inline void write_i64_attr(hid_t obj, const char* name, int64_t v) {
  H5Id space(HDF5_CHECK(H5Screate(H5S_SCALAR)), H5Sclose);
  H5Id attr(HDF5_CHECK(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT)), H5Aclose);
  HDF5_CHECK(H5Awrite(attr, H5T_NATIVE_INT64, &v));
}

// A scalar string attribute (fixed or variable length); nullopt when absent.
inline std::optional<std::string> read_str_attr(hid_t obj, const char* name, const std::string& path,
                                         const std::string& field) {
  if (HDF5_CHECK(H5Aexists(obj, name)) <= 0) return std::nullopt;
  H5Id attr(HDF5_CHECK(H5Aopen(obj, name, H5P_DEFAULT)), H5Aclose);
  H5Id ftype(HDF5_CHECK(H5Aget_type(attr)), H5Tclose);
  H5Id space(HDF5_CHECK(H5Aget_space(attr)), H5Sclose);
  if (H5Tget_class(ftype) != H5T_STRING || HDF5_CHECK(H5Sget_simple_extent_type(space)) != H5S_SCALAR)
    OPDLM_FAIL_AT(path, field, "attribute '", name, "' must be a scalar string");
  std::string s;
  if (HDF5_CHECK(H5Tis_variable_str(ftype)) > 0) {
    H5Id mtype(HDF5_CHECK(H5Tcopy(H5T_C_S1)), H5Tclose);
    HDF5_CHECK(H5Tset_size(mtype, H5T_VARIABLE));
    char* p = nullptr;
    HDF5_CHECK(H5Aread(attr, mtype, &p));
    if (p) s = p;
    H5free_memory(p);
  } else {
    const size_t n = H5Tget_size(ftype);
    if (n == 0) OPDLM_FAIL_AT(path, field, "attribute '", name, "' has an invalid string type");
    s.assign(n, '\0');
    HDF5_CHECK(H5Aread(attr, ftype, s.data()));
    while (!s.empty() && s.back() == '\0') s.pop_back();
  }
  return s;
}

inline std::optional<int64_t> read_i64_attr(hid_t obj, const char* name, const std::string& path) {
  if (HDF5_CHECK(H5Aexists(obj, name)) <= 0) return std::nullopt;
  H5Id attr(HDF5_CHECK(H5Aopen(obj, name, H5P_DEFAULT)), H5Aclose);
  H5Id ftype(HDF5_CHECK(H5Aget_type(attr)), H5Tclose);
  H5Id space(HDF5_CHECK(H5Aget_space(attr)), H5Sclose);
  if (H5Tget_class(ftype) != H5T_INTEGER || HDF5_CHECK(H5Sget_simple_extent_type(space)) != H5S_SCALAR)
    OPDLM_FAIL_AT(path, name, "attribute '", name, "' must be a scalar integer");
  int64_t v = 0;
  HDF5_CHECK(H5Aread(attr, H5T_NATIVE_INT64, &v));
  return v;
}

// File access: v18 object headers (attributes of any size are stored densely: the config and
// provenance JSON can exceed the 64 KiB compact limit; every HDF5 >= 1.8 reads them), and file
// locks that are skipped where the filesystem has none (Lustre/NFS mounts without flock).
inline H5Id file_access() {
  H5Id fapl(HDF5_CHECK(H5Pcreate(H5P_FILE_ACCESS)), H5Pclose);
  HDF5_CHECK(H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18));
#if H5_VERSION_GE(1, 10, 7)
  HDF5_CHECK(H5Pset_file_locking(fapl, true, true));
#endif
  return fapl;
}

// Opens an existing opdlm HDF5 file read-only; an Error naming the file says what `what` it is not.
inline H5Id open_readonly(const std::string& path, const char* what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) OPDLM_FAIL_AT(path, "", what, " does not exist");
  try {
    H5Id fapl = file_access();
    return H5Id(HDF5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl)), H5Fclose);
  } catch (const Error& e) {
    OPDLM_FAIL_AT(path, "", "cannot open HDF5 ", what, " (truncated or not HDF5?): ", e.message());
  }
}

}  // namespace opdlm::io::h5
