// Crash-safe file output and file hashing: every model file, safetensors shard and exported
// directory is built under a temporary sibling name and renamed into place only when complete, so
// a failing or interrupted write never clobbers the previous good output.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

namespace opdlm::io {

// `path.tmp.<pid>`: the sibling a write goes to before its rename (same directory, so the rename
// is atomic on one filesystem; the pid keeps concurrent processes apart).
std::string temp_path_for(const std::string& path);

// Atomically creates or replaces the file `path`: `write(tmp)` must create the file `tmp` and close
// it; then tmp is fsync'ed, renamed over `path` and the directory fsync'ed. If `write` throws
// (or any step fails) tmp is removed, `path` is untouched and the exception propagates.
void atomic_write_file(const std::string& path, const std::function<void(const std::string& tmp)>& write);
void atomic_write_bytes(const std::string& path, std::string_view bytes);

// Atomically creates or replaces the directory `dir`: `write(tmp_dir)` fills a fresh temporary
// sibling directory; it is fsync'ed and swapped in (renameat2 RENAME_EXCHANGE when `dir` exists,
// so there is no moment without a complete `dir`), then the old contents are deleted.
// On failure the temporary directory is removed and `dir` is untouched.
void atomic_write_dir(const std::string& dir, const std::function<void(const std::string& tmp_dir)>& write);

// The whole file as bytes; an Error naming the file when it cannot be read.
std::string read_file_bytes(const std::string& path);

// fsync of a file's data / of a directory entry (after creating or renaming inside it).
void fsync_file(const std::string& path);
void fsync_dir(const std::string& dir);

// Lower-case hex sha256 (OpenSSL EVP) of a buffer / of a whole file (streamed in 1 MiB reads).
std::string sha256_hex(const void* data, size_t n);
std::string sha256_file(const std::string& path);

}  // namespace opdlm::io
