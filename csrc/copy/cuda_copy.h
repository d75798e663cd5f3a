// CUDA path: paged per-layer device KV tensors <-> host slots in pinned host
// memory. Plain C++ interface (no CUDA headers): streams are passed as
// integer handles, so the bindings compile without the CUDA toolkit's headers.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>

#include "copy_common.h"

namespace kvtier {

enum class CudaPath {
  Kernel,  // one kernel launch; reads/writes the pinned pool through its mapping
  Dma,     // copy engines: one cudaMemcpyBatchAsync (or one cudaMemcpyAsync per run)
};

class CudaEngine {
 public:
  // Pins the host pool (one mapped cudaHostRegister for the whole pool, unless
  // it is pinned already) and creates the engine's own stream and event on
  // `device`. Throws std::runtime_error on any CUDA error, and when the
  // driver's CUDA major version is older than the runtime built in.
  CudaEngine(Placement p, int device);
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  // Checks every id and the lengths (nothing is copied when a check fails),
  // then copies block blocks[i] to slot slots[i] (to_host) or back on the
  // engine's stream, after `after_event` (a recorded cudaEvent_t) when given:
  // the stream waits for it on the device. Returns once its own event reports
  // completion (polled with cudaEventQuery; never a device-wide synchronization).
  void copy(const int64_t* blocks, int64_t n_blocks, const int64_t* slots, int64_t n_slots,
            bool to_host, CudaPath path, std::optional<uintptr_t> after_event);

  // Widest access (bytes, 1..16) every address of the layout allows the kernel.
  int vector_bytes() const;

 private:
  struct State;  // CUDA handles and buffers, defined in cuda_copy.cu
  std::unique_ptr<State> s_;
  std::mutex mu_;  // one transfer at a time: the staging buffers are shared
};

}  // namespace kvtier
