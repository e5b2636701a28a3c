// Content hashes for data bookkeeping: SHA-256 (OpenSSL EVP) of strings and files, the
// "sha256(key) % m" split rule of ../shared/docs/data.md section 6, and CRC32C for shard payloads.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace opdlm::io {

using Sha256Digest = std::array<uint8_t, 32>;

Sha256Digest sha256(std::string_view data);
// Lower-case hex, 64 characters.
std::string sha256_hex(std::string_view data);
std::string to_hex(const Sha256Digest& d);
// Parses 64 hex characters (either case); throws an Error naming `what` otherwise.
Sha256Digest sha256_from_hex(std::string_view hex, std::string_view what = "sha256");
// Streams the file (any size); throws an Error naming the file when it cannot be read. (Named
// apart from file_util.hpp's sha256_file, which returns hex.)
Sha256Digest sha256_file_digest(const std::string& path);
std::string sha256_file_hex(const std::string& path);

// The digest read as one big-endian 256-bit integer, modulo m: the same number as Python's
// int(hashlib.sha256(key.encode()).hexdigest(), 16) % m, so split lists can be cross-checked there.
uint32_t sha256_mod(std::string_view key, uint32_t m);

// CRC-32C (Castagnoli, reflected, init and final xor 0xFFFFFFFF); crc32c("123456789") = 0xE3069283.
// `crc` continues a running checksum: crc32c(b, nb, crc32c(a, na)) == crc32c(a ++ b).
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// XXH3-64 (libxxhash, seed 0) of a buffer / of a whole file (streamed), as 16 lower-case hex digits:
// the checkpoint checksums (fast enough that verifying costs about one read).
std::string xxh3_hex(const void* data, size_t n);
std::string xxh3_file_hex(const std::string& path);

}  // namespace opdlm::io
