"""Nothing that crosses a process boundary is unpickled (or otherwise turned into code) in the services.

Scans the source of broker/, reward_service/ and rollout_server/ (the wire paths: Redis entries, HTTP bodies,
weight files and tensors from the learner) for pickle and its cousins: pickle-family imports, torch.load without
weights_only=True, numpy loads with allow_pickle, torch.distributed's *_object collectives (they pickle),
yaml loaders that build objects, trust_remote_code=True, eval/exec. Messages travel as msgspec msgpack,
tensors as raw buffers or safetensors.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIRS = ("broker", "reward_service", "rollout_server")

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "pickletools"}
OBJECT_COLLECTIVES = {
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'np.load' for np.load, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _kwarg_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value for k in call.keywords)


def violations(source: str, filename: str) -> list[str]:
    """Every unpickling (or code-executing) construct in `source`, as 'file:line: what'."""
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    hit(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                hit(node, f"from {module} import ...")
            for alias in node.names:
                if alias.name in OBJECT_COLLECTIVES or alias.name == "read_pickle":
                    hit(node, f"from {module} import {alias.name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load", "torch.serialization.load") and not _kwarg_is(node, "weights_only", True):
                hit(node, f"{name} without weights_only=True")
            elif (
                last == "load" and name.split(".")[0] in ("np", "numpy") and not _kwarg_is(node, "allow_pickle", False)
            ):
                hit(node, f"{name} without allow_pickle=False")
            elif last in OBJECT_COLLECTIVES or last == "read_pickle":
                hit(node, f"{name} (pickles its payload)")
            elif name in ("yaml.unsafe_load", "yaml.full_load") or (
                name == "yaml.load" and not any(k.arg == "Loader" and "Safe" in _dotted(k.value) for k in node.keywords)
            ):
                hit(node, f"{name} (builds arbitrary objects)")
            elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                hit(node, f"{node.func.id}()")
            if _kwarg_is(node, "trust_remote_code", True):
                hit(node, f"{name}(trust_remote_code=True)")
    return found


def test_service_wire_paths_never_unpickle() -> None:
    """Guards against a pickle (remote code execution for whoever can write to Redis, reach an engine's HTTP API
    or place a checkpoint) creeping into the broker, the reward service or the rollout server."""
    files = [p for d in SERVICE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30, "the scan found no sources: wrong root?"
    found = [v for p in files for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


BAD = """
import pickle
import dill as d
from cloudpickle import loads
from torch.distributed import broadcast_object_list
import torch, numpy as np, yaml
torch.load(f)
torch.load(f, weights_only=False)
np.load(f, allow_pickle=True)
np.load(f)
dist.all_gather_object(out, obj)
pd.read_pickle(f)
yaml.load(s)
yaml.unsafe_load(s)
AutoModel.from_pretrained(p, trust_remote_code=True)
eval(s)
"""

GOOD = """
import torch, numpy as np, yaml, msgspec
torch.load(f, weights_only=True)
np.load(f, allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
model.eval()
msgspec.msgpack.decode(b)
AutoModel.from_pretrained(p)
"""


def test_the_scanner_finds_each_pattern() -> None:
    """Guards against a scanner that silently finds nothing (and so proves nothing), or flags the safe forms."""
    lines = [int(v.split(":")[1]) for v in violations(BAD, "x.py")]
    assert lines == [n for n in range(2, 17) if n != 6], violations(BAD, "x.py")  # all but the plain import
    assert violations(GOOD, "x.py") == []
