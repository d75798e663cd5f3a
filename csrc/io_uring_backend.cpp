// io_uring backend of io_engine.h: a batch's records go through one ring,
// up to `depth` of them in flight, each a small state machine of
// asynchronous operations (open, read/write, fsync, close, rename, unlink)
// advanced as its completions arrive. The calling thread drives the ring;
// the kernel runs the blocking steps (open, rename, extending O_DIRECT
// writes) on its own workers. Built only when CMake finds liburing
// (KVTIER_WITH_URING); otherwise the stubs below report it unavailable.
#include "io_engine.h"

#ifdef KVTIER_WITH_URING

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kvtier {

namespace {

class Ring {
 public:
  explicit Ring(unsigned depth) {
    unsigned flags = 0;
#ifdef IORING_SETUP_COOP_TASKRUN
    flags |= IORING_SETUP_COOP_TASKRUN;  // completions are reaped by this thread only
#endif
#ifdef IORING_SETUP_SINGLE_ISSUER
    flags |= IORING_SETUP_SINGLE_ISSUER;
#endif
    int r = io_uring_queue_init(depth, &ring_, flags);
    if (r == -EINVAL && flags) r = io_uring_queue_init(depth, &ring_, 0);  // older kernel
    err_ = r < 0 ? -r : 0;
  }
  ~Ring() {
    if (err_ == 0) io_uring_queue_exit(&ring_);
  }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  int error() const { return err_; }
  io_uring* get() { return &ring_; }
  io_uring_sqe* sqe() {
    io_uring_sqe* s = io_uring_get_sqe(&ring_);
    if (s == nullptr) {  // not expected (one SQE per op in flight): make room
      io_uring_submit(&ring_);
      s = io_uring_get_sqe(&ring_);
    }
    if (s == nullptr) {
      std::fprintf(stderr, "kvtier io_uring: no submission queue entry\n");
      std::abort();
    }
    return s;
  }

 private:
  io_uring ring_;
  int err_;
};

unsigned chunk(uint64_t left) {
  return static_cast<unsigned>(std::min<uint64_t>(left, 1u << 30));
}

bool transient(int res) { return res == -EINTR || res == -EAGAIN; }

enum class Stage : uint8_t { Open, Xfer, Fsync, Close, Rename, CloseOnError, Unlink };

// A record write: open tmp, write, [fsync], close, rename (mkdir once on
// ENOENT); after a failure past the open: close (if open), unlink tmp.
struct WriteOp {
  const WriteItem* it = nullptr;
  bool fsync = false;
  int* out = nullptr;
  int fd = -1;
  uint64_t done = 0;
  Stage st = Stage::Open;
  int err = 0;
  bool retried = false;

  void submit(Ring& r) {
    io_uring_sqe* s = r.sqe();
    switch (st) {
      case Stage::Open:
        io_uring_prep_openat(s, AT_FDCWD, it->tmp.c_str(),
                             O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | (it->direct ? O_DIRECT : 0),
                             0600);
        break;
      case Stage::Xfer:
        io_uring_prep_write(s, fd, reinterpret_cast<const char*>(it->addr) + done,
                            chunk(it->len - done), done);
        break;
      case Stage::Fsync:
        io_uring_prep_fsync(s, fd, 0);
        break;
      case Stage::Close:
      case Stage::CloseOnError:
        io_uring_prep_close(s, fd);
        break;
      case Stage::Rename:
        io_uring_prep_renameat(s, AT_FDCWD, it->tmp.c_str(), AT_FDCWD, it->final.c_str(), 0);
        break;
      case Stage::Unlink:
        io_uring_prep_unlinkat(s, AT_FDCWD, it->tmp.c_str(), 0);
        break;
    }
    io_uring_sqe_set_data(s, this);
  }

  void fail(int e) {
    err = e;
    st = Stage::CloseOnError;
  }
  void after_data() { st = fsync ? Stage::Fsync : Stage::Close; }

  // Advances on a completion; true when the record is finished (*out set).
  bool complete(int res) {
    switch (st) {
      case Stage::Open:
        if (transient(res)) return false;
        if (res < 0) return finish(-res);  // O_EXCL: nothing of ours to remove
        fd = res;
        if (it->len == 0) after_data();
        else st = Stage::Xfer;
        return false;
      case Stage::Xfer:
        if (transient(res)) return false;
        if (res < 0) fail(-res);
        else if (res == 0) fail(EIO);
        else if ((done += static_cast<uint64_t>(res)) >= it->len) after_data();
        return false;
      case Stage::Fsync:
        if (transient(res)) return false;
        if (res < 0) fail(-res);
        else st = Stage::Close;
        return false;
      case Stage::Close:
        fd = -1;
        if (res < 0 && res != -EINTR) {
          err = -res;
          st = Stage::Unlink;
        } else {
          st = Stage::Rename;
        }
        return false;
      case Stage::Rename:
        if (res == -ENOENT && !retried) {  // the key's shard directory is new
          retried = true;
          std::string dir = it->final.substr(0, it->final.rfind('/'));
          if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
            err = errno;
            st = Stage::Unlink;
          }
          return false;
        }
        if (res < 0) {
          err = -res;
          st = Stage::Unlink;
          return false;
        }
        return finish(0);
      case Stage::CloseOnError:
        fd = -1;
        st = Stage::Unlink;
        return false;
      case Stage::Unlink:
        return finish(err);
    }
    return finish(EINVAL);
  }

  bool finish(int e) {
    *out = e;
    return true;
  }
};

// A record read: open, fstat (on this thread: no I/O), read unless short, close.
struct ReadOp {
  const ReadItem* it = nullptr;
  ReadResult* out = nullptr;
  int fd = -1;
  uint64_t got = 0;
  Stage st = Stage::Open;

  void submit(Ring& r) {
    io_uring_sqe* s = r.sqe();
    switch (st) {
      case Stage::Open:
        io_uring_prep_openat(s, AT_FDCWD, it->path.c_str(),
                             O_RDONLY | O_CLOEXEC | (it->direct ? O_DIRECT : 0), 0);
        break;
      case Stage::Xfer:
        io_uring_prep_read(s, fd, reinterpret_cast<char*>(it->addr) + got, chunk(it->len - got),
                           got);
        break;
      default:
        io_uring_prep_close(s, fd);
        break;
    }
    io_uring_sqe_set_data(s, this);
  }

  bool complete(int res) {
    switch (st) {
      case Stage::Open: {
        if (transient(res)) return false;
        if (res < 0) {
          out->err = -res;
          return true;
        }
        fd = res;
        struct stat sb;
        if (::fstat(fd, &sb) != 0) {
          out->err = errno;
          st = Stage::Close;
          return false;
        }
        out->size = sb.st_size;
        st = (static_cast<uint64_t>(sb.st_size) >= it->len && it->len > 0) ? Stage::Xfer
                                                                            : Stage::Close;
        return false;
      }
      case Stage::Xfer:
        if (transient(res)) return false;
        if (res < 0) {
          out->err = -res;
          st = Stage::Close;
        } else if (res == 0) {
          st = Stage::Close;  // shrank under us: got < len
        } else if ((got += static_cast<uint64_t>(res)) >= it->len) {
          st = Stage::Close;
        }
        out->got = static_cast<int64_t>(got);
        return false;
      default:
        fd = -1;
        digest_payload(*it, out);  // on the ring's thread, while other records are in flight
        return true;
    }
  }
};

// Runs every op to completion with at most `depth` in flight.
template <class Op>
void drive(Ring& ring, std::vector<Op>& ops, int depth) {
  size_t next = 0;
  int inflight = 0;
  while (next < ops.size() || inflight > 0) {
    while (inflight < depth && next < ops.size()) {
      ops[next++].submit(ring);
      ++inflight;
    }
    const int ret = io_uring_submit_and_wait(ring.get(), 1);
    if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
      // Buffers may be in use by submitted operations: never return early.
      std::fprintf(stderr, "kvtier io_uring: io_uring_enter failed: %s\n", std::strerror(-ret));
      std::abort();
    }
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(ring.get(), head, cqe) {
      ++seen;
      Op* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
      if (op->complete(cqe->res)) --inflight;
      else op->submit(ring);
    }
    io_uring_cq_advance(ring.get(), seen);
  }
}

unsigned ring_entries(int depth) { return static_cast<unsigned>(std::max(2, depth)); }

}  // namespace

bool uring_available(std::string* why) {
  Ring ring(8);
  if (ring.error() != 0) {
    *why = std::string("io_uring_setup: ") + std::strerror(ring.error());
    return false;
  }
  io_uring_probe* probe = io_uring_get_probe_ring(ring.get());
  if (probe == nullptr) {
    *why = "cannot probe io_uring operations";
    return false;
  }
  const struct {
    int op;
    const char* name;
  } need[] = {{IORING_OP_OPENAT, "openat"}, {IORING_OP_READ, "read"},
              {IORING_OP_WRITE, "write"},   {IORING_OP_FSYNC, "fsync"},
              {IORING_OP_CLOSE, "close"},   {IORING_OP_RENAMEAT, "renameat"},
              {IORING_OP_UNLINKAT, "unlinkat"}};
  bool ok = true;
  for (const auto& n : need) {
    if (!io_uring_opcode_supported(probe, n.op)) {
      *why = std::string("kernel lacks io_uring ") + n.name;
      ok = false;
      break;
    }
  }
  io_uring_free_probe(probe);
  return ok;
}

bool uring_write_records(const std::vector<WriteItem>& items, bool fsync, int depth,
                         std::vector<int>* out) {
  const int d = std::min<int>(depth, static_cast<int>(items.size()));
  Ring ring(ring_entries(d));
  if (ring.error() != 0) return false;
  std::vector<WriteOp> ops(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    ops[i].it = &items[i];
    ops[i].fsync = fsync;
    ops[i].out = &(*out)[i];
  }
  drive(ring, ops, d);
  return true;
}

bool uring_read_records(const std::vector<ReadItem>& items, int depth,
                        std::vector<ReadResult>* out) {
  const int d = std::min<int>(depth, static_cast<int>(items.size()));
  Ring ring(ring_entries(d));
  if (ring.error() != 0) return false;
  std::vector<ReadOp> ops(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    ops[i].it = &items[i];
    ops[i].out = &(*out)[i];
  }
  drive(ring, ops, d);
  return true;
}

}  // namespace kvtier

#else  // !KVTIER_WITH_URING

namespace kvtier {

bool uring_available(std::string* why) {
  *why = "built without the io_uring backend (rebuild with -DKVTIER_URING=ON and liburing-dev)";
  return false;
}
bool uring_write_records(const std::vector<WriteItem>&, bool, int, std::vector<int>*) {
  return false;
}
bool uring_read_records(const std::vector<ReadItem>&, int, std::vector<ReadResult>*) {
  return false;
}

}  // namespace kvtier

#endif
