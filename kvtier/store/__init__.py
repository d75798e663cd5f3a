"""The disk tier: the record format (record.py), the store of one namespace and
rank (disk.py), and `kvtier store` (tool.py)."""
