// nanobind module kvtier._copy_engine: the engines over raw addresses and
// sizes (no torch headers, so it does not depend on torch's C++ ABI).
// Argument errors raise ValueError (kvtier/native_copy.py turns them into
// CopyError); CUDA failures raise RuntimeError. Copies release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "copy/cpu_copy.h"
#include "io/io_bindings.h"
#ifdef KVTIER_WITH_KEYS
#include "cache/key_bindings.h"
#endif
#ifdef KVTIER_WITH_CUDA
#include "copy/cuda_copy.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
using namespace kvtier;

// A 1-D C-contiguous int64 id array in host memory.
using Ids = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
// The host pool's memory (HostPool.array): the engine keeps it alive.
using HostMemory = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// The constructor arguments both engines share, in order; `host` is argument
// 8 counting self as 1 (for keep_alive).
#define PLACEMENT_ARGS                                                                    \
  "bases"_a, "block_strides"_a, "run_strides"_a, "nruns"_a, "run_bytes"_a, "num_blocks"_a, \
      "host"_a, "num_slots"_a, "slot_bytes"_a, "payload_offset"_a
#define PLACEMENT(host)                                                                    \
  make_placement(bases, block_strides, run_strides, nruns, run_bytes, num_blocks,          \
                 reinterpret_cast<uint64_t>(host.data()), static_cast<int64_t>(host.size()), \
                 num_slots, slot_bytes, payload_offset)

NB_MODULE(_copy_engine, m) {
  m.doc() = "kvtier copy engine: paged KV cache <-> host slots (CPU threads; CUDA if built)";

  nb::class_<CpuEngine>(m, "CpuEngine")
      .def(
          "__init__",
          [](CpuEngine* self, const std::vector<uint64_t>& bases,
             const std::vector<int64_t>& block_strides, const std::vector<int64_t>& run_strides,
             int64_t nruns, int64_t run_bytes, int64_t num_blocks, HostMemory host,
             int64_t num_slots, int64_t slot_bytes, int64_t payload_offset, int threads) {
            new (self) CpuEngine(PLACEMENT(host), threads);
          },
          PLACEMENT_ARGS, "threads"_a, nb::keep_alive<1, 8>())
      .def(
          "gather",
          [](CpuEngine& e, Ids blocks, Ids slots) {
            nb::gil_scoped_release released;
            e.copy(blocks.data(), blocks.shape(0), slots.data(), slots.shape(0), true);
          },
          "block_ids"_a, "slot_ids"_a, "KV blocks -> host slots.")
      .def(
          "scatter",
          [](CpuEngine& e, Ids slots, Ids blocks) {
            nb::gil_scoped_release released;
            e.copy(blocks.data(), blocks.shape(0), slots.data(), slots.shape(0), false);
          },
          "slot_ids"_a, "block_ids"_a, "Host slots -> KV blocks.")
      .def_prop_ro("threads", &CpuEngine::threads);

#ifdef KVTIER_WITH_CUDA
  m.attr("with_cuda") = true;
  nb::enum_<CudaPath>(m, "CudaPath")
      .value("kernel", CudaPath::Kernel)
      .value("dma", CudaPath::Dma);
  nb::class_<CudaEngine>(m, "CudaEngine")
      .def(
          "__init__",
          [](CudaEngine* self, const std::vector<uint64_t>& bases,
             const std::vector<int64_t>& block_strides, const std::vector<int64_t>& run_strides,
             int64_t nruns, int64_t run_bytes, int64_t num_blocks, HostMemory host,
             int64_t num_slots, int64_t slot_bytes, int64_t payload_offset, int device) {
            new (self) CudaEngine(PLACEMENT(host), device);
          },
          PLACEMENT_ARGS, "device"_a, nb::keep_alive<1, 8>())
      .def(
          "gather",
          [](CudaEngine& e, Ids blocks, Ids slots, CudaPath path, std::optional<uintptr_t> after) {
            nb::gil_scoped_release released;
            e.copy(blocks.data(), blocks.shape(0), slots.data(), slots.shape(0), true, path, after);
          },
          "block_ids"_a, "slot_ids"_a, "path"_a, "after"_a = nb::none(),
          "KV blocks -> host slots; `after`: a recorded cudaEvent_t to wait for.")
      .def(
          "scatter",
          [](CudaEngine& e, Ids slots, Ids blocks, CudaPath path, std::optional<uintptr_t> after) {
            nb::gil_scoped_release released;
            e.copy(blocks.data(), blocks.shape(0), slots.data(), slots.shape(0), false, path,
                   after);
          },
          "slot_ids"_a, "block_ids"_a, "path"_a, "after"_a = nb::none(),
          "Host slots -> KV blocks; `after`: a recorded cudaEvent_t to wait for.")
      .def_prop_ro("vector_bytes", &CudaEngine::vector_bytes);
#else
  m.attr("with_cuda") = false;
#endif

  bind_io(m);  // IoEngine: the disk store's native record I/O (io_engine.h)
#ifdef KVTIER_WITH_KEYS
  bind_keys(m);  // chain_keys, group_keys: block keys in bulk (cache/key_bindings.cpp)
#endif
}
