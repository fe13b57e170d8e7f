"""The contract with real SGLang, checked against the pinned release's own source (weights/sglang_release.py).

The release's wheel is fetched with `pip download sglang==<pin> --no-deps` into a cache ($XDG_CACHE_HOME or
~/.cache, `longtrace/sglang-<pin>/`, reused across runs) and its Python files unpacked there: nothing is installed.
- Routes and fields: our engine clients' call sites are read with `ast` (route, HTTP method, body keys, literal
  values); SGLang's route table comes from the decorators of srt/entrypoints/http_server.py and each route's request
  class from its handler's signature and srt/managers/io_struct.py, also with `ast` (sglang is never imported). Every
  route must be served with that method and take every key at a compatible type (each value our built-in engine's
  model admits for the key, or the literal we send, converted to SGLang's annotation with msgspec).
- /generate: a payload the rollout worker builds is decoded by SGLang's generated JSON contract
  (sglang/api/v1/api_types.py, which the server applies to every /generate body and which imports only msgspec).
- The built-in engine serves every route our clients call, with every key a declared field of its body model.
- The command line `engine launch --backend sglang` builds is parsed by SGLang's own parser: ServerArgs.add_cli_args
  of the download's srt/server_args.py, run in a subprocess where the modules sglang code imports that are not
  importable here (CUDA kernels, zmq, ...) are stubs, so only SGLang's argument definitions run. These are SGLang's
  definitions, not a flag map of ours.
- The pin: the Dockerfile (engine image, the learner's NCCL), compose, docs and the wheel's torch agree with it.
Also here: the ranks an engine adds to the weight-update group (weights/sglang_release.py `engine_ranks`), the NCCL
note of a failed group, and the GPU script that checks what only a real engine shows (deploy/gpu/sglang_smoke.sh:
that it starts, joins the group and loads the weights), which cannot run here: it is parsed and import-checked.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin
from unittest.mock import MagicMock

import httpx
import msgspec
import pytest

from weights.sglang_release import (
    ENGINE_IMAGE,
    ENGINE_NCCL_VERSION,
    ENGINE_TORCH_VERSION,
    SGLANG_VERSION,
    distributed_update_problem,
    engine_ranks,
)

REPO = Path(__file__).resolve().parents[2]
ENGINE_CLIENTS = (
    "rollout_server/worker/client.py",  # /generate, liveness, the served version
    "rollout_server/launch.py",  # the launcher's health, version and layout reads
    "weights/engine_client.py",  # the learner's control calls
    "weights/exports.py",  # /update_weights_from_disk (late engines, the disk backend)
    "learner/weight_sync/group.py",  # the weight-update group and its buckets
    "learner/weight_sync/fleet.py",
    "learner/weight_sync/distributed.py",
    "learner/weight_sync/disk.py",
    "eval/run.py",  # the engines' model and context length
    "rollout_server/bench_engine.py",  # `longtrace bench engine` posts /generate
)
NOT_ENGINE_CLIENTS = ("rollout_server/engine/", "reward_service/", "experiments/", "tests/")  # servers, harnesses
ROUTE = re.compile(r"/[a-z_]+")
VERBS = {"get": "GET", "post": "POST", "put": "PUT", "delete": "DELETE"}
UNKNOWN = "<computed>"


# ---------------------------------------------------------------------------------------------- the download


def _cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "longtrace" / f"sglang-{SGLANG_VERSION}"


@pytest.fixture(scope="module")
def sgl() -> Path:
    """The pinned release's `sglang/` source tree (Python files and the wheel's METADATA), downloaded once."""
    root = _cache_root()
    src = root / "src"
    if not (src / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        wheels = sorted(root.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", f"sglang=={SGLANG_VERSION}", "--no-deps", "-d", str(root)]
            # The wheel the engine image runs, whatever this machine is (only its Python files are read).
            cmd += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
            cmd += ["--platform", "manylinux_2_34_x86_64"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"pip download sglang=={SGLANG_VERSION} failed:\n{out.stderr[-3000:]}"
            wheels = sorted(root.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        tmp = root / f"src.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as whl:
            whl.extractall(tmp, [n for n in whl.namelist() if n.endswith(".py") or n.endswith(".dist-info/METADATA")])
        (tmp / ".complete").write_text(wheels[0].name)
        try:
            tmp.rename(src)
        except OSError:  # another run unpacked it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return src


# ---------------------------------------------------------------------------------------------- SGLang's side


@dataclass
class SglClass:
    bases: list[str]
    fields: dict[str, ast.expr]  # name -> annotation


def sgl_classes(source: str) -> tuple[dict[str, SglClass], dict[str, ast.expr]]:
    """io_struct.py's classes with their annotated fields, and its module-level type aliases."""
    tree = ast.parse(source)
    classes, aliases = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = {
                s.target.id: s.annotation
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and "ClassVar" not in ast.unparse(s)
            }
            classes[node.name] = SglClass([ast.unparse(b) for b in node.bases], fields)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            aliases[node.targets[0].id] = node.value
    return classes, aliases


def sgl_fields(classes: dict[str, SglClass], name: str) -> dict[str, ast.expr]:
    """A request class's fields, those of its bases in io_struct.py included (BaseReq's rid)."""
    cls = classes[name]
    out: dict[str, ast.expr] = {}
    for base in cls.bases:
        if base in classes:
            out |= sgl_fields(classes, base)
    return out | cls.fields


def sgl_routes(source: str, classes: dict[str, SglClass]) -> dict[str, dict[str, str | None]]:
    """http_server.py's routes: path -> {method: the io_struct request class its handler takes, or None}."""
    routes: dict[str, dict[str, str | None]] = {}
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        names = {n.id for a in fn.args.args if a.annotation for n in ast.walk(a.annotation) if isinstance(n, ast.Name)}
        request = next((n for n in sorted(names) if n in classes), None)
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if ast.unparse(dec.func.value) != "app" or not dec.args or not isinstance(dec.args[0], ast.Constant):
                continue  # not a route, or a path from the environment
            verb = dec.func.attr
            if verb == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = ast.literal_eval(kw["methods"]) if "methods" in kw else ["GET"]
            elif verb in VERBS:
                methods = [VERBS[verb]]
            else:
                continue
            for method in methods:
                routes.setdefault(dec.args[0].value, {})[method] = request
    return routes


_ATOMS: dict[str, Any] = {"int": int, "str": str, "bool": bool, "float": float, "bytes": bytes, "None": None}


def sgl_type(node: ast.expr, aliases: dict[str, ast.expr], depth: int = 0) -> Any:
    """An io_struct.py annotation as a type msgspec can convert to; names it cannot see (its own classes,
    numpy, torch) become Any, so only what is spelled out is checked."""
    if depth > 20:
        return Any
    if isinstance(node, ast.Constant):
        return None if node.value is None else sgl_type(ast.parse(node.value, mode="eval").body, aliases, depth + 1)
    if isinstance(node, ast.Name):
        if node.id in _ATOMS:
            return _ATOMS[node.id]
        return sgl_type(aliases[node.id], aliases, depth + 1) if node.id in aliases else Any
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return Union[sgl_type(node.left, aliases, depth + 1), sgl_type(node.right, aliases, depth + 1)]  # noqa: UP007
    if not isinstance(node, ast.Subscript):
        return Any
    base = ast.unparse(node.value).split(".")[-1]
    elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    args = [sgl_type(e, aliases, depth + 1) for e in elts]
    if base in ("List", "list", "Sequence"):
        return list[args[0]]  # type: ignore[valid-type]
    if base in ("Dict", "dict", "Mapping"):
        return dict[args[0], args[1]]  # type: ignore[valid-type]
    if base == "Optional":
        return Optional[args[0]]  # noqa: UP045
    if base == "Union":
        return Union[tuple(args)]  # noqa: UP007
    if base == "Literal":
        return Literal[tuple(ast.literal_eval(e) for e in elts)]
    if base == "Annotated":
        return args[0]
    return Any


def accepts(tp: Any, value: Any) -> bool:
    """Whether SGLang's annotation `tp` admits the JSON value (msgspec's rules for scalars; unions, lists and dicts
    walked here, as msgspec refuses some unions SGLang's pydantic layer takes, e.g. List[int] | List[List[int]])."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin is Union or isinstance(tp, types.UnionType):
        return any(accepts(a, value) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(accepts(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(accepts(args[1], v) for v in value.values())
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- our side


@dataclass(frozen=True)
class Use:
    """One engine call of ours: where, what, and the body's keys with their literal values (or UNKNOWN)."""

    where: str
    method: str
    route: str
    body: tuple[tuple[str, Any], ...]


def _bindings(scope: ast.AST) -> dict[str, list[ast.expr]]:
    """Names assigned in `scope` (and for-loop targets) -> the values they may hold."""
    out: dict[str, list[ast.expr]] = {}
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out.setdefault(t.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            out.setdefault(node.target.id, []).append(node.iter)
    return out


@dataclass(frozen=True)
class Wrapper:
    """A function of ours that makes a request from its parameters (EngineClient.call: POST url + path, body)."""

    method: str
    route_arg: int
    body_arg: int | None
    body_name: str | None


class Scanner:
    """Finds the engine requests in our client modules: HTTP calls (`http.get(...)`, `request("POST", ...)`) whose
    URL ends in a route (a literal, or a name bound to one), and calls of our own functions that make such a
    request from their parameters (`client.call(url, "/x", body)`, `submit(client.call, url, path, body)`)."""

    def __init__(self, files: dict[str, str]) -> None:
        self.trees = {name: ast.parse(text) for name, text in files.items()}
        self.globals: dict[str, list[ast.expr]] = {}
        for tree in self.trees.values():  # module-level names are shared (LIVENESS_PATHS is imported)
            for name, values in _bindings(ast.Module(body=[s for s in tree.body if not _is_def(s)])).items():
                self.globals.setdefault(name, []).extend(values)
        self.wrappers: dict[str, Wrapper] = {}

    def uses(self) -> list[Use]:
        while True:  # wrappers of wrappers (call_idempotent -> call -> request) until nothing new
            known = dict(self.wrappers)
            out: list[Use] = []
            for name, tree in self.trees.items():
                self._visit(name, tree, [], None, out)
            if self.wrappers == known:
                return out

    def _visit(
        self, file: str, node: ast.AST, scopes: list[dict[str, list[ast.expr]]], fn: Any, out: list[Use]
    ) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            scopes, fn = [_bindings(node), *scopes], node
        if isinstance(node, ast.Call):
            self._call(f"{file}:{node.lineno}", node, scopes, fn, out)
        for child in ast.iter_child_nodes(node):
            self._visit(file, child, scopes, fn, out)

    def _resolve(self, name: str, scopes: list[dict[str, list[ast.expr]]]) -> list[ast.expr]:
        for scope in [*scopes, self.globals]:
            if name in scope:
                return scope[name]
        return []

    def routes(self, node: ast.expr, scopes: list[dict[str, list[ast.expr]]], depth: int = 0) -> list[str]:
        """The routes a URL expression ends in."""
        if depth > 5:
            return []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value] if ROUTE.fullmatch(node.value) else []
        if isinstance(node, ast.JoinedStr) and node.values:
            if any(isinstance(v, ast.Constant) and re.search(r"\s", str(v.value)) for v in node.values):
                return []  # a message ("GET {url}{path}"), not a URL
            last = node.values[-1]
            if isinstance(last, ast.Constant):
                m = re.search(r"(?<![\w/])(/[a-z_]+)$", str(last.value))
                return [m.group(1)] if m and last.value.startswith("/") else []
            return self.routes(last.value, scopes, depth + 1) if isinstance(last, ast.FormattedValue) else []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.routes(node.right, scopes, depth + 1)
        if isinstance(node, ast.Tuple | ast.List):
            return [r for e in node.elts for r in self.routes(e, scopes, depth + 1)]
        if isinstance(node, ast.Name):
            return [r for v in self._resolve(node.id, scopes) for r in self.routes(v, scopes, depth + 1)]
        return []

    def _request(self, call: ast.Call) -> tuple[str, int, ast.expr | None, list[ast.expr]] | None:
        """(method, index of the URL argument, the body expression, the arguments) when `call` is a request."""
        func, args = call.func, list(call.args)
        attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        inner, inner_args = attr, args
        if attr == "submit" and args and isinstance(args[0], ast.Attribute | ast.Name):  # pool.submit(fn, *args)
            inner = args[0].attr if isinstance(args[0], ast.Attribute) else args[0].id
            inner_args = args[1:]
        wrapper = self.wrappers.get(inner)
        if wrapper is not None and len(inner_args) > wrapper.route_arg:
            if wrapper.body_arg is not None and len(inner_args) > wrapper.body_arg:
                wrapped_body: ast.expr | None = inner_args[wrapper.body_arg]
            else:
                wrapped_body = next((k.value for k in call.keywords if k.arg == wrapper.body_name), None)
            return wrapper.method, wrapper.route_arg, wrapped_body, inner_args
        body = next((k.value for k in call.keywords if k.arg in ("json", "content")), None)
        if isinstance(body, ast.Call) and body.args:  # content=_encode(payload)
            body = body.args[0]
        if attr in VERBS and args:
            return VERBS[attr], 0, body, args
        if len(args) > 1 and isinstance(args[0], ast.Constant) and args[0].value in VERBS.values():
            return str(args[0].value), 1, args[2] if len(args) > 2 else body, args
        return None

    def _call(
        self, where: str, call: ast.Call, scopes: list[dict[str, list[ast.expr]]], fn: Any, out: list[Use]
    ) -> None:
        request = self._request(call)
        if request is None:
            return
        method, index, body_node, args = request
        url = args[index]
        params = [a.arg for a in fn.args.args if a.arg != "self"] if fn is not None else []
        tail = url.right if isinstance(url, ast.BinOp) else url.values[-1].value if _fstring_name(url) else url
        if isinstance(tail, ast.Name) and tail.id in params and tail.id not in scopes[0] and fn.name[:2] != "__":
            body_name = body_node.id if isinstance(body_node, ast.Name) and body_node.id in params else None
            body_arg = params.index(body_name) if body_name else None
            self.wrappers[fn.name] = Wrapper(method, params.index(tail.id), body_arg, body_name)
            return
        body = self._body(body_node, scopes) if body_node is not None else {}
        out.extend(Use(where, method, route, tuple(sorted(body.items()))) for route in self.routes(url, scopes))

    def _body(self, node: ast.expr, scopes: list[dict[str, list[ast.expr]]]) -> dict[str, Any]:
        dicts = [node] if isinstance(node, ast.Dict) else []
        if isinstance(node, ast.Name):
            dicts = [v for v in self._resolve(node.id, scopes) if isinstance(v, ast.Dict)]
        keys: dict[str, Any] = {}
        for d in dicts:
            for k, v in zip(d.keys, d.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    keys[k.value] = _literal(v)
        return keys


def _fstring_name(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) and isinstance(node.values[-1], ast.FormattedValue)


def _is_def(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)


def _literal(node: ast.expr) -> Any:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return UNKNOWN
    return value if isinstance(value, str | int | float | bool | type(None)) else UNKNOWN


@pytest.fixture(scope="module")
def uses() -> list[Use]:
    return Scanner({f: (REPO / f).read_text() for f in ENGINE_CLIENTS}).uses()


@pytest.fixture(scope="module")
def sglang_side(sgl: Path) -> tuple[dict[str, dict[str, str | None]], dict[str, SglClass], dict[str, ast.expr]]:
    classes, aliases = sgl_classes((sgl / "sglang/srt/managers/io_struct.py").read_text())
    routes = sgl_routes((sgl / "sglang/srt/entrypoints/http_server.py").read_text(), classes)
    return routes, classes, aliases


def builtin_routes() -> dict[str, dict[str, Any]]:
    """The built-in engine's routes: path -> {method: the pydantic body model, or None}. Built on a stand-in engine:
    building the app reads only its config and names."""
    from fastapi.routing import APIRoute
    from pydantic import BaseModel

    from rollout_server.engine.api import build_app
    from rollout_server.engine.config import EngineConfig

    stand_in = MagicMock(config=EngineConfig(), tokenizer=None, served_model_name="m", context_length=64)
    app = build_app(stand_in)
    out: dict[str, dict[str, Any]] = {}
    for r in app.routes:
        if isinstance(r, APIRoute):
            models = [
                t
                for p in r.dependant.body_params
                for t in (p.field_info.annotation, *get_args(p.field_info.annotation))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ]
            for method in r.methods:
                out.setdefault(r.path, {})[method] = models[0] if models else None
    return out


def samples(tp: Any) -> list[Any]:
    """JSON values of type `tp` (a pydantic field annotation), one per alternative; [] where it says nothing."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return samples(args[0])
    if origin is Union or isinstance(tp, types.UnionType):
        return [s for a in args for s in samples(a)]
    if origin is Literal:
        return list(args)
    if origin is list:
        return [[s] for s in samples(args[0])]
    if origin is dict:
        return [{"k": s} for s in samples(args[1])]
    return {int: [1], float: [0.5], str: ["x"], bool: [True], type(None): [None]}.get(tp, [])


# ---------------------------------------------------------------------------------------------- the contract


def test_the_scanner_finds_our_engine_calls(uses: list[Use]) -> None:
    """Guards against a scanner that misses calls (the contract checks would then pass vacuously): the calls every
    push and every rollout makes are found with their bodies' keys, and every route our client modules spell in a
    URL belongs to a request it found."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for u in uses:
        found.setdefault((u.method, u.route), {}).update(u.body)
    assert {"input_ids", "sampling_params", "return_logprob", "rid"} <= set(found[("POST", "/generate")])
    assert set(found[("POST", "/init_weights_update_group")]) == {
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend",
    }  # fmt: skip
    assert found[("POST", "/update_weight_version")]["abort_all_requests"] is False
    assert "shapes" in found[("POST", "/update_weights_from_distributed")]
    assert ("GET", "/get_server_info") in found and ("POST", "/pause_generation") in found
    spelt = set()
    for rel in ENGINE_CLIENTS:
        scanner = Scanner({rel: (REPO / rel).read_text()})
        strings = [n for n in ast.walk(scanner.trees[rel]) if isinstance(n, ast.Constant | ast.JoinedStr)]
        spelt |= {r for n in strings for r in scanner.routes(n, [])}
    assert spelt <= {u.route for u in uses}, f"routes in URLs of no request found: {spelt - {u.route for u in uses}}"


def test_no_engine_client_escapes_the_scan() -> None:
    """Guards against a new module calling an engine's control API without this contract test reading it: any
    shipped module naming an engine-only route must be one of ENGINE_CLIENTS."""
    engine_only = {path for path in builtin_routes() if not path.startswith("/v1") and path != "/health"}
    strays = []
    packages = [p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests"]
    for path in sorted(p for package in packages for p in (REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(NOT_ENGINE_CLIENTS) or rel in ENGINE_CLIENTS:
            continue
        scanner = Scanner({rel: path.read_text()})
        strings = [n for n in ast.walk(scanner.trees[rel]) if isinstance(n, ast.Constant | ast.JoinedStr)]
        named = {r for n in strings for r in scanner.routes(n, [])} & engine_only
        if named:
            strays.append(f"{rel}: {sorted(named)}")
    assert not strays, "modules naming engine routes outside ENGINE_CLIENTS (add them there):\n" + "\n".join(strays)


def sglang_problems(uses: list[Use], sglang_side: Any, engine: dict[str, dict[str, Any]]) -> list[str]:
    """What in `uses` SGLang's route table and request classes do not take, each naming the call site."""
    routes, classes, aliases = sglang_side
    problems = []
    for u in uses:
        served = routes.get(u.route)
        if served is None or u.method not in served:
            near = sorted(r for r in routes if u.route.strip("/").split("_")[0] in r)
            problems.append(f"{u.where}: SGLang {SGLANG_VERSION} has no {u.method} {u.route} (routes like it: {near})")
            continue
        request = served[u.method]
        if not u.body:
            continue
        if request is None:
            problems.append(f"{u.where}: SGLang's {u.route} handler takes no request body, we send {dict(u.body)}")
            continue
        fields = sgl_fields(classes, request)
        ours = engine.get(u.route, {}).get(u.method)
        for key, value in u.body:
            if key not in fields:
                problems.append(
                    f"{u.where}: {u.route} sends {key!r}, not a field of SGLang's {request}: {sorted(fields)}"
                )
                continue
            tp = sgl_type(fields[key], aliases)
            ours_tp = ours.model_fields[key].annotation if ours is not None and key in ours.model_fields else None
            bad = [v for v in ([value] if value != UNKNOWN else samples(ours_tp)) if not accepts(tp, v)]
            if bad:
                problems.append(
                    f"{u.where}: {u.route} {key!r}: SGLang types it {ast.unparse(fields[key])}, we send {bad}"
                )
    return problems


def test_every_route_and_field_we_send_exists_in_sglang(uses: list[Use], sglang_side: Any) -> None:
    """Guards against calling a route SGLang does not serve (or not with that method) or sending a field its request
    class lacks or types otherwise: the failure names the call site and what moved in the pinned release."""
    problems = sglang_problems(uses, sglang_side, builtin_routes())
    assert not problems, "\n".join(problems)


def test_the_checks_see_a_moved_route_a_missing_field_and_a_wrong_type(sglang_side: Any) -> None:
    """Guards against checks that pass whatever we send: a synthetic client calling a route SGLang lacks, a misspelt
    field and a field of the wrong type (through a wrapper, as EngineClient.call is used) is reported, each by name."""
    client = """
def send(self, url, path, body):
    return self.http.post(url + path, json=body)

def push(self, url):
    self.send(url, "/update_weight_version", {"new_versoin": "3", "abort_all_requests": "no"})
    self.pool.submit(self.send, url, "/update_weights_from_tensorz", {"names": []})
    self.http.get(f"{url}/model_info")
"""
    uses = Scanner({"fake.py": client}).uses()
    assert {(u.method, u.route) for u in uses} == {
        ("POST", "/update_weight_version"), ("POST", "/update_weights_from_tensorz"), ("GET", "/model_info"),
    }  # fmt: skip
    problems = "\n".join(sglang_problems(uses, sglang_side, {}))
    assert "'new_versoin', not a field of SGLang's UpdateWeightVersionReqInput" in problems
    assert "'abort_all_requests': SGLang types it bool, we send ['no']" in problems
    assert "no POST /update_weights_from_tensorz" in problems and "/model_info" not in problems


def test_the_builtin_engine_serves_every_route_and_field_we_send(uses: list[Use]) -> None:
    """Guards against our clients relying on a route or field the built-in engine (SGLang's stand-in on CPU) does
    not serve: it ignores unknown body keys as SGLang does, so a missing field would be dropped silently."""
    engine = builtin_routes()
    problems = []
    for u in uses:
        served = engine.get(u.route, {})
        if u.method not in served:
            problems.append(f"{u.where}: the built-in engine has no {u.method} {u.route}")
            continue
        model = served[u.method]
        missing = [k for k, _ in u.body if model is None or k not in model.model_fields]
        if missing:
            problems.append(f"{u.where}: {u.route} sends {missing}, undeclared in the built-in engine's body model")
    assert not problems, "\n".join(problems)


def _api_types(sgl: Path) -> Any:
    """SGLang's generated /generate contract, loaded by path (it imports only msgspec and typing)."""
    path = sgl / "sglang/api/v1/api_types.py"
    imports = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.parse(path.read_text()).body
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert imports <= {"__future__", "typing", "msgspec"}, f"api_types.py now imports {imports}: load it otherwise"
    spec = importlib.util.spec_from_file_location("sglang_api_types_pinned", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the module's forward references through sys.modules
    spec.loader.exec_module(module)
    return module


def _sampling_keys_added_later() -> set[str]:
    """Keys added to a plan's sampling params after plan_group (`{**plan.sampling_params, KEY: ...}`)."""
    out = set()
    for rel in ("rollout_server/worker/generation.py", "eval/pipeline.py"):
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            if isinstance(node, ast.Dict) and any(
                k is None and "sampling_params" in ast.unparse(v) for k, v in zip(node.keys, node.values, strict=True)
            ):
                out |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return out


def test_the_rollout_workers_generate_body_passes_sglangs_own_contract(sgl: Path) -> None:
    """Guards against a /generate body SGLang refuses with 400: its generated decoder rejects unknown sampling
    parameters and wrong types. The body is the one the rollout worker sends, with every optional key set."""
    from broker.schemas import RewardInfo, SamplingParams, Task, pack_ids
    from common.config import load_config
    from rollout_server.engine.protocol import SamplingParamsSchema
    from rollout_server.worker.client import EngineClient
    from rollout_server.worker.config import RolloutConfig
    from rollout_server.worker.generation import plan_group
    from rollout_server.worker.processors import QWEN3

    cfg = load_config(
        RolloutConfig,
        overrides=["--engines.use_registry=false", '--engines.urls=["http://e:1"]', "--sampling.ignore_eos=true"],
    )
    task = Task(
        run_id="r", group_id="g", dataset_index=0, prompt_ids=pack_ids([1, 2, 3]), label="x",
        reward_info=RewardInfo(question="q"), sampling=SamplingParams(stop=["</answer>"]), num_samples=2,
        policy_version=0,
    )  # fmt: skip
    plan = plan_group(task, cfg, QWEN3)
    later = _sampling_keys_added_later()
    assert {"max_new_tokens", "sampling_seed"} <= later  # the resume's budget, eval's seed
    schema = SamplingParamsSchema.model_fields
    params = {**plan.sampling_params, **{k: samples(schema[k].annotation)[0] for k in later}}
    sent: list[Any] = []

    def engine(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        meta = {"finish_reason": {"type": "length", "length": 1}, "output_token_logprobs": [[-0.5, 7, None]]}
        return httpx.Response(200, json={"text": "a", "output_ids": [7], "meta_info": meta})

    async def generate() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as http:
            client = EngineClient("http://e:1", http, 10, 10, 10)
            await client.generate(plan.prompt_ids, params, "g-0")
            await client.generate(plan.prompt_ids, params, "g-1", return_routed_experts=True)  # routing replay

    asyncio.run(generate())
    api = _api_types(sgl)
    assert sent[1]["return_routed_experts"] is True
    # That decoder lets unknown top-level keys through (and its api_types lack this one): check the routing replay
    # key by name on the request SGLang's /generate builds, io_struct's GenerateReqInput.
    io_struct = ast.parse((sgl / "sglang/srt/managers/io_struct.py").read_text())
    [req] = [n for n in io_struct.body if isinstance(n, ast.ClassDef) and n.name == "GenerateReqInput"]
    fields = {n.target.id for n in req.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert "return_routed_experts" in fields, f"SGLang {SGLANG_VERSION}'s GenerateReqInput lacks it"
    for body in sent:
        try:
            api.GenerateRequest.from_json_value(body)
        except api.JsonContractError as e:
            pytest.fail(f"SGLang {SGLANG_VERSION} refuses our /generate body {body}: {e}")
    unknown = set(params) - set(api.SamplingParams.__struct_fields__)
    assert not unknown, f"sampling params SGLang {SGLANG_VERSION} does not know: {unknown}"
    with pytest.raises(api.JsonContractError):  # the decoder is not a no-op: a misspelt key is refused
        api.GenerateRequest.from_json_value({**sent[0], "sampling_params": {"max_new_token": 3}})


def test_distributed_pushes_open_the_weight_update_session_sglang_requires(uses: list[Use], sgl: Path) -> None:
    """Guards against every bucket failing on real SGLang: from 0.5.23 its scheduler answers
    /update_weights_from_distributed with "must run between begin_weight_update() and end_weight_update()"
    (srt/managers/scheduler_components/weight_updater.py), so a push must POST /begin_weight_update before the
    buckets and /end_weight_update after them."""
    updater = (sgl / "sglang/srt/managers/scheduler_components/weight_updater.py").read_text()
    if "begin_weight_update() and end_weight_update()" not in updater:
        return  # the pinned release no longer needs a session
    called = {u.route for u in uses if u.method == "POST"}
    assert {"/begin_weight_update", "/end_weight_update"} <= called


# ---------------------------------------------------------------------------------------------- the command line

_PARSER = r"""
import argparse, contextlib, importlib.abc, importlib.machinery, io, json, sys, types

root, argvs = sys.argv[1], json.loads(sys.argv[2])


class Stub(types.ModuleType):
    # A module sglang imports that is not importable here: any attribute is a stub value.
    __version__ = "0.0.0"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Value()


class Value:
    def __call__(self, *args, **kwargs):
        return Value()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Value()

    def __getitem__(self, key):
        return Value()

    def __mro_entries__(self, bases):
        return (object,)

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False


def imported_by_sglang():
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "sglang"


class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Last on sys.meta_path: only what no finder can import, and only for sglang's own imports.
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "sglang" or not imported_by_sglang():
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(Stubs())
sys.path.insert(0, root)
# These packages' __init__ start the runtime (kernels, patches); the argument definitions need none of it.
for name in ("sglang", "sglang.srt", "sglang.srt.utils"):
    package = Stub(name)
    package.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = package
from sglang.srt.server_args import ServerArgs

parser = argparse.ArgumentParser(prog="sglang serve")
ServerArgs.add_cli_args(parser)
results = []
for argv in argvs:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if "--config" in argv:  # as prepare_server_args does: the YAML file's keys merged into the argv
                from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

                argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
            results.append({"values": vars(parser.parse_args(argv))})
    except SystemExit:
        results.append({"error": err.getvalue()})
print(json.dumps(results, default=str))
"""


def sglang_parse(sgl: Path, argvs: list[list[str]]) -> list[dict[str, Any]]:
    """Each argv as SGLang's own `python -m sglang.launch_server` parser reads it: {"values": ...} or {"error": ...}."""
    out = subprocess.run(
        [sys.executable, "-c", _PARSER, str(sgl), json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"loading SGLang's ServerArgs failed:\n{out.stderr[-3000:]}"
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def _launch_configs() -> Iterator[tuple[str, Any]]:
    from common.config import load_config
    from rollout_server.launch import LaunchConfig

    for path in sorted((REPO / "configs").rglob("engine.toml")):
        cfg = load_config(LaunchConfig, path)
        if cfg.backend == "sglang":
            yield str(path.relative_to(REPO)), cfg
    every = LaunchConfig(
        backend="sglang", model_path="/models/qwen3", host="0.0.0.0", port=30001, tp_size=4, context_length=160000,
        weight_version="7", mem_fraction_static=0.5, allow_unauthenticated=True,
        extra_args=["--dtype", "bfloat16", "--admin-api-key", "KEY", "--pp-size", "2", "--dp-size", "2"],
    )  # fmt: skip
    yield "every option", every


def test_sglangs_own_parser_accepts_the_engine_command_line(sgl: Path) -> None:
    """Guards against `engine launch --backend sglang` building a command line SGLang refuses or reads otherwise
    (a renamed flag, a changed type): every recipe's and one with every option are parsed by SGLang's own
    ServerArgs.add_cli_args, and the values it reads are the config's. A misspelt flag is refused (the parser is
    real)."""
    from rollout_server.launch import engine_command

    configs = list(_launch_configs())
    assert len(configs) >= 2, "no SGLang recipe found under configs/"
    argvs = []
    for _, cfg in configs:
        cmd = engine_command(cfg, cfg.port)
        assert cmd[1:3] == ["-m", "sglang.launch_server"], cmd
        argvs.append(cmd[3:])
    results = sglang_parse(sgl, [*argvs, ["--model-path", "m", "--tp-sise", "2"]])
    assert "--tp-sise" in results[-1].get("error", ""), results[-1]
    for (name, cfg), result in zip(configs, results, strict=False):
        assert "values" in result, f"{name}: SGLang {SGLANG_VERSION} refuses the command line: {result['error']}"
        got = result["values"]
        expected = {
            "model_path": cfg.model_path, "host": cfg.host, "port": cfg.port, "tp_size": cfg.tp_size,
            "mem_fraction_static": cfg.mem_fraction_static,
        }  # fmt: skip
        if cfg.context_length:
            expected["context_length"] = cfg.context_length
        if cfg.weight_version != "default":
            expected["weight_version"] = cfg.weight_version
        assert {k: got.get(k) for k in expected} == expected, f"{name}: SGLang reads {got}"
    every = results[len(configs) - 1]["values"]
    assert (every["pp_size"], every["dp_size"], every["dtype"]) == (2, 2, "bfloat16")


def test_the_engine_token_reaches_sglang_through_a_private_config_file_not_argv(
    sgl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against the control token of `engine launch --backend sglang` on SGLang's command line (`ps` shows
    every process's argv to every user), and against a --config file SGLang would not read as --admin-api-key:
    the file is parsed by SGLang's own merger, is private (0600) and is gone when the launch ends."""
    import stat

    from rollout_server.launch import LaunchConfig, engine_command, sglang_secrets

    token = 'tok"en\\with: yaml-ish #chars'
    monkeypatch.setenv("LONGTRACE_ENGINE_API_KEY", token)
    cfg = LaunchConfig(backend="sglang", model_path="/models/qwen3", host="0.0.0.0", port=30001)
    assert cfg.has_token()
    with sglang_secrets(cfg) as path:
        cmd = engine_command(cfg, cfg.port, path)
        assert path and not any(token in a for a in cmd), cmd
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        [result] = sglang_parse(sgl, [cmd[3:]])
    assert not Path(path).exists()
    assert "values" in result, result
    assert result["values"]["admin_api_key"] == token and result["values"]["port"] == 30001
    # A token already given in extra_args is left alone (no second source SGLang would have to choose between).
    given = LaunchConfig(backend="sglang", model_path="/m", extra_args=["--admin-api-key", "k"])
    with sglang_secrets(given) as none:
        assert none == ""


# ---------------------------------------------------------------------------------------------- the pin


def test_the_pin_is_the_one_the_images_docs_and_wheel_name(sgl: Path) -> None:
    """Guards against the engine image, the docs or the learner's NCCL drifting from weights/sglang_release.py:
    every `sglang:vX` and `SGLang X.Y.Z` they name is the pin, the wheel is that release and requires the torch the
    pin records, and the learner image's NCCL is the engine image's."""
    metadata = next(sgl.glob("sglang-*.dist-info/METADATA")).read_text()
    assert f"\nVersion: {SGLANG_VERSION}\n" in metadata
    assert f"Requires-Dist: torch=={ENGINE_TORCH_VERSION}\n" in metadata, re.findall(
        r"Requires-Dist: torch\S*", metadata
    )
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    assert f"ARG SGLANG_IMAGE={ENGINE_IMAGE}\n" in dockerfile
    assert f"ARG NCCL_VERSION={ENGINE_NCCL_VERSION}\n" in dockerfile
    named = []
    for rel in ("deploy/docker/Dockerfile", "deploy/compose/docker-compose.yml", "deploy/compose/.env.example",
                "docs/deploy.md", "README.md"):  # fmt: skip
        text = (REPO / rel).read_text()
        named += [(rel, v) for v in re.findall(r"sglang:v(\d[\w.]*)", text)]
        named += [(rel, v) for v in re.findall(r"SGLang \*{0,2}(\d+\.\d+\.\d+)", text)]
    assert named and all(v == SGLANG_VERSION for _, v in named), [n for n in named if n[1] != SGLANG_VERSION]
    docs = (REPO / "docs/deploy.md").read_text()
    assert f"torch {ENGINE_TORCH_VERSION}" in docs and f"NCCL {ENGINE_NCCL_VERSION}" in docs


# ---------------------------------------------------------------------------------------------- the engine's ranks


@pytest.mark.parametrize(
    ("server_info", "ranks", "problem"),
    [
        ({"tp_size": 8, "pp_size": 1, "dp_size": 1, "attn_dp_size": 1}, 8, None),
        ({"tp_size": 4, "pp_size": 2, "dp_size": 1, "attn_dp_size": 1}, 8, "pp_size 2"),
        ({"tp_size": 2, "pp_size": 1, "dp_size": 2, "attn_dp_size": 1}, 4, "dp_size 2"),
        # 0.5.23: `--dp-size 8 --enable-dp-attention` resolves to attn_dp_size 8 inside the TP group, dp_size 1
        ({"tp_size": 8, "pp_size": 1, "dp_size": 1, "attn_dp_size": 8, "enable_dp_attention": True}, 8, None),
        ({"tp_size": 8, "dp_size": 2, "attn_dp_size": 4, "enable_dp_attention": True}, 16, "dp_size 2"),
        ({"tp_size": 8, "dp_size": 8, "enable_dp_attention": True}, 8, None),  # before 0.5.23: attention DP
        ({"tp_size": 1, "dp_size": 1, "pp_size": 1, "nccl_version": None}, 1, None),  # the built-in engine
        ({}, 1, None),
    ],
)
def test_an_engine_adds_every_gpu_to_the_weight_update_group(
    server_info: dict[str, Any], ranks: int, problem: str | None
) -> None:
    """Guards against counting only tp_size: an engine started with --pp-size or --dp-size has tp x pp x dp
    processes that join the group (a world size short of them never forms), while attention DP adds none; and
    against staying silent about the layouts SGLang itself cannot join."""
    assert engine_ranks(server_info) == ranks
    found = distributed_update_problem(server_info)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_builtin_engine_and_the_launcher_report_its_ranks() -> None:
    """Guards against the registry carrying the configured tp_size instead of what the engine runs: the launcher's
    heartbeat reads /server_info (falling back to /get_server_info on an older build), and the built-in engine's
    answer counts 1 rank."""
    from rollout_server.engine.config import EngineConfig
    from rollout_server.engine.info import server_info
    from rollout_server.launch import served_ranks

    async def load() -> dict[str, int]:
        return {"num_running_reqs": 0}

    stand_in = types.SimpleNamespace(
        config=EngineConfig(), weight_version="default", context_length=64, load=load,
        runner=types.SimpleNamespace(cache=types.SimpleNamespace(num_slots=2)),
        scheduler=types.SimpleNamespace(paused=False, num_steps=0, num_generated=0, max_decode_batch=1),
    )  # fmt: skip
    builtin = asyncio.run(server_info(stand_in))  # type: ignore[arg-type]
    assert engine_ranks(builtin) == 1 and "nccl_version" in builtin

    def old_sglang(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/server_info":
            return httpx.Response(404)
        return httpx.Response(200, json={"tp_size": 2, "pp_size": 2, "dp_size": 1})

    with httpx.Client(transport=httpx.MockTransport(old_sglang)) as http:
        assert served_ranks(http, "http://e:1") == 4


def test_static_engines_are_counted_by_their_layout() -> None:
    """Guards against the learner sizing the group from tp_size for an engine named in --weight_sync.engine_urls:
    its ranks come from /get_server_info, once, and are asked again after the engine failed."""
    from learner.weight_sync.config import DistributedSyncConfig
    from learner.weight_sync.fleet import Fleet

    layouts = {"http://a:1": {"tp_size": 2, "pp_size": 2}, "http://b:1": {"tp_size": 4}}
    asked: list[str] = []

    class Client:
        def server_info(self, url: str) -> dict[str, Any]:
            asked.append(url)
            return layouts[url]

    fleet = Fleet(DistributedSyncConfig(engine_urls=list(layouts), use_registry=False), Client(), None)  # type: ignore[arg-type]
    engines, errors = fleet.discover()
    assert not errors and [(e.url, e.ranks) for e in engines] == [("http://a:1", 4), ("http://b:1", 4)]
    fleet.discover()
    fleet.forget("http://a:1")
    fleet.discover()
    assert asked == ["http://a:1", "http://b:1", "http://a:1"]


# ---------------------------------------------------------------------------------------------- the GPU script


def test_the_sglang_gpu_smoke_script_parses_and_its_python_imports() -> None:
    """Guards against the GPU-only check (it cannot run here) being broken before anyone reaches a GPU: the script
    is valid bash, the Python modules it runs import on this machine with the names they use, its arguments parse,
    and the per-token version check it applies refuses malformed segments."""
    script = REPO / "deploy/gpu/sglang_smoke.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    modules = re.findall(r"-m ([\w.]+)", script.read_text())
    assert modules == ["experiments.gpu.sglang_smoke"]
    from experiments.gpu import sglang_smoke

    imports = [n for n in ast.walk(ast.parse(Path(sglang_smoke.__file__).read_text())) if isinstance(n, ast.ImportFrom)]
    for node in imports:  # the lazy imports too: each name must exist where it is imported from
        module = importlib.import_module(node.module or "")
        missing = [a.name for a in node.names if not hasattr(module, a.name)]
        if missing and not all(importlib.util.find_spec(f"{node.module}.{name}") for name in missing):
            pytest.fail(f"sglang_smoke.py imports {missing} from {node.module}, which has none")
    args = sglang_smoke.parse_args(["--model", "/m", "--engine-arg=--disable-cuda-graph"])
    assert (args.steps, args.engine_arg, args.learner_ranks, args.cpu) == (3, ["--disable-cuda-graph"], 1, False)
    ok = sglang_smoke.versions_well_formed
    assert ok([(0, 0), (40, 1)], 100, 3) and ok([(0, 2)], 10, 3)
    assert not ok([(5, 0)], 100, 3) and not ok([(0, 2), (40, 1)], 100, 3) and not ok([(0, 0), (100, 1)], 100, 3)


def test_a_failed_nccl_group_names_both_sides_nccl_releases() -> None:
    """Guards against an NCCL weight-update group failing with torch's bare error: SGLang reports no NCCL version
    and NCCL refuses members of different releases, so the error names this process's NCCL and the engine image's
    (here the CPU torch has no NCCL at all, which fails the build the same way)."""
    import torch

    from common.net import free_port
    from weights.group import init_custom_process_group, nccl_version

    if torch.cuda.is_available():
        pytest.skip("needs a torch without NCCL to fail the build deterministically")
    with pytest.raises(RuntimeError) as failed:
        init_custom_process_group("nccl", f"tcp://127.0.0.1:{free_port()}", 1, 0, "nccl-note", timeout_s=10)
    message = str(failed.value)
    assert nccl_version() is None and "NCCL here unknown" in message
    assert f"{ENGINE_IMAGE} NCCL {ENGINE_NCCL_VERSION}" in message
