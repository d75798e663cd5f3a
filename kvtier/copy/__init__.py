"""Moving bytes between vLLM's paged KV memory and kvtier's DRAM slots: the
layout, the host pool, the torch engine (engine.py) and the csrc/ engine
(native.py) behind one interface."""
