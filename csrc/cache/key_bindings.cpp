// kvtier.cache.keys in bulk: a prompt's chained block keys and a KV cache
// group's record keys, BLAKE2b-128 from the system's libb2 (the reference
// BLAKE2 library). The same bytes as the Python path (hashlib.blake2b with
// digest_size=16; person=b"kvtier-group" for group keys), so keys made by
// either agree; tests/cache/test_keys.py checks it. Built only when libb2 is
// found (csrc/CMakeLists.txt); kvtier/cache/keys.py falls back to hashlib.
#include "key_bindings.h"

#include <blake2.h>
#include <nanobind/nanobind.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier {
namespace {

constexpr size_t kKey = 16;

// out[i] = BLAKE2b-128(out[i-1] || tokens[i*block_bytes, (i+1)*block_bytes)),
// out[-1] = parent.
void chain(const uint8_t* parent, const uint8_t* tokens, size_t n, size_t block_bytes,
           uint8_t* out) {
  std::vector<uint8_t> buf(kKey + block_bytes);
  std::memcpy(buf.data(), parent, kKey);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(buf.data() + kKey, tokens + i * block_bytes, block_bytes);
    // init/update/final: their signatures are the same in libb2 and the
    // reference code (the one-call blake2b() orders its arguments differently).
    blake2b_state s;
    if (blake2b_init(&s, kKey) != 0 || blake2b_update(&s, buf.data(), buf.size()) != 0 ||
        blake2b_final(&s, out + i * kKey, kKey) != 0)
      throw std::runtime_error("blake2b failed");
    std::memcpy(buf.data(), out + i * kKey, kKey);
  }
}

// out[i] = BLAKE2b-128(keys[i] || index as 2 bytes LE), personalised "kvtier-group".
void groups(const uint8_t* keys, size_t n, unsigned index, uint8_t* out) {
  blake2b_param p;
  std::memset(&p, 0, sizeof p);
  p.digest_length = kKey;
  p.fanout = 1;
  p.depth = 1;
  static const char person[] = "kvtier-group";
  std::memcpy(p.personal, person, sizeof person - 1);
  uint8_t in[kKey + 2];
  in[kKey] = static_cast<uint8_t>(index & 0xff);
  in[kKey + 1] = static_cast<uint8_t>(index >> 8);
  for (size_t i = 0; i < n; ++i) {
    blake2b_state s;
    std::memcpy(in, keys + i * kKey, kKey);
    if (blake2b_init_param(&s, &p) != 0 || blake2b_update(&s, in, sizeof in) != 0 ||
        blake2b_final(&s, out + i * kKey, kKey) != 0)
      throw std::runtime_error("blake2b failed");
  }
}

}  // namespace

void bind_keys(nb::module_& m) {
  m.def(
      "chain_keys",
      [](nb::bytes parent, nb::bytes tokens, size_t block_bytes) {
        if (parent.size() != kKey) throw std::invalid_argument("parent must be 16 bytes");
        if (block_bytes == 0 || tokens.size() % block_bytes)
          throw std::invalid_argument("tokens must be whole blocks of block_bytes");
        size_t n = tokens.size() / block_bytes;
        std::string out(n * kKey, '\0');
        {
          nb::gil_scoped_release released;   // the bytes objects are immutable, held by the caller
          chain(reinterpret_cast<const uint8_t*>(parent.c_str()),
                reinterpret_cast<const uint8_t*>(tokens.c_str()), n, block_bytes,
                reinterpret_cast<uint8_t*>(out.data()));
        }
        return nb::bytes(out.data(), out.size());
      },
      "parent"_a, "tokens"_a, "block_bytes"_a,
      "The chained keys of whole blocks of little-endian uint32 token ids, joined "
      "(16 bytes each).");
  m.def(
      "group_keys",
      [](nb::bytes keys, unsigned index) {
        if (keys.size() % kKey) throw std::invalid_argument("keys must be 16 bytes each");
        if (index > 0xffff) throw std::invalid_argument("group index out of range");
        size_t n = keys.size() / kKey;
        std::string out(n * kKey, '\0');
        {
          nb::gil_scoped_release released;
          groups(reinterpret_cast<const uint8_t*>(keys.c_str()), n, index,
                 reinterpret_cast<uint8_t*>(out.data()));
        }
        return nb::bytes(out.data(), out.size());
      },
      "keys"_a, "index"_a,
      "Group ``index``'s record keys of joined 16-byte block keys, joined.");
}

}  // namespace kvtier
