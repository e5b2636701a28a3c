// Atomic file/directory output (temp sibling + fsync + rename) and sha256 through OpenSSL EVP.
#include "opdlm/io/file_util.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <sstream>
#include <fstream>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "opdlm/base/error.hpp"

namespace fs = std::filesystem;

namespace opdlm::io {
namespace {

std::string errno_text() { return std::strerror(errno); }

std::string parent_of(const std::string& path) {
  fs::path p = fs::path(path).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

// Best-effort removal on the failure path: the original error is the one worth reporting.
void remove_quietly(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

void fsync_fd_path(const std::string& path, int flags, const char* what) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) OPDLM_FAIL_AT(path, "", "cannot open ", what, " for fsync: ", errno_text());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some filesystems (e.g. a few FUSE/network ones) refuse fsync on directories: not an error there.
  if (rc != 0 && !(err == EINVAL || err == ENOTSUP))
    OPDLM_FAIL_AT(path, "", "fsync of ", what, " failed: ", std::strerror(err));
}

void fsync_tree(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_symlink()) continue;
    if (e.is_regular_file()) fsync_file(e.path().string());
    else if (e.is_directory()) fsync_dir(e.path().string());
  }
  fsync_dir(dir);
}

std::string hex_of(const unsigned char* md, unsigned len) {
  static const char* hex = "0123456789abcdef";
  std::string out(2 * len, '0');
  for (unsigned i = 0; i < len; ++i) {
    out[2 * i] = hex[md[i] >> 4];
    out[2 * i + 1] = hex[md[i] & 15];
  }
  return out;
}

}  // namespace

std::string temp_path_for(const std::string& path) {
  return path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
}

void fsync_file(const std::string& path) { fsync_fd_path(path, O_RDONLY, "file"); }
void fsync_dir(const std::string& dir) { fsync_fd_path(dir, O_RDONLY | O_DIRECTORY, "directory"); }

void atomic_write_file(const std::string& path, const std::function<void(const std::string&)>& write) {
  if (path.empty()) OPDLM_FAIL("atomic_write_file: empty path");
  std::error_code ec;
  if (fs::is_directory(path, ec)) OPDLM_FAIL_AT(path, "", "output path is a directory");
  const std::string tmp = temp_path_for(path);
  remove_quietly(tmp);  // a stale temp of a crashed run with a recycled pid
  try {
    write(tmp);
    if (!fs::is_regular_file(tmp, ec)) OPDLM_FAIL_AT(path, "", "writer did not create ", tmp);
    fsync_file(tmp);
    if (std::rename(tmp.c_str(), path.c_str()) != 0)
      OPDLM_FAIL_AT(path, "", "cannot rename ", tmp, " into place: ", errno_text());
  } catch (...) {
    remove_quietly(tmp);
    throw;
  }
  fsync_dir(parent_of(path));
}

void atomic_write_bytes(const std::string& path, std::string_view bytes) {
  atomic_write_file(path, [&](const std::string& tmp) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(tmp.c_str(), "wb"), &std::fclose);
    if (!f) OPDLM_FAIL_AT(tmp, "", "cannot create file: ", errno_text());
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f.get()) != bytes.size())
      OPDLM_FAIL_AT(tmp, "", "write failed: ", errno_text());
    if (std::fclose(f.release()) != 0) OPDLM_FAIL_AT(tmp, "", "close failed: ", errno_text());
  });
}

void atomic_write_dir(const std::string& dir_in, const std::function<void(const std::string&)>& write) {
  if (dir_in.empty()) OPDLM_FAIL("atomic_write_dir: empty path");
  // "out/" and "out" name the same directory; the temp sibling must not land inside it.
  std::string dir = fs::path(dir_in).lexically_normal().string();
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(dir, ec));
  if (exists && !fs::is_directory(fs::symlink_status(dir, ec)))
    OPDLM_FAIL_AT(dir, "", "output path exists and is not a directory");
  const std::string tmp = temp_path_for(dir);
  remove_quietly(tmp);
  try {
    if (!fs::create_directory(tmp, ec)) OPDLM_FAIL_AT(tmp, "", "cannot create directory: ", ec.message());
    write(tmp);
    fsync_tree(tmp);
    if (!exists) {
      if (std::rename(tmp.c_str(), dir.c_str()) != 0)
        OPDLM_FAIL_AT(dir, "", "cannot rename ", tmp, " into place: ", errno_text());
    } else if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
        OPDLM_FAIL_AT(dir, "", "cannot swap ", tmp, " into place: ", errno_text());
      // No atomic exchange on this filesystem: move the old one aside first (a short window
      // without `dir`, never a partial one).
      const std::string old = dir + ".old." + std::to_string(static_cast<long long>(::getpid()));
      remove_quietly(old);
      if (std::rename(dir.c_str(), old.c_str()) != 0)
        OPDLM_FAIL_AT(dir, "", "cannot move the old directory aside: ", errno_text());
      if (std::rename(tmp.c_str(), dir.c_str()) != 0) {
        std::rename(old.c_str(), dir.c_str());
        OPDLM_FAIL_AT(dir, "", "cannot rename ", tmp, " into place: ", errno_text());
      }
      remove_quietly(old);
    }
  } catch (...) {
    remove_quietly(tmp);
    throw;
  }
  fsync_dir(parent_of(dir));
  remove_quietly(tmp);  // after an exchange, tmp holds the old contents
}

std::string sha256_hex(const void* data, size_t n) {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), data, n) != 1 || EVP_DigestFinal_ex(ctx.get(), md, &len) != 1)
    OPDLM_FAIL("OpenSSL sha256 failed");
  return hex_of(md, len);
}

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) OPDLM_FAIL_AT(path, "", "cannot open file for sha256: ", errno_text());
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) OPDLM_FAIL("OpenSSL sha256 failed");
  std::vector<unsigned char> buf(1 << 20);
  size_t got;
  while ((got = std::fread(buf.data(), 1, buf.size(), f.get())) > 0)
    if (EVP_DigestUpdate(ctx.get(), buf.data(), got) != 1) OPDLM_FAIL("OpenSSL sha256 failed");
  if (std::ferror(f.get())) OPDLM_FAIL_AT(path, "", "read error while hashing");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1) OPDLM_FAIL("OpenSSL sha256 failed");
  return hex_of(md, len);
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open the file for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) OPDLM_FAIL_AT(path, "", "read error");
  return ss.str();
}

}  // namespace opdlm::io
