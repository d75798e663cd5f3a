// CPU path: vLLM's CPU KV tensors <-> host slots with memcpy, one run at a
// time, split over a persistent thread pool.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "copy_common.h"

namespace kvtier {

// A fixed set of threads that run one job at a time; the caller takes part.
class ThreadPool {
 public:
  explicit ThreadPool(int nthreads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }
  // Runs job(t) for every t in [0, size()) (t = 0 on the calling thread) and
  // returns when all have finished. `job` must not throw.
  void run(const std::function<void(int)>& job);

 private:
  void worker(int t);

  const int size_;
  std::mutex submit_;  // one job at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;  // bumped per job; workers run each generation once
  int pending_ = 0;          // workers still running the current job
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

class CpuEngine {
 public:
  CpuEngine(Placement p, int nthreads) : p_(std::move(p)), pool_(nthreads) {}

  // Checks every id and the lengths, then copies block blocks[i] to slot
  // slots[i] (to_host) or back. Nothing is written when a check fails.
  void copy(const int64_t* blocks, int64_t n_blocks, const int64_t* slots, int64_t n_slots,
            bool to_host);
  int threads() const { return pool_.size(); }

 private:
  // Copies runs [begin, end) of the transfer (kvtier_addressing.h numbering).
  void copy_units(const int64_t* blocks, const int64_t* slots, int64_t begin, int64_t end,
                  bool to_host, bool streaming) const;

  const Placement p_;
  ThreadPool pool_;
};

}  // namespace kvtier
