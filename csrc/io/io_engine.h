// Native disk I/O for kvtier's store (kvtier/store.py): whole records between
// host buffers (the DRAM slots: raw, page-aligned addresses) and files, in
// batches, with the GIL released by the bindings.
//
// A write publishes a record atomically exactly as store.py does: open
// `tmp` (O_CREAT|O_EXCL|O_WRONLY, 0600, O_DIRECT when asked), write all
// bytes, fsync when asked, close, rename onto `final` (creating final's
// parent directory, 0700, when the rename says ENOENT, then renaming once
// more; `final` empty: no rename, the caller publishes); on any failure after
// the open the temp file is unlinked. A reused file is opened O_NOFOLLOW and
// written over only if it is a regular file of this user with one link. A read
// opens `path` (O_RDONLY|O_NOFOLLOW|O_NONBLOCK, O_DIRECT when asked), refuses
// anything but a regular file, takes its size, and reads `len` bytes from
// offset 0 unless the file is shorter than that.
//
// Results are per item: 0 or an errno; nothing throws for an I/O error.
//
// A persistent pool of threads runs a batch, each item's system calls done one
// after another on one thread (the calling thread takes part). (An io_uring
// backend measured no faster for 2-16 MiB records and was removed.)
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kvtier {

struct WriteItem {
  std::string tmp;    // temp path (in the store's tmp/ directory)
  std::string final;  // published path ("": leave the record at tmp)
  uint64_t addr;      // record bytes
  uint64_t len;
  bool direct;        // O_DIRECT (addr and len must then be aligned)
  // An evicted record's file to write over instead of creating tmp ("" none):
  // renamed to tmp first (reuse == tmp: already there); overwriting allocated
  // blocks spares the filesystem the block allocation of a new file. Taken by
  // someone else, or not a plain file of ours: a new file.
  std::string reuse;
};

struct ReadItem {
  std::string path;
  uint64_t addr;  // destination, >= len bytes
  uint64_t len;   // bytes wanted (the whole record)
  bool direct;
  // After a complete read, the xxh3-64 of [addr + digest_off, + digest_len)
  // (the payload), computed on the I/O thread; digest_len 0: none.
  uint64_t digest_off = 0;
  uint64_t digest_len = 0;
};

struct ReadResult {
  int err = 0;            // errno (ENOENT: no record; ELOOP: a symlink), 0 on success
  bool not_regular = false;  // opened, but not a regular file (nothing read)
  int64_t got = 0;        // bytes read (0 when the file is shorter than len: not read)
  int64_t size = 0;       // file size (fstat)
  bool digested = false;  // digest holds the payload's xxh3-64
  uint64_t digest = 0;
};

// Sets r->digest when the read was complete and a digest was asked for.
void digest_payload(const ReadItem& it, ReadResult* r);

// One item at a time on the calling thread (plain system calls).
// fsync: the file, then its directory once the rename published it.
int write_record_sync(const WriteItem& it, bool fsync);
ReadResult read_record_sync(const ReadItem& it);
// rename(tmp, final); on ENOENT mkdir(final's parent, 0700) and rename again.
int publish(const std::string& tmp, const std::string& final);

// Threads that run the items of any number of concurrent batches; a batch's
// caller runs its items too, so a batch of one never changes thread.
class IoPool {
 public:
  explicit IoPool(int nthreads);  // nthreads - 1 pool threads, started lazily
  ~IoPool();
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  // Runs fn(i) for i in [0, n) over the pool and the caller; returns when all
  // have finished. fn must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& fn);
  int size() const { return size_; }

 private:
  struct Batch;
  bool claim(const std::shared_ptr<Batch>& b, int64_t* i);  // with m_ held
  void worker();
  void start_locked();

  const int size_;
  std::mutex m_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Batch>> queue_;  // batches with unclaimed items
  bool stop_ = false;
  std::vector<std::thread> workers_;
};


class IoEngine {
 public:
  explicit IoEngine(int threads);
  std::vector<int> write_records(const std::vector<WriteItem>& items, bool fsync);
  std::vector<ReadResult> read_records(const std::vector<ReadItem>& items);
  int threads() const { return pool_.size(); }

 private:
  IoPool pool_;
};


}  // namespace kvtier

namespace kvtier {

// The published records under a store's rank directory `dir`: every regular
// file `dir/<xy>/<xy...>`, named by 2 * key_bytes lowercase hex digits that
// begin with its shard directory's name (io_scan.cpp). Shards are
// listed and stat'ed by up to `threads` threads; entries that vanish or fail
// to stat are left out. Order: unspecified.
struct ScanResult {
  std::string keys;             // key_bytes per record, back to back
  std::vector<int64_t> sizes;   // st_size
  std::vector<double> mtimes;   // st_mtime as Python computes it (sec + nsec * 1e-9)
  int err = 0;                  // errno of opening `dir` (ENOENT: no records)
};
ScanResult scan_records(const std::string& dir, int key_bytes, int threads);

}  // namespace kvtier
