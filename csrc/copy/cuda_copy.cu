// CUDA path of the copy engine; see cuda_copy.h. Compiled only when CMake
// finds nvcc; csrc/check_cuda_build.sh compiles it standalone for CI.
#include "cuda_copy.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kvtier {
namespace {

constexpr int kThreads = 256;  // per CTA: 8 warps, each copying one run at a time
constexpr int kWarpsPerCta = kThreads / 32;
// Most CTAs one copy kernel uses: enough loads/stores in flight to fill a
// PCIe x16 link, few enough to leave most SMs to the model. A tuning constant
// (benchmarks/copy_engine.py, GPU section: bandwidth and matmul slowdown).
constexpr int kMaxCtas = 64;
// (block, slot) pairs per kernel launch (size of the id staging buffers);
// longer transfers run as several launches.
constexpr int64_t kMaxPairsPerLaunch = 4096;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
#define CUDA_CHECK(call) check((call), #call)

// Makes `device` current for a scope, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      cudaSetDevice(device);
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
  bool restore_ = false;
};

// One warp copies one run at a time, grid-striding over the transfer's runs
// (kvtier_addressing.h numbering); lanes move V-sized words, four loads in
// flight per lane before the stores. `host` is the pool's device mapping.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    copy_runs(const Layer* layers, Geometry g, char* host, const int64_t* blocks,
              const int64_t* slots, int64_t n, bool to_host) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerCta;
  const int64_t units = n * units_per_item(g);
  const int64_t words = g.run_bytes / int64_t(sizeof(V));
  for (int64_t u = int64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32; u < units; u += warps) {
    const Unit t = unit_of(u, g);
    char* kv = reinterpret_cast<char*>(kv_address(layers[t.layer], blocks[t.item], t.run));
    char* slot = host + slot_offset(g, slots[t.item], t.layer, t.run);
    const V* src = reinterpret_cast<const V*>(to_host ? kv : slot);
    V* dst = reinterpret_cast<V*>(to_host ? slot : kv);
    int64_t w = lane;
    for (; w + 96 < words; w += 128) {
      const V a = src[w], b = src[w + 32], c = src[w + 64], d = src[w + 96];
      dst[w] = a;
      dst[w + 32] = b;
      dst[w + 64] = c;
      dst[w + 96] = d;
    }
    for (; w < words; w += 32) dst[w] = src[w];
  }
}

}  // namespace

struct CudaEngine::State {
  Placement p;
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;   // recorded after each transfer, polled
  Layer* d_layers = nullptr;    // the layer table in device memory
  int64_t* h_ids = nullptr;     // pinned staging for one launch: m blocks, then m slots
  int64_t* d_ids = nullptr;     // its device copy
  char* host_dev = nullptr;     // the pool as kernels address it (mapped pinned memory)
  bool registered = false;      // this engine pinned the pool, and unpins it
  int vec = 1;                  // widest kernel access all addresses allow
  std::vector<void*> dsts, srcs;  // DMA lists, reused between transfers
  std::vector<size_t> sizes;

  ~State() {
    // Teardown only; a transfer never leaves work queued, but one that
    // failed half-way may have.
    DeviceGuard guard(device);
    if (stream) cudaStreamSynchronize(stream);
    cudaFree(d_ids);
    cudaFree(d_layers);
    cudaFreeHost(h_ids);
    if (registered) cudaHostUnregister(reinterpret_cast<void*>(p.host_base));
    if (done) cudaEventDestroy(done);
    if (stream) cudaStreamDestroy(stream);
  }

  // Records `done` on the stream and polls it until the work is complete.
  void finish() {
    CUDA_CHECK(cudaEventRecord(done, stream));
    for (int polls = 0;; ++polls) {
      const cudaError_t e = cudaEventQuery(done);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) check(e, "cudaEventQuery");
      if (polls < 100)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  template <typename V>
  void launch(int64_t n, bool to_host) {
    const int64_t warps_needed = n * units_per_item(p.g);
    const int ctas = int(std::min<int64_t>(kMaxCtas, (warps_needed + kWarpsPerCta - 1) / kWarpsPerCta));
    copy_runs<V><<<ctas, kThreads, 0, stream>>>(d_layers, p.g, host_dev, d_ids, d_ids + n, n,
                                                 to_host);
    CUDA_CHECK(cudaGetLastError());
  }

  // Kernel path: per launch, stage the ids, copy them to the device, launch.
  void run_kernel(const int64_t* blocks, const int64_t* slots, int64_t n, bool to_host) {
    for (int64_t off = 0; off < n; off += kMaxPairsPerLaunch) {
      const int64_t m = std::min(kMaxPairsPerLaunch, n - off);
      std::memcpy(h_ids, blocks + off, m * sizeof(int64_t));
      std::memcpy(h_ids + m, slots + off, m * sizeof(int64_t));
      CUDA_CHECK(cudaMemcpyAsync(d_ids, h_ids, 2 * m * sizeof(int64_t), cudaMemcpyHostToDevice,
                                 stream));
      switch (vec) {
        case 16: launch<uint4>(m, to_host); break;
        case 8: launch<uint2>(m, to_host); break;
        case 4: launch<uint32_t>(m, to_host); break;
        case 2: launch<uint16_t>(m, to_host); break;
        default: launch<uint8_t>(m, to_host); break;
      }
      finish();  // h_ids is reused by the next launch
    }
  }

  // DMA path: one copy per run (runs adjacent on both sides merged), handed
  // to the copy engines in one batch where the runtime has the batch API.
  void run_dma(const int64_t* blocks, const int64_t* slots, int64_t n, bool to_host) {
    dsts.clear();
    srcs.clear();
    sizes.clear();
    char* const host = reinterpret_cast<char*>(p.host_base);
    const int64_t units = n * units_per_item(p.g);
    for (int64_t u = 0; u < units; ++u) {
      const Unit t = unit_of(u, p.g);
      char* kv = reinterpret_cast<char*>(kv_address(p.layers[t.layer], blocks[t.item], t.run));
      char* slot = host + slot_offset(p.g, slots[t.item], t.layer, t.run);
      char* src = to_host ? kv : slot;
      char* dst = to_host ? slot : kv;
      if (!sizes.empty() && static_cast<char*>(srcs.back()) + sizes.back() == src &&
          static_cast<char*>(dsts.back()) + sizes.back() == dst) {
        sizes.back() += p.g.run_bytes;
      } else {
        srcs.push_back(src);
        dsts.push_back(dst);
        sizes.push_back(p.g.run_bytes);
      }
    }
#if CUDART_VERSION >= 12080
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t first = 0;  // the one attribute applies to copies [0, count)
#if CUDART_VERSION >= 13000
    CUDA_CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr,
                                    &first, 1, stream));
#else
    size_t fail_idx = 0;
    CUDA_CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr,
                                    &first, 1, &fail_idx, stream));
#endif
#else
    for (size_t i = 0; i < sizes.size(); ++i)
      CUDA_CHECK(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream));
#endif
    finish();
  }
};

CudaEngine::CudaEngine(Placement p, int device) : s_(new State) {
  State& s = *s_;
  s.p = std::move(p);
  s.device = device;
  // The runtime is linked statically: a driver of an older major CUDA version
  // than this build fails here, in one clear message, not at the first copy.
  int driver = 0;
  CUDA_CHECK(cudaDriverGetVersion(&driver));
  if (driver / 1000 < CUDART_VERSION / 1000)
    throw std::runtime_error("CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." +
                             std::to_string(driver % 1000 / 10) + ", older than the CUDA " +
                             std::to_string(CUDART_VERSION / 1000) + "." +
                             std::to_string(CUDART_VERSION % 1000 / 10) +
                             " runtime kvtier._copy_engine was built with");
  DeviceGuard guard(device);
  CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));

  // The pinned host pool: one registration for all of it (mapped, so kernels
  // can address it), unless its owner pinned it already (HostPool registers it
  // mapped too). Never per transfer. cudaHostGetDevicePointer fails on a
  // registration without the mapped flag: the engine is then refused.
  void* host = reinterpret_cast<void*>(s.p.host_base);
  const cudaError_t reg = cudaHostRegister(host, s.p.host_bytes,
                                           cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (reg == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();  // not an error: use the existing registration
  } else {
    CUDA_CHECK(reg);
    s.registered = true;
  }
  void* mapped = nullptr;
  CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
  s.host_dev = static_cast<char*>(mapped);

  const size_t table_bytes = s.p.layers.size() * sizeof(Layer);
  const size_t ids_bytes = 2 * kMaxPairsPerLaunch * sizeof(int64_t);
  CUDA_CHECK(cudaMalloc(&s.d_layers, table_bytes));
  CUDA_CHECK(cudaMalloc(&s.d_ids, ids_bytes));
  CUDA_CHECK(cudaHostAlloc(&s.h_ids, ids_bytes, cudaHostAllocDefault));
  CUDA_CHECK(cudaMemcpyAsync(s.d_layers, s.p.layers.data(), table_bytes, cudaMemcpyHostToDevice,
                             s.stream));
  s.finish();

  uint64_t bits = reinterpret_cast<uint64_t>(s.host_dev) | uint64_t(s.p.g.run_bytes) |
                  uint64_t(s.p.g.slot_bytes) | uint64_t(s.p.g.payload_offset);
  for (const Layer& l : s.p.layers)
    bits |= l.base | uint64_t(l.block_stride) | uint64_t(l.run_stride);
  s.vec = 16;
  while (s.vec > 1 && bits % s.vec) s.vec /= 2;
}

CudaEngine::~CudaEngine() = default;

int CudaEngine::vector_bytes() const { return s_->vec; }

void CudaEngine::copy(const int64_t* blocks, int64_t n_blocks, const int64_t* slots,
                      int64_t n_slots, bool to_host, CudaPath path,
                      std::optional<uintptr_t> after_event) {
  check_transfer(s_->p.g, blocks, n_blocks, slots, n_slots);
  if (n_blocks == 0) return;
  std::lock_guard<std::mutex> one_transfer(mu_);
  State& s = *s_;
  DeviceGuard guard(s.device);
  // Device-side ordering: the engine's stream waits for the caller's event
  // (recorded on vLLM's compute stream); the host does not block on it.
  if (after_event)
    CUDA_CHECK(cudaStreamWaitEvent(s.stream, reinterpret_cast<cudaEvent_t>(*after_event), 0));
  if (path == CudaPath::Dma)
    s.run_dma(blocks, slots, n_blocks, to_host);
  else
    s.run_kernel(blocks, slots, n_blocks, to_host);
}

}  // namespace kvtier
