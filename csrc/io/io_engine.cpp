#include "io_engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <stdexcept>

#include <xxhash.h>

namespace kvtier {

namespace {

int open_flags_write(bool direct) {
  return O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW | (direct ? O_DIRECT : 0);
}

// O_NOFOLLOW: a symlink planted at a record's path is not followed (ELOOP);
// O_NONBLOCK: a FIFO planted there does not block the open (fstat then refuses it).
int open_flags_read(bool direct) {
  return O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | (direct ? O_DIRECT : 0);
}

// A file this process may write over: a regular file of its own with one link
// (a symlink, FIFO, device or hard link planted in free/ is never written through).
bool own_regular_file(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 &&
         st.st_uid == ::geteuid();
}

// Writes all of [buf, buf + len) at offset 0; 0 or an errno.
int pwrite_all(int fd, const char* buf, uint64_t len) {
  uint64_t done = 0;
  while (done < len) {
    const ssize_t n = ::pwrite(fd, buf + done, len - done, static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += static_cast<uint64_t>(n);
  }
  return 0;
}

}  // namespace

// The parent directory of a published record (its key's two-hex-digit shard).
std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// rename(tmp, final), creating final's parent once if it is missing (as
// store.py: os.replace, on FileNotFoundError mkdir(0700, exist_ok) and again).
int publish(const std::string& tmp, const std::string& final) {
  if (::rename(tmp.c_str(), final.c_str()) == 0) return 0;
  if (errno != ENOENT) return errno;
  if (::mkdir(parent_dir(final).c_str(), 0700) != 0 && errno != EEXIST) return errno;
  if (::rename(tmp.c_str(), final.c_str()) == 0) return 0;
  return errno;
}

// Opens it.tmp for writing: the reused file renamed there (*reused), else a new one.
// reuse == tmp: the caller renamed the file there already. A reused file that is
// not a plain file of ours is unlinked (the name only, never its target).
int open_tmp(const WriteItem& it, bool* reused) {
  *reused = false;
  if (!it.reuse.empty() &&
      (it.reuse == it.tmp || ::rename(it.reuse.c_str(), it.tmp.c_str()) == 0)) {
    const int fd = ::open(it.tmp.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK |
                                              (it.direct ? O_DIRECT : 0));
    if (fd >= 0 && own_regular_file(fd)) {
      *reused = true;
      return fd;
    }
    if (fd >= 0) ::close(fd);
    ::unlink(it.tmp.c_str());
  }
  return ::open(it.tmp.c_str(), open_flags_write(it.direct), 0600);
}

// fsync of a directory: makes a rename in it durable.
int fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  const int err = ::fsync(fd) != 0 ? errno : 0;
  ::close(fd);
  return err;
}

int write_record_sync(const WriteItem& it, bool fsync) {
  bool reused = false;
  const int fd = open_tmp(it, &reused);
  if (fd < 0) return errno;  // nothing of ours to clean up (O_EXCL)
  int err = pwrite_all(fd, reinterpret_cast<const char*>(it.addr), it.len);
  struct stat st;
  if (err == 0 && reused && ::fstat(fd, &st) == 0 &&
      static_cast<uint64_t>(st.st_size) > it.len && ::ftruncate(fd, it.len) != 0)
    err = errno;
  if (err == 0 && fsync && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0 && errno != EINTR) err = errno;
  if (err == 0 && !it.final.empty()) err = publish(it.tmp, it.final);
  if (err != 0) {
    ::unlink(it.tmp.c_str());
    return err;
  }
  // final "": the caller publishes (a shared store's budget renames under its lock).
  if (it.final.empty()) return 0;
  // fsync: the record survives power loss only once its name does too.
  return fsync ? fsync_dir(parent_dir(it.final)) : 0;
}

// A path that holds no regular file: a directory is no record (EISDIR, also
// when O_DIRECT made its open fail with EINVAL: nothing proven, left alone); a
// FIFO, device or socket planted where a record should be is refused
// (not_regular: the store removes the name, never anything it points to).
static void not_a_record(const struct stat& st, ReadResult* r) {
  r->err = S_ISDIR(st.st_mode) ? EISDIR : 0;
  r->not_regular = !S_ISDIR(st.st_mode);
}

ReadResult read_record_sync(const ReadItem& it) {
  ReadResult r;
  struct stat st;
  const int fd = ::open(it.path.c_str(), open_flags_read(it.direct));
  if (fd < 0) {
    r.err = errno;  // ELOOP: a symlink (O_NOFOLLOW)
    if (r.err == EINVAL && it.direct && ::lstat(it.path.c_str(), &st) == 0 &&
        !S_ISREG(st.st_mode))
      not_a_record(st, &r);
    return r;
  }
  if (::fstat(fd, &st) != 0) {
    r.err = errno;
    ::close(fd);
    return r;
  }
  if (!S_ISREG(st.st_mode)) {
    not_a_record(st, &r);
    ::close(fd);
    return r;
  }
  r.size = st.st_size;
  if (static_cast<uint64_t>(st.st_size) >= it.len) {
    char* buf = reinterpret_cast<char*>(it.addr);
    uint64_t got = 0;
    while (got < it.len) {
      const ssize_t n = ::pread(fd, buf + got, it.len - got, static_cast<off_t>(got));
      if (n < 0) {
        if (errno == EINTR) continue;
        r.err = errno;
        break;
      }
      if (n == 0) break;  // shrank under us: the caller sees got < len
      got += static_cast<uint64_t>(n);
    }
    r.got = static_cast<int64_t>(got);
  }
  ::close(fd);
  digest_payload(it, &r);
  return r;
}

void digest_payload(const ReadItem& it, ReadResult* r) {
  if (r->err != 0 || it.digest_len == 0 || static_cast<uint64_t>(r->got) != it.len ||
      it.digest_off + it.digest_len > it.len)
    return;
  r->digest = XXH3_64bits(reinterpret_cast<const char*>(it.addr) + it.digest_off, it.digest_len);
  r->digested = true;
}

// ---------------------------------------------------------------- IoPool

struct IoPool::Batch {
  Batch(int64_t n_, const std::function<void(int64_t)>* fn_) : n(n_), fn(fn_) {}
  const int64_t n;
  const std::function<void(int64_t)>* fn;
  int64_t next = 0;  // under the pool's mutex
  int64_t done = 0;
  std::condition_variable finished;
};

IoPool::IoPool(int nthreads) : size_(std::max(1, nthreads)) {}

IoPool::~IoPool() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& w : workers_) w.join();
}

void IoPool::start_locked() {
  if (!workers_.empty() || size_ == 1) return;
  for (int t = 1; t < size_; ++t) workers_.emplace_back([this] { worker(); });
}

bool IoPool::claim(const std::shared_ptr<Batch>& b, int64_t* i) {
  if (b->next >= b->n) return false;
  *i = b->next++;
  if (b->next == b->n) {
    auto pos = std::find(queue_.begin(), queue_.end(), b);
    if (pos != queue_.end()) queue_.erase(pos);
  }
  return true;
}

void IoPool::run(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1 || size_ == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto b = std::make_shared<Batch>(n, &fn);
  {
    std::lock_guard<std::mutex> lk(m_);
    start_locked();
    queue_.push_back(b);
  }
  wake_.notify_all();
  std::unique_lock<std::mutex> lk(m_);
  for (;;) {
    int64_t i;
    if (!claim(b, &i)) break;
    lk.unlock();
    fn(i);
    lk.lock();
    ++b->done;
  }
  b->finished.wait(lk, [&] { return b->done == b->n; });
}

void IoPool::worker() {
  std::unique_lock<std::mutex> lk(m_);
  for (;;) {
    wake_.wait(lk, [this] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    std::shared_ptr<Batch> b = queue_.front();
    int64_t i;
    if (!claim(b, &i)) continue;
    lk.unlock();
    (*b->fn)(i);
    lk.lock();
    if (++b->done == b->n) b->finished.notify_all();
  }
}

// ---------------------------------------------------------------- IoEngine

IoEngine::IoEngine(int threads) : pool_(threads) {}

std::vector<int> IoEngine::write_records(const std::vector<WriteItem>& items, bool fsync) {
  std::vector<int> out(items.size(), 0);
  pool_.run(static_cast<int64_t>(items.size()),
            [&](int64_t i) { out[i] = write_record_sync(items[i], fsync); });
  return out;
}

std::vector<ReadResult> IoEngine::read_records(const std::vector<ReadItem>& items) {
  std::vector<ReadResult> out(items.size());
  pool_.run(static_cast<int64_t>(items.size()),
            [&](int64_t i) { out[i] = read_record_sync(items[i]); });
  return out;
}

}  // namespace kvtier
