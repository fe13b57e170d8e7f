"""Checkpoints a user can take anywhere: saved under TP2 x PP2, exported to HF on one process, listed, and used to
start a new run (weights only, or weights and optimizer state) under another layout.

Three launches. A source run trains 3 SFT steps on 4 torchrun gloo ranks (TP2 x PP2) and saves every step through
the real Checkpointer (keep_last 1, keep_every_steps 2: steps 2 and 3 stay); it records its merged HF weights and
its full logits on a probe sequence after step 3, then trains a 4th step without saving (what continuing with the
optimizer state reaches). `longtrace export-hf --checkpoint` then runs as one plain process (no torchrun), and one
process (TP1) starts new runs from step 3 through the trainer's build_training, then resumes one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dist import REPO_ROOT, run_torchrun
from tests.helpers.layout_runs import merged_weights, tiny_hf_model

PROBE = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 33]
SOURCE_RUN_ID = "source-run"
STEP3 = "step_00000003"


def _config(hf: str, run_dir: Path, run_id: str, tp: int = 1, pp: int = 1, **checkpoint: Any) -> Any:
    from learner.train_config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"hf_path": hf, "tp_size": tp, "pp_size": pp, "dist_timeout_s": 120},
            "loss": {"mode": "sft"},
            # adam_eps well above float noise: near-zero gradients must not flip an update between layouts
            "optim": {"lr": 1e-2, "clip_grad": 100.0, "adam_eps": 1e-4},
            # chunked: the last stage returns logits (the probe reads them), not the fused head's hidden states
            "batch": {"max_tokens_per_micro_batch": 64, "logprob_impl": "chunked"},
            "broker": {"redis_url": "memory://checkpoint-export", "run_id": run_id},
            "run_dir": str(run_dir),
            "checkpoint": {"interval_steps": 1, **checkpoint},
        }
    )


def _batch(vocab: int) -> Any:
    import numpy as np

    from learner.batching import TrainBatch, TrainSample

    rng = np.random.default_rng(11)
    samples = []
    for i in range(4):
        tokens = rng.integers(0, vocab, size=6 + 3 * i).astype(np.int32)
        samples.append(TrainSample(tokens, 3, np.zeros(len(tokens) - 3, dtype=np.float32), 0.0))
    return TrainBatch(samples, [f"g{i}" for i in range(4)], {})


def _save_weights(model: Any, arch: Any, out: Path, name: str) -> None:
    """Every stage leader writes its stage's HF tensors (merged_weights puts them together)."""
    import torch
    import torch.distributed as dist

    from learner.model.export import iter_hf_weights

    weights = {k: v.clone() for k, v in iter_hf_weights(model, arch)}
    if weights:
        torch.save(weights, out / f"{name}-rank{dist.get_rank()}.pt")


def _probe_logits(learner: Any, model: Any, vocab: int) -> Any:
    """The learner's full logits on PROBE through megatron's pipeline schedule (TP shards gathered), on the last
    stage's TP rank 0; None elsewhere."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from learner.batching import Layout, TrainSample, build_micro_batch

    sample = TrainSample(np.array(PROBE, dtype=np.int32), 1, np.zeros(len(PROBE) - 1, dtype=np.float32), 0.0)
    mb = build_micro_batch([sample], [0], Layout(pad_multiple=1))

    def capture(model: Any, mb: Any, output: Any) -> tuple[Any, Any, dict[str, Any]]:
        return torch.zeros(()), torch.ones((), dtype=torch.int), {"logits": output.detach()}

    with torch.no_grad():
        store = learner._run(model, [mb], capture, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    local = store[0]["logits"]  # [1, S, padded vocab / tp]
    shards = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return torch.cat(shards, dim=-1)[0, :, :vocab]


def _source_worker(tmp: str, hf: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from learner.checkpoint import Checkpointer
    from learner.checkpoint_catalog import run_record
    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.state import LearnerState
    from learner.train_step import Learner, build_model_and_optimizer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out = Path(tmp)
    cfg = _config(hf, out / "source", SOURCE_RUN_ID, tp=2, pp=2, keep_last=1, keep_every_steps=2)
    layout = init_parallel(cfg.model)
    arch = load_hf_arch(hf)
    model, optimizer = build_model_and_optimizer(cfg, arch, load_weights=True)
    learner = Learner(cfg, arch, layout, model, optimizer)
    state = LearnerState()
    record = run_record(cfg, init=None, resume=None)
    checkpointer = Checkpointer(cfg.checkpoint, cfg.checkpoint_dir, 10, model, optimizer, state, lambda: None, record)
    batch = _batch(arch.vocab_size)
    for step in (1, 2, 3):
        learner.train_step(batch)
        state.step = state.policy_version = step
        assert checkpointer.maybe_save(step)
    _save_weights(model, arch, out, "step3")
    logits = _probe_logits(learner, model, arch.vocab_size)
    if logits is not None:
        torch.save(logits, out / "step3-logits.pt")
    learner.train_step(batch)  # step 4, not saved
    _save_weights(model, arch, out, "step4")
    destroy_parallel()


def _init_worker(tmp: str, hf: str, source: str) -> None:
    """New runs from the source's step 3 on one rank (TP1), through the trainer's own start-up."""
    import datetime

    import torch.distributed as dist

    from learner.model.hf_config import load_hf_arch
    from learner.parallel import destroy_parallel, init_parallel
    from learner.trainer import build_training

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out = Path(tmp)
    arch = load_hf_arch(hf)
    steps: dict[str, int] = {}

    def start(name: str, cfg: Any) -> Any:
        t = build_training(cfg, init_parallel(cfg.model))
        steps[name] = t.state.step
        _save_weights(t.learner.model, arch, out, name)
        return t

    for mode, with_optimizer in (("weights", False), ("optimizer", True)):
        cfg = _config(hf, out / f"new-{mode}", f"new-{mode}", init_from=source, init_optimizer=with_optimizer)
        t = start(f"init-{mode}", cfg)
        t.learner.train_step(_batch(arch.vocab_size))
        _save_weights(t.learner.model, arch, out, f"after-{mode}")
        t.state.step = t.state.policy_version = 1
        t.checkpointer.save(1)
        t.close()
        destroy_parallel(keep_process_group=True)
    # The new run restarts: its own checkpoint wins over init_from.
    start("resumed", cfg).close()
    destroy_parallel()
    (out / "init-steps.json").write_text(json.dumps(steps))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("checkpoint_export")
    hf = str(tiny_hf_model(tmp))
    run_torchrun(4, f"{__name__}:_source_worker", {"tmp": str(tmp), "hf": hf}, timeout_s=400)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    source = tmp / "source" / "checkpoints" / STEP3
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "export-hf", "--checkpoint", str(source), "--out", str(tmp / "export")],
        cwd=REPO_ROOT,
        env=env | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_torchrun(1, f"{__name__}:_init_worker", {"tmp": str(tmp), "hf": hf, "source": str(source)}, timeout_s=400)
    return tmp


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_export_of_a_tp2_pp2_checkpoint_on_one_process_matches_the_learner(runs: Path) -> None:
    """Guards against an export that reads the wrong weights (the base model's, a missing or duplicated TP shard or
    pipeline stage, vocabulary padding rows from the TP2 layout) or that cannot run outside the saved layout: a
    TP2 x PP2 checkpoint exported by one plain process must hold exactly the trained weights (not the initial ones)
    and transformers' logits must match the learner's at 1e-4."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = runs / "export"
    exported = {k: v for f in export.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    trained = merged_weights(runs, "step3")
    initial = load_file(str(runs / "hf" / "model.safetensors"))
    assert _max_diff(exported, trained) == 0.0
    assert _max_diff(exported, initial) > 1e-3  # training moved the weights: the check above can fail
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(export)("hello").input_ids  # the tokenizer travelled with the checkpoint

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        hf_logits = model(torch.tensor([PROBE[:-1]])).logits[0]  # the learner reads tokens[:-1]
    learner_logits = torch.load(runs / "step3-logits.pt")
    diff = float((hf_logits - learner_logits).abs().max())
    print(f"max abs logit diff, transformers vs the TP2 x PP2 learner: {diff:.3e}")
    assert diff < 1e-4
    assert float((learner_logits - learner_logits.mean()).abs().max()) > 0.1  # logits that say something


def test_keep_every_keeps_versions_and_list_shows_them(runs: Path) -> None:
    """Guards retention and the listing: with keep_last 1 and keep_every_steps 2, saves at steps 1-3 leave step 2
    (a kept version) and step 3 (latest), with their policy versions; `checkpoints list` finds them from the run
    directory and its JSON says which is latest and which kept."""
    root = runs / "source" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", STEP3]
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "checkpoints", "list", str(runs / "source"), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed = json.loads(proc.stdout)["checkpoints"]
    assert [(c["step"], c["policy_version"], c["latest"], c["kept"]) for c in listed] == [
        (2, 2, False, True),
        (3, 3, True, False),
    ]
    assert all(c["size_bytes"] > 100_000 and c["complete"] for c in listed)
    record = json.loads((root / STEP3 / "checkpoint.json").read_text())
    assert record["run_id"] == SOURCE_RUN_ID and record["world_size"] == 4
    assert record["model"]["tp_size"] == 2 and record["model"]["pp_size"] == 2


def test_init_from_with_and_without_optimizer_state(runs: Path) -> None:
    """Guards --checkpoint.init_from: a new run (its own run id, TP1) starts at step 0 with the source's step-3
    weights; with init_optimizer its first step is the one the source run took next (the Adam moments came along,
    resharded from TP2 x PP2), without it that step is a fresh Adam's, far from it. Also guards a restart of the
    new run preferring its own checkpoint over init_from, and the source checkpoint directory being left alone."""
    step3, step4 = merged_weights(runs, "step3"), merged_weights(runs, "step4")
    steps = json.loads((runs / "init-steps.json").read_text())
    assert steps == {"init-weights": 0, "init-optimizer": 0, "resumed": 1}
    for mode in ("weights", "optimizer"):
        assert _max_diff(merged_weights(runs, f"init-{mode}"), step3) == 0.0, mode
    tolerance = 1e-5
    with_optimizer = _max_diff(merged_weights(runs, "after-optimizer"), step4)
    weights_only = _max_diff(merged_weights(runs, "after-weights"), step4)
    assert with_optimizer < tolerance, with_optimizer
    assert weights_only > 100 * tolerance, weights_only
    # The restart resumed its own step 1: the weights after its first step, not the source's step 3.
    assert _max_diff(merged_weights(runs, "resumed"), merged_weights(runs, "after-optimizer")) == 0.0
    record = json.loads((runs / "new-optimizer" / "checkpoints" / "step_00000001" / "checkpoint.json").read_text())
    assert record["run_id"] == "new-optimizer"
    assert Path(record["init_from"]) == (runs / "source" / "checkpoints" / STEP3).resolve()
    source = runs / "source" / "checkpoints"
    assert sorted(p.name for p in source.iterdir()) == ["latest", "step_00000002", STEP3]
    assert (source / "latest").read_text().strip() == STEP3
