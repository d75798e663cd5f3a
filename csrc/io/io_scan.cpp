// scan_records (io_engine.h): the restart scan of a store directory, with
// the per-file fstatat calls spread over threads and no Python object per
// file until the caller asks for one.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include "io_engine.h"

namespace kvtier {

namespace {

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // upper case too: store.py names records with key.hex()
}

// Appends the decoded key to `out`; false if `name` is not 2*n lowercase hex.
bool decode_key(const char* name, size_t n, std::string* out) {
  if (std::strlen(name) != 2 * n) return false;
  const size_t at = out->size();
  out->resize(at + n);
  for (size_t i = 0; i < n; ++i) {
    const int hi = hexval(name[2 * i]), lo = hexval(name[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      out->resize(at);
      return false;
    }
    (*out)[at + i] = static_cast<char>(hi << 4 | lo);
  }
  return true;
}

bool is_shard_name(const char* name) {
  return std::strlen(name) == 2 && hexval(name[0]) >= 0 && hexval(name[1]) >= 0;
}

void scan_shard(int root_fd, const std::string& shard, int key_bytes, ScanResult* out) {
  const int fd = ::openat(root_fd, shard.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return;
  }
  while (dirent* e = ::readdir(d)) {
    if (e->d_type != DT_REG && e->d_type != DT_UNKNOWN) continue;
    // A record lives in the shard named by its first two hex digits (store.py: path()).
    if (e->d_name[0] != shard[0] || e->d_name[1] != shard[1]) continue;
    const size_t before = out->keys.size();
    if (!decode_key(e->d_name, static_cast<size_t>(key_bytes), &out->keys)) continue;
    struct stat st;
    if (::fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
      out->keys.resize(before);
      continue;
    }
    out->sizes.push_back(static_cast<int64_t>(st.st_size));
    out->mtimes.push_back(static_cast<double>(st.st_mtim.tv_sec) +
                          static_cast<double>(st.st_mtim.tv_nsec) * 1e-9);
  }
  ::closedir(d);  // closes fd
}

}  // namespace

ScanResult scan_records(const std::string& dir, int key_bytes, int threads) {
  ScanResult res;
  const int root_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (root_fd < 0) {
    res.err = errno;
    return res;
  }
  std::vector<std::string> shards;
  if (DIR* d = ::fdopendir(::dup(root_fd))) {
    while (dirent* e = ::readdir(d))
      if ((e->d_type == DT_DIR || e->d_type == DT_UNKNOWN) && is_shard_name(e->d_name))
        shards.emplace_back(e->d_name);
    ::closedir(d);
  }
  const int n = std::max(1, std::min<int>(threads, static_cast<int>(shards.size())));
  std::vector<ScanResult> parts(n);
  std::atomic<size_t> next{0};
  auto work = [&](int t) {
    for (size_t i; (i = next.fetch_add(1)) < shards.size();)
      scan_shard(root_fd, shards[i], key_bytes, &parts[t]);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(work, t);
  work(0);
  for (std::thread& th : pool) th.join();
  ::close(root_fd);
  for (ScanResult& p : parts) {
    res.keys += p.keys;
    res.sizes.insert(res.sizes.end(), p.sizes.begin(), p.sizes.end());
    res.mtimes.insert(res.mtimes.end(), p.mtimes.begin(), p.mtimes.end());
  }
  return res;
}

}  // namespace kvtier
