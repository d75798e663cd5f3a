"""Typed, validated ``kv_connector_extra_config``.

Every key is checked at start-up: an unknown key or a bad value raises
``ConfigError`` naming the key and what it accepts. Sizes take ints or strings
such as ``"64GiB"``, ``"512MB"``, ``"1.5TiB"``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A kv_connector_extra_config key has a bad value (or is unknown)."""


_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(key: str, value: Any) -> int:
    """Bytes from an int or a string like ``"64GiB"``; ConfigError names ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"kvtier config {key!r}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"kvtier config {key!r}: size must be >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(
        f"kvtier config {key!r}: cannot read {value!r} as a size; use bytes or a "
        "string such as '64GiB', '512MB', '2TiB'")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


def _default_dram_bytes() -> int:
    """10% of physical memory, at most 64 GiB: room for the engine and the OS."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return min(total // 10, 64 << 30)


DISK_ADMISSIONS = ("write_through", "second_use", "on_dram_evict")   # kvtier.cache.admission
REMOTE_KINDS = ("mooncake",)


@dataclass(frozen=True)
class RemoteConfig:
    """``remote``: a cluster-wide tier behind the disk tier (kvtier.store.remote)."""

    master: str
    """host:port of the Mooncake master."""
    kind: str = "mooncake"
    protocol: str = "tcp"
    """Mooncake transfer protocol: tcp | rdma."""
    device: str = ""
    """RDMA device names (protocol rdma)."""
    local_hostname: str = ""
    """This engine's address as other Mooncake clients reach it. Default: the host's name."""
    metadata_server: str = "P2PHANDSHAKE"
    """Mooncake's metadata service (P2PHANDSHAKE: none needed)."""
    segment_bytes: int = 0
    """Memory this engine lends the cluster store. 0 (default): none; dedicated storage
    clients (``mooncake_client``, deploy/k8s/mooncake.yaml) hold the data, so engines come
    and go without taking cache with them."""
    lookup_timeout_ms: float = 20.0
    """A lookup waits at most this long for the cluster (then: a miss)."""
    retry_seconds: float = 5.0
    """After a cluster error, the tier is skipped (a miss) this long, then tried again."""

    _KEYS = ("kind", "master", "protocol", "device", "local_hostname", "metadata_server",
             "segment_bytes", "lookup_timeout_ms", "retry_seconds")

    @classmethod
    def parse(cls, value: Any) -> "RemoteConfig":
        where = "kvtier config 'remote'"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object such as {{\"kind\": \"mooncake\", "
                              f"\"master\": \"host:port\"}}, got {value!r}")
        unknown = sorted(set(value) - set(cls._KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; accepted keys: "
                              f"{sorted(cls._KEYS)}")
        kind = value.get("kind", "mooncake")
        if kind not in REMOTE_KINDS:
            raise ConfigError(f"{where}.kind: expected one of {REMOTE_KINDS}, got {kind!r}")
        master = value.get("master")
        host, _, port = master.rpartition(":") if isinstance(master, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}.master: expected 'host:port' of the Mooncake master, "
                              f"got {master!r}")
        vals: dict[str, Any] = {"kind": kind, "master": master}
        for key in ("protocol", "device", "local_hostname", "metadata_server"):
            if key in value:
                if not isinstance(value[key], str):
                    raise ConfigError(f"{where}.{key}: expected a string, got {value[key]!r}")
                vals[key] = value[key]
        if vals.get("protocol", "tcp") not in ("tcp", "rdma"):
            raise ConfigError(f"{where}.protocol: expected 'tcp' or 'rdma', "
                              f"got {vals['protocol']!r}")
        if not vals.get("metadata_server", "P2PHANDSHAKE"):
            raise ConfigError(f"{where}.metadata_server: must not be empty")
        if "segment_bytes" in value:
            vals["segment_bytes"] = parse_size("remote.segment_bytes", value["segment_bytes"])
        for key in ("lookup_timeout_ms", "retry_seconds"):
            if key in value:
                v = value[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                        or not math.isfinite(v):
                    raise ConfigError(f"{where}.{key}: expected a number > 0, got {v!r}")
                vals[key] = float(v)
        return cls(**vals)


@dataclass(frozen=True)
class KVTierConfig:
    """kvtier's settings. Field docs double as the operator reference."""

    dram_bytes: int = -1
    """DRAM tier budget per TP rank. Default: 10% of physical memory, at most 64 GiB."""
    disk_path: str = ""
    """Directory of the disk tier. Default: $XDG_CACHE_HOME/kvtier (~/.cache/kvtier)."""
    disk_bytes: int = -1
    """Disk tier budget (all ranks together). Default: 50% of the free space, at most 1 TiB."""
    disk: bool = True
    """Enable the disk tier. false: DRAM only."""
    ttl_seconds: float = 3600.0
    """A block unused for this long is expired: never served, then removed."""
    max_ttl_seconds: float = 86400.0
    """The longest TTL a request may ask for (kv_transfer_params kvtier.ttl)."""
    max_pinned_bytes: int = -1
    """Bytes of blocks requests may pin (kvtier.pin). Default: 1/4 of the disk tier."""
    max_pinned_bytes_per_tenant: int = -1
    """Of which one cache_salt tenant may pin. Default: max_pinned_bytes."""
    fsync: bool = False
    """fsync each record before publishing it (survives power loss, slower)."""
    o_direct: str = "auto"
    """auto | on | off: O_DIRECT disk I/O (auto: where the filesystem allows)."""
    io_threads: int = 4
    """Threads for disk reads and writes per worker."""
    store_decode_tokens: bool = True
    """Also offload blocks of generated tokens (agentic turns resend them)."""
    min_hit_blocks: int = 1
    """Shortest external hit (in blocks) worth a load."""
    load_policy: str = "auto"
    """auto | always: auto declines a load when recompute is measured faster."""
    disk_admission: str = "write_through"
    """write_through | second_use | on_dram_evict: which blocks get a disk record,
    and when (kvtier.cache.admission; docs/operators.md)."""
    secret_file: str = ""
    """A file holding the store's secret (>= 16 bytes, not world-readable): records
    carry a MAC and file names are keyed; a record without a valid MAC is a miss.
    Required with ``shared``. Empty: records are trusted as found (checksums only)."""
    shared: bool = False
    """Several engines use this disk_path: disk_bytes is the budget of the whole store,
    shared by every engine on it (each must set shared and the same secret_file)."""
    remote: RemoteConfig | None = None
    """A cluster-wide tier behind the disk tier: ``{"kind": "mooncake", "master":
    "host:port", ...}`` (RemoteConfig; docs/operators.md). Needs the disk tier (blocks
    found in the cluster are kept on local disk) and secret_file (the same on every
    engine: the cluster store is shared)."""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "KVTierConfig":
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(
                f"kvtier config: unknown key(s) {unknown}; accepted keys: {sorted(known)}")
        vals: dict[str, Any] = {}
        for key in ("dram_bytes", "disk_bytes", "max_pinned_bytes",
                    "max_pinned_bytes_per_tenant"):
            if key in extra:
                vals[key] = parse_size(key, extra[key])
        for key in ("disk", "fsync", "store_decode_tokens", "shared"):
            if key in extra:
                v = extra[key]
                if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
                    v = v.lower() in ("true", "1")
                if not isinstance(v, bool):
                    raise ConfigError(f"kvtier config {key!r}: expected true or false, got {v!r}")
                vals[key] = v
        for key in ("ttl_seconds", "max_ttl_seconds"):
            if key in extra:
                v = extra[key]
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    v = float("nan")
                if not v > 0:
                    raise ConfigError(
                        f"kvtier config {key!r}: expected a number > 0 (or 'inf'), "
                        f"got {extra[key]!r}")
                vals[key] = v
        if vals.get("max_ttl_seconds", math.inf) < vals.get("ttl_seconds", cls.ttl_seconds):
            raise ConfigError(
                f"kvtier config 'max_ttl_seconds': {vals['max_ttl_seconds']!r} is below "
                f"ttl_seconds ({vals.get('ttl_seconds', cls.ttl_seconds)!r}); it caps what "
                "requests may ask for above the default")
        for key in ("io_threads", "min_hit_blocks"):
            if key in extra:
                v = extra[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"kvtier config {key!r}: expected an integer >= 1, got {v!r}")
                vals[key] = v
        for key, choices in (("o_direct", ("auto", "on", "off")), ("load_policy", ("auto", "always")),
                             ("disk_admission", DISK_ADMISSIONS)):
            if key in extra:
                v = extra[key]
                if v not in choices:
                    raise ConfigError(f"kvtier config {key!r}: expected one of {choices}, got {v!r}")
                vals[key] = v
        if "disk_path" in extra:
            v = extra["disk_path"]
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"kvtier config 'disk_path': expected a directory path, got {v!r}")
            vals["disk_path"] = v
        if "secret_file" in extra:
            v = extra["secret_file"]
            if not isinstance(v, str):
                raise ConfigError(f"kvtier config 'secret_file': expected a file path, got {v!r}")
            vals["secret_file"] = v.strip()
        if vals.get("shared") and not vals.get("secret_file"):
            raise ConfigError(
                "kvtier config 'shared': a store shared by several engines needs 'secret_file' "
                "(the same secret on every engine: records are authenticated, so no process "
                "that can write the directory can plant KV into another engine's answers)")
        if "remote" in extra and extra["remote"] is not None:
            vals["remote"] = RemoteConfig.parse(extra["remote"])
            if not vals.get("secret_file"):
                raise ConfigError(
                    "kvtier config 'remote': a cluster store is shared by every engine that "
                    "reaches it; set 'secret_file' (the same secret on every engine: records "
                    "are authenticated, so no client of the cluster can plant KV into another "
                    "engine's answers)")
            if vals.get("disk") is False:
                raise ConfigError(
                    "kvtier config 'remote': needs the disk tier ('disk': true); blocks found "
                    "in the cluster are kept on local disk")
        cfg = cls(**vals).resolved()
        if cfg.remote is not None and not cfg.disk_enabled:
            raise ConfigError(
                f"kvtier config 'remote': needs the disk tier, but 'disk_bytes' is "
                f"{cfg.disk_bytes}; blocks found in the cluster are kept on local disk")
        if cfg.secret_file and cfg.disk_enabled:
            from kvtier.store.secret import SecretError, read_secret
            try:
                read_secret(cfg.secret_file)
            except SecretError as e:
                raise ConfigError(f"kvtier config 'secret_file': {e}") from None
        return cfg

    def resolved(self) -> "KVTierConfig":
        """Fill machine-dependent defaults (DRAM from RAM size, disk from free space)."""
        from dataclasses import replace

        disk_path = self.disk_path or str(_default_cache_dir())
        dram = self.dram_bytes if self.dram_bytes >= 0 else _default_dram_bytes()
        disk_bytes = self.disk_bytes
        if disk_bytes < 0:
            probe = Path(disk_path)
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            try:
                st = os.statvfs(probe)
                disk_bytes = min(st.f_bavail * st.f_frsize // 2, 1 << 40)
            except OSError:
                disk_bytes = 10 << 30
        max_ttl = max(self.max_ttl_seconds, self.ttl_seconds)
        pinned = self.max_pinned_bytes
        if pinned < 0:
            pinned = (disk_bytes if self.disk and disk_bytes > 0 else dram) // 4
        per_tenant = self.max_pinned_bytes_per_tenant
        if per_tenant < 0:
            per_tenant = pinned
        return replace(self, disk_path=disk_path, dram_bytes=dram, disk_bytes=disk_bytes,
                       max_ttl_seconds=max_ttl, max_pinned_bytes=pinned,
                       max_pinned_bytes_per_tenant=per_tenant)

    @property
    def disk_enabled(self) -> bool:
        return self.disk and self.disk_bytes > 0
