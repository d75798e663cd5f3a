"""DRAM slot geometry, computed identically by the scheduler and every worker.

A slot holds one block as a complete disk record (header + payload padded to
4096 bytes), so a slot is written to disk as is and read back in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.copy.engine import round_up
from kvtier.store.record import HEADER_BYTES


@dataclass(frozen=True)
class SlotGeometry:
    payload_bytes: int   # one block, all layers of this rank
    num_slots: int

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + round_up(self.payload_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.record_bytes

    @classmethod
    def plan(cls, payload_bytes: int, dram_bytes: int) -> "SlotGeometry":
        record = HEADER_BYTES + round_up(payload_bytes)
        num_slots = dram_bytes // record
        if num_slots < 2:
            raise ValueError(
                f"kvtier config 'dram_bytes': {dram_bytes} bytes holds {num_slots} blocks of "
                f"{record} bytes; give at least {2 * record} (the DRAM tier also stages "
                "disk loads)")
        return cls(payload_bytes, num_slots)

