// kvtier.cache.keys in bulk: a prompt's chained block keys and a KV cache
// group's record keys, SHA-256 truncated to 128 bits, from the system's
// OpenSSL libcrypto (SHA extensions where the CPU has them). The same bytes as
// the Python path (hashlib.sha256), so keys made by either agree;
// tests/cache/test_keys.py checks it. Built only when libcrypto is found
// (csrc/CMakeLists.txt); kvtier/cache/keys.py falls back to hashlib.
//
// OpenSSL's one-digest functions (SHA256_Init/Update/Final) are deprecated in
// 3.x in favour of EVP, but still shipped; they cost ~30% less per short input
// than EVP's per-call dispatch, which is most of what a 128K-token prompt's
// lookup spends here.
#define OPENSSL_SUPPRESS_DEPRECATED
#include "key_bindings.h"

#include <nanobind/nanobind.h>
#include <openssl/sha.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier {
namespace {

constexpr size_t kKey = 16;
// Group keys hash this prefix (its NUL included), the key and the index: 31
// bytes, never a chain key's input (16 + 4 * block_size bytes).
constexpr char kGroupPrefix[] = "kvtier-group";

// out[i] = SHA-256(out[i-1] || tokens[i*block_bytes, (i+1)*block_bytes))[:16],
// out[-1] = parent.
void chain(const uint8_t* parent, const uint8_t* tokens, size_t n, size_t block_bytes,
           uint8_t* out) {
  const uint8_t* prev = parent;
  uint8_t digest[SHA256_DIGEST_LENGTH];
  for (size_t i = 0; i < n; ++i) {
    SHA256_CTX s;
    SHA256_Init(&s);
    SHA256_Update(&s, prev, kKey);
    SHA256_Update(&s, tokens + i * block_bytes, block_bytes);
    SHA256_Final(digest, &s);
    std::memcpy(out + i * kKey, digest, kKey);
    prev = out + i * kKey;
  }
}

// out[i] = SHA-256("kvtier-group\0" || keys[i] || index as 2 bytes LE)[:16].
void groups(const uint8_t* keys, size_t n, unsigned index, uint8_t* out) {
  constexpr size_t kPre = sizeof kGroupPrefix;   // with its NUL
  uint8_t in[kPre + kKey + 2];
  std::memcpy(in, kGroupPrefix, kPre);
  in[kPre + kKey] = static_cast<uint8_t>(index & 0xff);
  in[kPre + kKey + 1] = static_cast<uint8_t>(index >> 8);
  uint8_t digest[SHA256_DIGEST_LENGTH];
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(in + kPre, keys + i * kKey, kKey);
    SHA256_CTX s;   // not SHA256(): in OpenSSL 3 it looks the digest up at every call
    SHA256_Init(&s);
    SHA256_Update(&s, in, sizeof in);
    SHA256_Final(digest, &s);
    std::memcpy(out + i * kKey, digest, kKey);
  }
}

// The 16-byte keys at out[0..n) as a list of bytes objects.
nb::list key_list(const std::string& out) {
  const size_t n = out.size() / kKey;
  PyObject* keys = PyList_New(static_cast<Py_ssize_t>(n));
  if (!keys) throw nb::python_error();
  nb::list owned = nb::steal<nb::list>(keys);
  for (size_t i = 0; i < n; ++i) {
    PyObject* b = PyBytes_FromStringAndSize(out.data() + i * kKey, kKey);
    if (!b) throw nb::python_error();
    PyObject_Hash(b);   // cached in the object: every key is looked up in a dict
    PyList_SET_ITEM(keys, static_cast<Py_ssize_t>(i), b);
  }
  return owned;
}

// A token id that is an exact int of one internal digit (below 2^30: every
// vocabulary) read straight from the object, as CPython's own fast paths do; a
// third of a 128K-token prompt's key hashing went to PyLong_AsUnsignedLong
// calls. Anything else (a subclass, a bigger or negative int, not an int): false,
// and the caller converts it the general way (and reports what is wrong).
inline bool small_id(PyObject* o, unsigned long* v) {
  if (!PyLong_CheckExact(o)) return false;
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) return false;
  Py_ssize_t x = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o));
  if (x < 0) return false;
  *v = static_cast<unsigned long>(x);
  return true;
#else
  Py_ssize_t size = Py_SIZE(o);
  if (size == 0) { *v = 0; return true; }
  if (size != 1) return false;
  *v = reinterpret_cast<PyLongObject*>(o)->ob_digit[0];
  return true;
#endif
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
    unsigned long v;
    if (!small_id(items[i], &v)) {
      v = PyLong_AsUnsignedLong(items[i]);
      if (v == static_cast<unsigned long>(-1) && PyErr_Occurred()) throw nb::python_error();
      if (v > 0xffffffffUL) throw std::overflow_error("token id does not fit in 32 bits");
    }
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
