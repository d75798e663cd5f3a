"""kvtier: prefix-cache offload for vLLM (GPU -> pinned DRAM -> NVMe).

Load it with ``--kv-transfer-config '{"kv_connector":"KVTierConnector",
"kv_connector_module_path":"kvtier.connector","kv_role":"kv_both"}'``.
"""

__version__ = "0.1.0"
