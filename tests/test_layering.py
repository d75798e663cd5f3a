"""The house rules (docs/architecture.md), read off the imports of every module:
only kvtier/vllm/ imports vLLM, and no package imports one above it.

    vllm/                  the vLLM glue: may import anything
    plan/                  the planner: cache/ (it replays the product's policy)
    store/                 records on disk: cache/ (keys, ledger), copy/ (alignment)
    cache/   copy/         pure policy / moving bytes: nothing else of kvtier's

``kvtier.config`` (typed settings, no vLLM) may be imported from anywhere.
"""

import ast
from pathlib import Path

import pytest

KVTIER = Path(__file__).resolve().parents[1] / "kvtier"

ALLOWED = {
    "cache": {"cache"},
    "copy": {"copy", "_copy_engine"},
    "store": {"store", "cache", "copy", "_copy_engine"},
    "plan": {"plan", "cache"},
}
ANYWHERE = {"config", "cliargs"}   # leaves: they import no other kvtier module


def imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (functions, try blocks too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "kvtier":   # from kvtier import x: x is the module
                out += [f"kvtier.{a.name}" for a in node.names]
            else:
                out.append(node.module)
    return out


def violations(root: Path = KVTIER) -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for name in imports(path):
                top = name.split(".")
                if top[0] == "vllm":
                    bad.append(f"{path.relative_to(root.parent)} imports {name} (only "
                               "kvtier/vllm/ may import vLLM)")
                elif top[0] == "kvtier" and len(top) > 1 \
                        and top[1] not in allowed | ANYWHERE:
                    bad.append(f"{path.relative_to(root.parent)} imports {name} "
                               f"(kvtier/{package}/ may import {sorted(allowed)})")
    return bad


def test_the_layers_hold():
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    """A check that cannot fail is no check: plant the imports it must refuse."""
    for pkg in ALLOWED:
        (tmp_path / pkg).mkdir()
    (tmp_path / "cache" / "bad.py").write_text(
        "def f():\n    try:\n        from vllm.config import VllmConfig\n"
        "    except ImportError:\n        pass\n")
    (tmp_path / "store" / "worse.py").write_text("from kvtier.vllm import worker\n")
    (tmp_path / "copy" / "sly.py").write_text("from kvtier import store\n")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert any("cache/bad.py imports vllm.config" in v for v in found)
    assert any("store/worse.py imports kvtier.vllm" in v for v in found)
    assert any("copy/sly.py imports kvtier.store" in v for v in found)


@pytest.mark.parametrize("module", ["kvtier.connector"])
def test_the_stable_connector_path_still_loads(module):
    pytest.importorskip("vllm")
    import importlib
    assert importlib.import_module(module).KVTierConnector.__name__ == "KVTierConnector"
