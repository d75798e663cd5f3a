"""The stable import path of the connector (``kv_connector_module_path:
"kvtier.connector"`` in existing deployments): kvtier.vllm.connector."""

from kvtier.vllm.connector import KVTierConnector

__all__ = ["KVTierConnector"]
