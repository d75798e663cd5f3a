// Index math of the copy engine, shared by the CPU path and the CUDA kernel
// (and the CUDA batched-DMA path), so the CPU tests exercise the kernel's
// addressing. Plain C++17, no CUDA or torch headers needed.
//
// Vocabulary (mirrors kvtier/copy.py):
//   * layer l of the KV cache: block b is `nruns` contiguous runs of
//     `run_bytes`, run r at  base[l] + b * block_stride[l] + r * run_stride[l].
//   * host slot s: payload at  s * slot_bytes + payload_offset; the runs of a
//     block back to back, layer-major: (layer l, run r) at (l * nruns + r) * run_bytes.
//   * a transfer moves n (block, slot) pairs; its unit of work is one run,
//     unit u = (item * num_layers + layer) * nruns + run, so consecutive units
//     fill one slot front to back.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVT_HD __host__ __device__ __forceinline__
#else
#define KVT_HD inline
#endif

namespace kvtier {

// One layer's placement in the KV memory (bytes; base is an address).
struct Layer {
  uint64_t base;
  int64_t block_stride;
  int64_t run_stride;
};

// What all layers and slots share.
struct Geometry {
  int64_t num_layers;
  int64_t nruns;
  int64_t run_bytes;
  int64_t num_blocks;      // valid block ids: [0, num_blocks)
  int64_t num_slots;       // valid slot ids:  [0, num_slots)
  int64_t slot_bytes;
  int64_t payload_offset;  // bytes from a slot's start to its payload
};

// A unit of work: run `run` of layer `layer` of the item-th (block, slot) pair.
struct Unit {
  int64_t item;
  int64_t layer;
  int64_t run;
};

KVT_HD int64_t units_per_item(const Geometry& g) { return g.num_layers * g.nruns; }

KVT_HD Unit unit_of(int64_t u, const Geometry& g) {
  Unit t;
  t.run = u % g.nruns;
  const int64_t lu = u / g.nruns;
  t.layer = lu % g.num_layers;
  t.item = lu / g.num_layers;
  return t;
}

// Byte address of (block, run) of a layer in the KV memory.
KVT_HD uint64_t kv_address(const Layer& l, int64_t block, int64_t run) {
  return l.base + static_cast<uint64_t>(block * l.block_stride + run * l.run_stride);
}

// Byte offset of (slot, layer, run) from the host pool's base.
KVT_HD int64_t slot_offset(const Geometry& g, int64_t slot, int64_t layer, int64_t run) {
  return slot * g.slot_bytes + g.payload_offset + (layer * g.nruns + run) * g.run_bytes;
}

KVT_HD bool id_in_range(int64_t id, int64_t limit) { return id >= 0 && id < limit; }

// Index of the first id outside [0, limit), or -1 when all are valid.
KVT_HD int64_t first_out_of_range(const int64_t* ids, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i)
    if (!id_in_range(ids[i], limit)) return i;
  return -1;
}

// True when a block's payload fits in a slot, every size is positive and no
// slot offset overflows (checked by division, so nothing here can overflow).
KVT_HD bool geometry_valid(const Geometry& g) {
  if (g.num_layers <= 0 || g.nruns <= 0 || g.run_bytes <= 0 || g.num_blocks < 0 ||
      g.num_slots < 0 || g.slot_bytes <= 0 || g.payload_offset < 0 ||
      g.payload_offset >= g.slot_bytes)
    return false;
  const int64_t room = g.slot_bytes - g.payload_offset;
  const int64_t max_int = INT64_MAX;
  return g.nruns <= room / g.run_bytes &&
         g.num_layers <= room / (g.nruns * g.run_bytes) &&
         g.num_slots <= max_int / g.slot_bytes;
}

}  // namespace kvtier
