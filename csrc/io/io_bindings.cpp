// kvtier._copy_engine.IoEngine: batched record reads and writes between raw
// host addresses and files (io_engine.h). The GIL is released for the I/O;
// the caller keeps the buffers alive and unmoved for the call. Per-item
// results are errno values (0: success), never exceptions.
#include "io_bindings.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <tuple>

#include "io_engine.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier {

namespace {

using WriteTuple = std::tuple<std::string, std::string, uint64_t, uint64_t, bool, std::string>;
using ReadTuple = std::tuple<std::string, uint64_t, uint64_t, bool, uint64_t, uint64_t>;

}  // namespace

void bind_io(nb::module_& m) {
  m.def(
      "scan_records",
      [](const std::string& dir, int key_bytes, int threads) {
        ScanResult r;
        {
          nb::gil_scoped_release released;
          r = scan_records(dir, key_bytes, threads);
        }
        return std::make_tuple(r.err, nb::bytes(r.keys.data(), r.keys.size()),
                               std::move(r.sizes), std::move(r.mtimes));
      },
      "dir"_a, "key_bytes"_a, "threads"_a,
      "Published records under a rank directory: (errno, keys blob, sizes, mtimes); "
      "files named by 2*key_bytes lowercase hex digits in two-hex-digit shard directories.");

  nb::class_<IoEngine>(m, "IoEngine",
                       "Batched disk record I/O (a thread pool of pread/pwrite).")
      .def(
          "__init__",
          [](IoEngine* self, int threads) {
            if (threads < 1) throw std::invalid_argument("threads must be >= 1");
            new (self) IoEngine(threads);
          },
          "threads"_a)
      .def(
          "write_records",
          [](IoEngine& e, const std::vector<WriteTuple>& items, bool fsync) {
            std::vector<WriteItem> v;
            v.reserve(items.size());
            for (const auto& t : items)
              v.push_back(WriteItem{std::get<0>(t), std::get<1>(t), std::get<2>(t),
                                    std::get<3>(t), std::get<4>(t), std::get<5>(t)});
            nb::gil_scoped_release released;
            return e.write_records(v, fsync);
          },
          "items"_a, "fsync"_a,
          "items: [(tmp_path, final_path, addr, len, o_direct, reuse_path)]. Publishes each "
          "record atomically (write tmp, [fsync], rename, [fsync the directory]); final_path '': "
          "leave it at tmp (the caller publishes); reuse_path (or ''): a free file to rename "
          "to tmp (reuse_path == tmp_path: already there) and write over if it is a regular "
          "file of this user with one link. Returns an errno per item (0: ok; on failure "
          "tmp_path is gone).")
      .def(
          "read_records",
          [](IoEngine& e, const std::vector<ReadTuple>& items) {
            std::vector<ReadItem> v;
            v.reserve(items.size());
            for (const auto& t : items)
              v.push_back(ReadItem{std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t),
                                   std::get<4>(t), std::get<5>(t)});
            std::vector<ReadResult> r;
            {
              nb::gil_scoped_release released;
              r = e.read_records(v);
            }
            std::vector<std::tuple<int, int64_t, int64_t, std::optional<uint64_t>, bool>> out;
            out.reserve(r.size());
            for (const ReadResult& x : r)
              out.emplace_back(x.err, x.got, x.size,
                               x.digested ? std::optional<uint64_t>(x.digest) : std::nullopt,
                               x.not_regular);
            return out;
          },
          "items"_a,
          "items: [(path, addr, len, o_direct, digest_off, digest_len)]; returns "
          "[(errno, bytes_read, file_size, digest, not_regular)]: bytes_read 0 when the file "
          "is shorter than len (not read); digest the xxh3-64 of [addr + digest_off, + "
          "digest_len) after a complete read (None otherwise, or when digest_len is 0); "
          "not_regular: the path is a FIFO, device or socket (opened O_NONBLOCK, not read); "
          "a symlink fails with ELOOP (O_NOFOLLOW).")
      .def_prop_ro("threads", &IoEngine::threads);
}

}  // namespace kvtier
