// SHA-256 through OpenSSL's EVP interface and CRC-32C through Boost.CRC (no hand-written hashes).
#include "opdlm/io/hash.hpp"

#include <openssl/evp.h>

#include <xxhash.h>

#include <boost/crc.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "opdlm/base/error.hpp"

namespace opdlm::io {
namespace {

struct MdCtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxFree>;

MdCtx new_sha256_ctx() {
  MdCtx ctx(EVP_MD_CTX_new());
  OPDLM_CHECK(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1, "OpenSSL sha256 init");
  return ctx;
}

Sha256Digest finish(EVP_MD_CTX* ctx) {
  Sha256Digest d{};
  unsigned int len = 0;
  OPDLM_CHECK(EVP_DigestFinal_ex(ctx, d.data(), &len) == 1 && len == d.size(), "OpenSSL sha256 final");
  return d;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

Sha256Digest sha256(std::string_view data) {
  MdCtx ctx = new_sha256_ctx();
  OPDLM_CHECK(EVP_DigestUpdate(ctx.get(), data.data(), data.size()) == 1, "OpenSSL sha256 update");
  return finish(ctx.get());
}

std::string to_hex(const Sha256Digest& d) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s(64, '0');
  for (size_t i = 0; i < d.size(); ++i) {
    s[2 * i] = kHex[d[i] >> 4];
    s[2 * i + 1] = kHex[d[i] & 15];
  }
  return s;
}

std::string sha256_hex(std::string_view data) { return to_hex(sha256(data)); }

Sha256Digest sha256_from_hex(std::string_view hex, std::string_view what) {
  if (hex.size() != 64) OPDLM_FAIL(what, ": expected 64 hex characters, got ", hex.size());
  Sha256Digest d{};
  for (size_t i = 0; i < 32; ++i) {
    int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) OPDLM_FAIL(what, ": not a hex digit at position ", 2 * i);
    d[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return d;
}

Sha256Digest sha256_file_digest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open file for hashing");
  MdCtx ctx = new_sha256_ctx();
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto got = in.gcount();
    if (got > 0) OPDLM_CHECK(EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(got)) == 1, "update");
  }
  if (in.bad()) OPDLM_FAIL_AT(path, "", "read error while hashing");
  return finish(ctx.get());
}

std::string sha256_file_hex(const std::string& path) { return to_hex(sha256_file_digest(path)); }

uint32_t sha256_mod(std::string_view key, uint32_t m) {
  OPDLM_CHECK(m > 0, "modulus must be positive");
  // Horner's rule over the big-endian bytes: r = (r * 256 + byte) mod m, exact in 64 bits.
  uint64_t r = 0;
  for (uint8_t b : sha256(key)) r = (r * 256 + b) % m;
  return static_cast<uint32_t>(r);
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  // To continue a running CRC, undo the final xor; crc_optimal takes its initial remainder in
  // unreflected form, so reflect the (reflected-output) register back.
  uint32_t reg = crc ^ 0xFFFFFFFFu, init = 0;
  for (int i = 0; i < 32; ++i)
    if ((reg >> i) & 1u) init |= 1u << (31 - i);
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> c(init);
  c.process_bytes(data, n);
  return c.checksum();
}

namespace {
std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

std::string xxh3_hex(const void* data, size_t n) { return hex64(XXH3_64bits(data, n)); }

std::string xxh3_file_hex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) OPDLM_FAIL_AT(path, "", "cannot open the file to hash it");
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> st(XXH3_createState(), &XXH3_freeState);
  if (!st || XXH3_64bits_reset(st.get()) != XXH_OK) OPDLM_FAIL("xxh3: cannot create a hash state");
  std::vector<char> buf(size_t{4} << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    if (in.gcount() > 0) XXH3_64bits_update(st.get(), buf.data(), size_t(in.gcount()));
  }
  if (in.bad()) OPDLM_FAIL_AT(path, "", "read error while hashing");
  return hex64(XXH3_64bits_digest(st.get()));
}

}  // namespace opdlm::io
