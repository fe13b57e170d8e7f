"""GPU smoke test of LongTrace's own CUDA paths, self-contained (no network, no model hub), under 8 minutes.

    bash experiments/gpu/smoke.sh                 # or: python -m experiments.gpu.smoke [--steps 3] [--learner-ranks 1]

It builds a tiny Qwen3 model and a word-level dataset locally, starts an embedded Redis, the built-in engine
on CUDA, a rollout worker and a reward worker (rule judge), then runs the megatron-core learner under
torchrun on CUDA with NCCL for a few GRPO steps, pushing its weights to the engine over NCCL after every
step. It prints ONE JSON line: the device, versions, per-step loss / reward / importance ratio / weight-sync
timings, and the checks that passed or failed (exit 0 only when all passed).

This module runs the processes and checks the outcome; experiments/gpu/smoke_inputs.py writes what they run on.

One GPU holds the learner and the engine. NCCL refuses two ranks of one communicator on the same GPU of the
same host ("Duplicate GPU detected"), so each process gets its own NCCL_HOSTID: NCCL then treats them as
different hosts and uses its socket transport over loopback, which is what weight sync between nodes does
(only slower than NVLink or InfiniBand). With --learner-ranks 2 the learner runs TP2 on the same GPU the
same way (each rank its own NCCL_HOSTID), which checks megatron's tensor-parallel collectives on NCCL.

Without CUDA it prints a JSON line with "status": "skipped" and the reason, and exits 3. `--cpu` runs the
same pipeline on CPU with gloo, which checks the script itself on a development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from experiments.gpu.smoke_inputs import RUN_ID, learner_toml, write_inputs

REPO = Path(__file__).resolve().parents[2]
SKIPPED = 3


class SmokeFailed(RuntimeError):
    """A step of the smoke test failed; the message says which and carries the relevant log tail."""


@dataclass
class Procs:
    """Child processes in their own sessions, stopped together (reverse start order) on exit."""

    log_dir: Path
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.children.append((name, proc))
        return proc

    def tail(self, name: str, num_lines: int = 25) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:]) if path.exists() else ""

    def check_alive(self, except_name: str = "") -> None:
        for name, proc in self.children:
            if name != except_name and proc.poll() is not None:
                raise SmokeFailed(f"{name} exited with code {proc.returncode}:\n{self.tail(name)}")

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether torch sees a CUDA device, and what to tell the user when not."""
    import torch

    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (install the CUDA wheel of the same version)"
    if shutil.which("nvidia-smi") is None:
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU and nvidia-smi is missing"
    return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (check CUDA_VISIBLE_DEVICES)"


def wait_for(what: str, predicate: Any, procs: Procs, deadline: float) -> None:
    while not predicate():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise SmokeFailed(f"timed out waiting for {what}")
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def run_smoke(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from broker.base import DEAD
    from broker.embedded import EmbeddedRedis
    from broker.factory import connect
    from broker.settings import BrokerConfig
    from common.net import free_port
    from learner.metrics import read_metrics

    t0 = time.monotonic()
    deadline = t0 + args.timeout_s
    device = "cpu" if args.cpu else "cuda"
    info: dict[str, Any] = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.cpu:
        info |= {"cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    model, data, stop_ids = write_inputs(work, args)
    logs = work / "logs"
    logs.mkdir()
    procs = Procs(logs)
    # Keep a PYTHONPATH the caller set (packages installed with --target on a machine without our venv).
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    base_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    base_env |= {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
    if args.cpu:
        base_env["CUDA_VISIBLE_DEVICES"] = ""
    py = [sys.executable, "-m", "deploy.cli"]
    with EmbeddedRedis() as redis_server:
        try:
            broker = ["--broker.redis_url", redis_server.url, "--broker.run_id", RUN_ID]
            port = free_port()
            engine_url = f"http://127.0.0.1:{port}"
            procs.start(
                "engine",
                [*py, "engine", "serve", "--model", str(model), "--port", str(port), "--device", device],
                base_env | {"NCCL_HOSTID": "smoke-engine"},
            )
            procs.start(
                "reward",
                # Reward = the share of rubric entities (the label) anywhere in the response: an untrained model
                # rarely closes its thinking, and the steps need groups whose rewards differ.
                [
                    *py,
                    "reward",
                    "worker",
                    *broker,
                    "--judge.kind",
                    "rule",
                    "--worker.zero_ill_formed",
                    "false",
                    "--eta",
                    "1.0",
                    "--combination",
                    "both",
                    "--rubric_use_reasoning_content",
                    "true",
                ],
                base_env,
            )
            procs.start(
                "rollout",
                [
                    *py,
                    "rollout",
                    "worker",
                    *broker,
                    "--engines.urls",
                    json.dumps([engine_url]),
                    "--engines.use_registry",
                    "false",
                    "--processor",
                    "qwen3",
                    "--sampling.stop_token_ids",
                    json.dumps(stop_ids),
                ],
                base_env,
            )
            wait_for("the engine's /health", lambda: healthy(engine_url), procs, deadline)
            t_ready = time.monotonic()
            config = learner_toml(work, model, data, redis_server.url, engine_url, args)
            learner_argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={args.learner_ranks}",
                "-m",
                "experiments.gpu.smoke",
                "--learner-rank-entry",
                "-m",
                "deploy.cli",
                "learner",
                "--config",
                str(config),
            ]
            learner = procs.start("learner", learner_argv, base_env | {"OMP_NUM_THREADS": "1"})
            dead = connect(BrokerConfig(redis_url=redis_server.url, run_id=RUN_ID)).view(DEAD)
            while learner.poll() is None:
                procs.check_alive(except_name="learner")
                if num_dead := dead.stats().length:
                    raise SmokeFailed(f"{num_dead} entries went to the dead stream:\n{procs.tail('rollout')}")
                if time.monotonic() > deadline:
                    raise SmokeFailed(f"learner did not finish {args.steps} steps in time:\n{procs.tail('learner')}")
                time.sleep(0.5)
            if learner.returncode != 0:
                raise SmokeFailed(f"learner exited with code {learner.returncode}:\n{procs.tail('learner', 40)}")
            t_trained = time.monotonic()
            engine_version = httpx.get(f"{engine_url}/get_model_info", timeout=10).json()["weight_version"]
            probe = httpx.post(
                f"{engine_url}/generate",
                json={"text": "documents alpha", "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
                timeout=30,
            )
        finally:
            procs.stop_all()
    metrics = read_metrics(work / "run")
    per_step = {
        key: [round(float(m.get(key, float("nan"))), 5) for m in metrics]
        for key in (
            "loss",
            "grad_norm",
            "reward_mean",
            "is_ratio_mean",
            "step_s",
            "weight_sync/total_s",
            "weight_sync/gb_per_s",
            "weight_sync/ok",
        )
    }
    checks = {
        "steps_trained": [m["step"] for m in metrics] == list(range(1, args.steps + 1)),
        "every_push_ok": all(v == 1.0 for v in per_step["weight_sync/ok"]) and len(metrics) == args.steps,
        "engine_has_final_weights": str(engine_version) == str(args.steps),
        "engine_generates_after_updates": probe.status_code == 200,
        "losses_finite": all(abs(v) < 1e6 for v in per_step["loss"]),
        # The engine's logprobs (tokens generated under pushed weights) match the learner's: a broken weight
        # push or a different logprob convention moves this far from 1.
        "is_ratio_near_1": all(abs(v - 1.0) < args.ratio_tolerance for v in per_step["is_ratio_mean"]),
    }
    return info | {
        "ok": all(checks.values()),
        "status": "passed" if all(checks.values()) else "failed",
        "learner_ranks": args.learner_ranks,
        "weight_sync_backend": "gloo" if args.cpu else "nccl",
        "steps": len(metrics),
        "engine_weight_version": engine_version,
        "per_step": {k.replace("weight_sync/", "sync_"): v for k, v in per_step.items()},
        "startup_s": round(t_ready - t0, 1),
        "train_s": round(t_trained - t_ready, 1),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "checks": checks,
    }


def learner_rank_entry(argv: list[str]) -> None:
    """Inside a torchrun rank: give this rank its own NCCL host id (ranks share one GPU), then run the CLI."""
    import runpy

    import torch

    os.environ["NCCL_HOSTID"] = f"smoke-learner-{os.environ.get('RANK', '0')}"
    # More ranks than GPUs: they share device 0 (the learner picks cuda:LOCAL_RANK).
    num_gpus = torch.cuda.device_count()
    if num_gpus:
        os.environ["LOCAL_RANK"] = str(int(os.environ.get("LOCAL_RANK", "0")) % num_gpus)
    assert argv[:2] == ["-m", "deploy.cli"], argv
    sys.argv = ["deploy.cli", *argv[2:]]
    runpy.run_module("deploy.cli", run_name="__main__", alter_sys=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="experiments/gpu/smoke.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="GRPO steps (each followed by a weight push)")
    p.add_argument("--learner-ranks", type=int, default=1, choices=(1, 2), help="learner ranks (2: TP2, one GPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="learner dtype on CUDA")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--ratio-tolerance", type=float, default=0.05, help="allowed |mean importance ratio - 1|")
    p.add_argument("--timeout-s", type=float, default=420.0, help="give up after this long (default 7 minutes)")
    p.add_argument("--work-dir", default=None, help="keep models, logs and metrics here (default: a temp dir)")
    p.add_argument("--cpu", action="store_true", help="development check of this script: CPU and gloo")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from common.cli import guarded

    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["--learner-rank-entry"]:
        learner_rank_entry(words[1:])
        return 0

    def smoke() -> int:
        args = parse_args(words)
        if not args.cpu:
            usable, reason = cuda_status()
            if not usable:
                print(f"smoke: skipped: no CUDA device: {reason}", file=sys.stderr)
                print(json.dumps({"ok": False, "status": "skipped", "reason": f"no CUDA device: {reason}"}), flush=True)
                return SKIPPED
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="longtrace-smoke-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            result = run_smoke(args, work)
        except (SmokeFailed, httpx.HTTPError) as e:
            result = {"ok": False, "status": "failed", "error": str(e), "work_dir": str(work)}
        else:
            if not args.work_dir and result["ok"]:
                shutil.rmtree(work, ignore_errors=True)
            else:
                result["work_dir"] = str(work)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1

    return guarded("smoke", smoke)


if __name__ == "__main__":
    sys.exit(main())
