#include "cpu_copy.h"

#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace kvtier {

// Transfers of at least this many bytes are split over the thread pool and
// written with streaming stores; smaller ones are copied on the calling thread
// with memcpy (waking the pool costs tens of microseconds, and their bytes may
// still be in cache when read). A tuning constant (benchmarks/copy_engine.py).
constexpr int64_t kLargeBytes = 512 << 10;

// memcpy with non-temporal stores where the CPU has them (x86-64: SSE2) and
// the destination is 16-byte aligned: the destination of a large transfer is
// not read back soon, and skipping its read-for-ownership saves a third of the
// memory traffic. The caller issues the fence (stream_fence) once it is done.
static void stream_copy(char* dst, const char* src, size_t n) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Orders this thread's streaming stores before what follows (the pool's
// completion handshake, the return to the caller).
static void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

ThreadPool::ThreadPool(int nthreads) : size_(std::max(1, nthreads)) {
  for (int t = 1; t < size_; ++t) workers_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& w : workers_) w.join();
}

void ThreadPool::run(const std::function<void(int)>& job) {
  std::lock_guard<std::mutex> one_job(submit_);
  {
    std::lock_guard<std::mutex> lk(m_);
    job_ = &job;
    pending_ = size_ - 1;
    ++generation_;
  }
  wake_.notify_all();
  job(0);
  std::unique_lock<std::mutex> lk(m_);
  done_.wait(lk, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::worker(int t) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* job;
    {
      std::unique_lock<std::mutex> lk(m_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    (*job)(t);
    std::lock_guard<std::mutex> lk(m_);
    if (--pending_ == 0) done_.notify_one();
  }
}

void CpuEngine::copy_units(const int64_t* blocks, const int64_t* slots, int64_t begin,
                           int64_t end, bool to_host, bool streaming) const {
  char* const host = reinterpret_cast<char*>(p_.host_base);
  const size_t n = static_cast<size_t>(p_.g.run_bytes);
  for (int64_t u = begin; u < end; ++u) {
    const Unit t = unit_of(u, p_.g);
    char* kv = reinterpret_cast<char*>(kv_address(p_.layers[t.layer], blocks[t.item], t.run));
    char* slot = host + slot_offset(p_.g, slots[t.item], t.layer, t.run);
    char* dst = to_host ? slot : kv;
    const char* src = to_host ? kv : slot;
    if (streaming)
      stream_copy(dst, src, n);
    else
      std::memcpy(dst, src, n);
  }
  if (streaming) stream_fence();
}

void CpuEngine::copy(const int64_t* blocks, int64_t n_blocks, const int64_t* slots,
                     int64_t n_slots, bool to_host) {
  check_transfer(p_.g, blocks, n_blocks, slots, n_slots);
  const int64_t units = n_blocks * units_per_item(p_.g);
  if (units * p_.g.run_bytes < kLargeBytes) {
    copy_units(blocks, slots, 0, units, to_host, false);
    return;
  }
  // Equal shares of runs: consecutive runs fill a slot front to back.
  const int64_t n = pool_.size();
  pool_.run([&](int t) {
    copy_units(blocks, slots, units * t / n, units * (t + 1) / n, to_host, true);
  });
}

}  // namespace kvtier
