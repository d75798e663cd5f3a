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

// The 16-byte keys at out[0..n) as a list of bytes objects.
nb::list key_list(const std::string& out) {
  nb::list keys;
  for (size_t i = 0; i < out.size(); i += kKey) keys.append(nb::bytes(out.data() + i, kKey));
  return keys;
}

// The first n token ids of a Python sequence (a list: no copy) as little-endian
// uint32 bytes; an id outside [0, 2^32) is an error, as array("I") makes it.
std::string u32_le(nb::handle token_ids, size_t n) {
  PyObject* seq = PySequence_Fast(token_ids.ptr(), "token ids must be a sequence");
  if (!seq) throw nb::python_error();
  nb::object owned = nb::steal(seq);
  if (static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)) < n)
    throw std::invalid_argument("fewer token ids than the blocks asked for");
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::string out(n * 4, '\0');
  auto* dst = reinterpret_cast<uint8_t*>(out.data());
  for (size_t i = 0; i < n; ++i) {
    unsigned long v = PyLong_AsUnsignedLong(items[i]);
    if (v == static_cast<unsigned long>(-1) && PyErr_Occurred()) throw nb::python_error();
    if (v > 0xffffffffUL) throw std::overflow_error("token id does not fit in 32 bits");
    dst[4 * i] = static_cast<uint8_t>(v);
    dst[4 * i + 1] = static_cast<uint8_t>(v >> 8);
    dst[4 * i + 2] = static_cast<uint8_t>(v >> 16);
    dst[4 * i + 3] = static_cast<uint8_t>(v >> 24);
  }
  return out;
}

}  // namespace

void bind_keys(nb::module_& m) {
  m.def(
      "chain_keys",
      [](nb::bytes parent, nb::handle token_ids, size_t block_size, size_t n) {
        if (parent.size() != kKey) throw std::invalid_argument("parent must be 16 bytes");
        if (block_size == 0) throw std::invalid_argument("block_size must be > 0");
        std::string tokens = u32_le(token_ids, n * block_size);
        std::string out(n * kKey, '\0');
        {
          nb::gil_scoped_release released;   // parent is immutable, held by the caller
          chain(reinterpret_cast<const uint8_t*>(parent.c_str()),
                reinterpret_cast<const uint8_t*>(tokens.data()), n, block_size * 4,
                reinterpret_cast<uint8_t*>(out.data()));
        }
        return key_list(out);
      },
      "parent"_a, "token_ids"_a, "block_size"_a, "n"_a,
      "The chained keys of the first ``n`` whole blocks of ``token_ids`` (a sequence "
      "of ints), a list of 16-byte keys.");
  m.def(
      "group_keys",
      [](nb::handle keys, unsigned index) {
        if (index > 0xffff) throw std::invalid_argument("group index out of range");
        PyObject* seq = PySequence_Fast(keys.ptr(), "keys must be a sequence of bytes");
        if (!seq) throw nb::python_error();
        nb::object owned = nb::steal(seq);
        size_t n = PySequence_Fast_GET_SIZE(seq);
        PyObject** items = PySequence_Fast_ITEMS(seq);
        std::string in(n * kKey, '\0');
        for (size_t i = 0; i < n; ++i) {
          if (!PyBytes_Check(items[i]) || PyBytes_GET_SIZE(items[i]) != kKey)
            throw std::invalid_argument("keys must be 16-byte bytes objects");
          std::memcpy(in.data() + i * kKey, PyBytes_AS_STRING(items[i]), kKey);
        }
        std::string out(n * kKey, '\0');
        {
          nb::gil_scoped_release released;
          groups(reinterpret_cast<const uint8_t*>(in.data()), n, index,
                 reinterpret_cast<uint8_t*>(out.data()));
        }
        return key_list(out);
      },
      "keys"_a, "index"_a,
      "Group ``index``'s record keys of a sequence of 16-byte block keys, a list.");
}

}  // namespace kvtier
