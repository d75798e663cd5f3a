// Host-side pieces both engines share: the placement of KV memory and host
// pool, and the argument checks done before any byte moves.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "kvtier_addressing.h"

namespace kvtier {

// Where the KV cache and the host pool are: raw addresses and sizes only.
struct Placement {
  std::vector<Layer> layers;
  Geometry g;
  uint64_t host_base;  // address of slot 0
  int64_t host_bytes;  // size of the host pool's memory, >= num_slots * slot_bytes
};

inline Placement make_placement(const std::vector<uint64_t>& bases,
                                const std::vector<int64_t>& block_strides,
                                const std::vector<int64_t>& run_strides, int64_t nruns,
                                int64_t run_bytes, int64_t num_blocks, uint64_t host_base,
                                int64_t host_bytes, int64_t num_slots, int64_t slot_bytes,
                                int64_t payload_offset) {
  if (bases.size() != block_strides.size() || bases.size() != run_strides.size())
    throw std::invalid_argument("per-layer bases and strides differ in length");
  Placement p;
  for (size_t l = 0; l < bases.size(); ++l)
    p.layers.push_back(Layer{bases[l], block_strides[l], run_strides[l]});
  p.g = Geometry{static_cast<int64_t>(bases.size()), nruns, run_bytes, num_blocks,
                 num_slots, slot_bytes, payload_offset};
  p.host_base = host_base;
  p.host_bytes = host_bytes;
  if (!geometry_valid(p.g))
    throw std::invalid_argument("invalid copy geometry (no layers, a non-positive size, "
                                "or a block's payload does not fit in a slot)");
  if (num_slots > host_bytes / slot_bytes)
    throw std::invalid_argument("host pool of " + std::to_string(host_bytes) +
                                " bytes is short of " + std::to_string(num_slots) +
                                " slots of " + std::to_string(slot_bytes) + " bytes");
  return p;
}

// Throws std::invalid_argument (Python: ValueError) on the first bad argument,
// in the order the reference engine checks: block ids, slot ids, lengths.
inline void check_transfer(const Geometry& g, const int64_t* blocks, int64_t n_blocks,
                           const int64_t* slots, int64_t n_slots) {
  struct Ids { const int64_t* ids; int64_t n, limit; const char* what; };
  for (const Ids& c : {Ids{blocks, n_blocks, g.num_blocks, "block"},
                       Ids{slots, n_slots, g.num_slots, "slot"}}) {
    const int64_t bad = first_out_of_range(c.ids, c.n, c.limit);
    if (bad >= 0)
      throw std::invalid_argument(std::string(c.what) + " id " + std::to_string(c.ids[bad]) +
                                  " out of range [0, " + std::to_string(c.limit) + ")");
  }
  if (n_blocks != n_slots)
    throw std::invalid_argument(std::to_string(n_blocks) + " block ids but " +
                                std::to_string(n_slots) + " slot ids");
}

}  // namespace kvtier
