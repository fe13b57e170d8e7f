"""Run code under a real `torchrun` (gloo on CPU, NCCL on GPU) from a test, with a timeout.

`run_torchrun(nproc, "tests.integration.test_x:_worker", kwargs)` launches
`python -m torch.distributed.run --standalone --nproc_per_node N -m tests.helpers.dist TARGET JSON`;
each rank imports TARGET and calls it with the JSON kwargs. A failing or hanging rank fails the test
with every rank's output (torchrun prefixes each line with the rank). Keep launches few: each one
pays the torch/megatron/transformers imports (about 6 s).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_torchrun(nproc: int, target: str, kwargs: dict[str, Any] | None = None, timeout_s: float = 120) -> str:
    """Run `module:function(**kwargs)` on `nproc` torchrun ranks; return the combined output.

    Raises AssertionError with all ranks' output if any rank fails or the run exceeds `timeout_s`.
    """
    return run_torchrun_argv(nproc, ["-m", "tests.helpers.dist", target, json.dumps(kwargs or {})], timeout_s)


def run_torchrun_argv(nproc: int, argv: list[str], timeout_s: float = 120) -> str:
    """`torchrun --standalone --nproc_per_node nproc ARGV...` (a script or `-m module` and its arguments)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--tee=3",  # every rank's stdout/stderr, prefixed with its rank
        *argv,
    ]
    target = " ".join(argv[:3])
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun picks anyway, minus its warning; ranks share the cores
    env.setdefault("PYTHONWARNINGS", "ignore")  # megatron warns about apex/TE at import, once per rank
    # Own process group, so a timeout kills the ranks too, not only the torchrun launcher.
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun {target} timed out after {timeout_s}s:\n{output}") from None
    assert proc.returncode == 0, f"torchrun {target} failed (exit {proc.returncode}):\n{output}"
    return output


def init_worker_process_group(timeout_s: float = 60) -> Any:
    """Inside a torchrun rank: join the world (NCCL on this rank's GPU, gloo on CPU); return the rank's device."""
    import datetime

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _main() -> None:
    target, raw_kwargs = sys.argv[1], sys.argv[2]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(**json.loads(raw_kwargs))


if __name__ == "__main__":
    _main()
