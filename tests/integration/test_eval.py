"""`longtrace eval` end to end on a tiny locally built model: real built-in engines, the real reward API (rule
judge), the CLI as a subprocess (local services with --model; explicit URLs), `eval compare`, and the
launcher's held-out eval job on the same core.

The model is a hand-set "bigram" Qwen3 (attention and MLP outputs zeroed, so the next token depends only on the
current one): after `<think>` it says `alpha` (likelier) or `</think>`, after `alpha` `</think>` (likelier) or
`alpha` again, after `</think>` `paris` or `rome` (a tie), then `<|im_end|>`. So samples are random but their form says
exactly what the eval must make of them: well-formed iff finished and the reasoning is not empty (starts with
alpha), truncated iff it reached max_response_len, correct iff well-formed and the answer is the label.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.config import load_config
from common.net import free_port
from common.supervisor import HttpReady, ProcessSpec, Supervisor
from deploy.launcher.evaluate import EvalJobConfig, run
from eval.compare import compare, load
from eval.config import EvalConfig
from eval.run import EvalError, run_eval
from eval.table import format_compare

PY = sys.executable
WORDS = ["alpha", "paris", "rome", "what", "city", "is", "the", "answer", "of", "capital", "assistant", "user"]
LIKELY = math.log(3.0)  # a logit bonus that makes a successor 3 times as likely as its alternative
NEXT = {  # token -> its possible successors and their logit bonus
    "<think>": {"alpha": LIKELY, "</think>": 0.0},
    "alpha": {"</think>": LIKELY, "alpha": 0.0},
    "</think>": {"paris": 0.0, "rome": 0.0},
    "paris": {"<|im_end|>": 0.0},
    "rome": {"<|im_end|>": 0.0},
}
MAX_RESPONSE = 6
LONG_PROMPT = " ".join(["what is the capital of the city"] * 10)  # ~70 tokens: over run B's context
QUESTIONS = [  # (prompt, label, rubric, dataset_name)
    ("what city is the answer", "paris", "paris", "longqa"),
    ("what city is the answer", "rome", "rome", "longqa"),
    ("what is the answer", "delta", "alpha", "other"),  # never said: always wrong
    (LONG_PROMPT, "paris", "paris", "longqa"),
]


def build_bigram_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from rollout_server.models import init_tiny_model

    init_tiny_model(out, hidden_size=64, num_layers=1, word_vocab=WORDS, seed=0)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    config = Qwen3Config.from_pretrained(out)
    config.tie_word_embeddings = False
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        for i, (token, successors) in enumerate(NEXT.items()):
            model.model.embed_tokens.weight[vocab[token], i + 1] = 1.0
            for s, bonus in successors.items():  # logit 40 after the RMS norm: every other token is out of reach
                model.lm_head.weight[vocab[s], i + 1] = (40.0 + bonus) / config.hidden_size**0.5
    model.save_pretrained(out)
    return out


@dataclass
class World:
    model: Path
    data: Path
    engine_url: str
    reward_url: str
    supervisor: Supervisor
    tmp: Path

    def wait_ready(self) -> None:
        for child in self.supervisor.children:
            self.supervisor.wait_ready(child)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The model and data, and an engine + reward API (started here, waited for by the tests that use them)."""
    from datagen.dataset import make_row, write_rows

    tmp = tmp_path_factory.mktemp("eval")
    model = build_bigram_model(tmp / "model")
    rows = [make_row(p, label=lab, question=p[:40], rubrics=[r], dataset_name=d) for p, lab, r, d in QUESTIONS]
    write_rows(tmp / "data.jsonl", rows)
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with Supervisor(tmp / "logs") as sup:
        eport, rport = free_port(), free_port()
        serve = [PY, "-m", "deploy.cli", "engine", "serve", "--model", str(model), "--port", str(eport)]
        sup.start(
            ProcessSpec(
                "engine", [*serve, "--num_threads", "1"], env, HttpReady(f"http://127.0.0.1:{eport}/health"), 300
            ),
            wait_ready=False,
        )
        reward = [PY, "-m", "deploy.cli", "reward", "serve", "--port", str(rport)]
        sup.start(
            ProcessSpec("reward", reward, env, HttpReady(f"http://127.0.0.1:{rport}/health"), 300), wait_ready=False
        )
        yield World(model, tmp / "data.jsonl", f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{rport}", sup, tmp)


def _eval(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PY, "-m", "eval.cli", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_samples(samples: list[dict[str, Any]], k: int, too_long: Collection[str] = ()) -> None:
    assert [(s["id"], s["sample_index"]) for s in samples] == [
        (str(q), j) for q in range(len(QUESTIONS)) for j in range(k)
    ]
    for s in samples:
        _, label, rubric, dataset = QUESTIONS[int(s["id"])]
        assert (s["label"], s["dataset_name"]) == (label, dataset)
        if s["id"] in too_long:
            assert (s["error"], s["response"], s["outcome"], s["well_formed"]) == ("prompt_too_long", "", 0.0, False)
            continue
        text = s["response"]
        # As SGLang, the engine reports "length" when the budget's last token is the stop token: truncated.
        assert s["finished"] == (text.endswith("<|im_end|>") and s["response_tokens"] < MAX_RESPONSE), s
        assert (s["status"] == "truncated") == (not s["finished"]), s
        assert s["well_formed"] == (s["finished"] and text.startswith("alpha")), s
        if s["finished"]:
            assert s["answer"].split() == [text.split()[-2]], s  # the word between </think> and <|im_end|>
        assert s["outcome"] == float(s["well_formed"] and label in s["answer"].split()), s
        assert s["rubric"] == float(s["well_formed"] and rubric in s["answer"].split()), s
        assert s["reward"] == s["outcome"]  # η = 0
        assert s["weight_version"] == 0 and s["prompt_tokens"] > 0


def _check_summary(summary: dict[str, Any], samples: list[dict[str, Any]], k: int) -> None:
    """The summary recomputed from samples.jsonl the plain way."""
    n = len(QUESTIONS)
    per_q = [[s for s in samples if s["id"] == str(q)] for q in range(n)]
    assert (summary["num_questions"], summary["k"], summary["num_samples"]) == (n, k, n * k)
    assert summary["avg_at_k"] == pytest.approx(sum(s["outcome"] for s in samples) / (n * k))
    assert summary["pass_at_k"] == pytest.approx(sum(any(s["outcome"] for s in qs) for qs in per_q) / n)
    assert summary["well_formed_rate"] == pytest.approx(sum(s["well_formed"] for s in samples) / (n * k))
    assert summary["truncation_rate"] == pytest.approx(sum(s["status"] == "truncated" for s in samples) / (n * k))
    assert summary["rubric_hit_rate"] == pytest.approx(sum(s["rubric"] for s in samples) / (n * k))
    assert summary["mean_response_tokens"] == pytest.approx(sum(s["response_tokens"] for s in samples) / (n * k))
    other = [s for s in samples if s["dataset_name"] == "other"]
    assert summary["by_dataset"]["other"]["num_questions"] == 1
    assert summary["by_dataset"]["other"]["well_formed_rate"] == pytest.approx(sum(s["well_formed"] for s in other) / k)
    assert summary["judge"] == "rule" and summary["eta"] == 0.0


@pytest.fixture(scope="module")
def run_a(world: World) -> Path:
    """`longtrace eval --model DIR`: a local engine and reward API started and stopped by the command."""
    out = world.tmp / "run-a"
    result = _eval(
        "--model", str(world.model), "--dataset_path", str(world.data), "--out_dir", str(out), "--k", "4",
        "--max_response_len", str(MAX_RESPONSE), "--local.num_threads", "1",
    )  # fmt: skip
    assert "avg@4" in result.stdout and f"summary: {out / 'summary.json'}" in result.stdout
    return out


@pytest.mark.slow
def test_eval_with_local_services(world: World, run_a: Path) -> None:
    """Guards against the whole eval: k lines per question in order, a parse or judgment that disagrees with
    the response (ill-formed / truncated answers must count wrong), η ≠ 0 leaking into the reward, summary
    numbers that do not follow from samples.jsonl, and local services left running after the command."""
    samples = _lines(run_a / "samples.jsonl")
    summary = json.loads((run_a / "summary.json").read_text())
    _check_samples(samples, k=4)
    _check_summary(summary, samples, k=4)
    assert summary["max_context_len"] == 4095  # capped by the local engine's default context
    assert summary["stop_token_ids"] == [2, 0]  # <|im_end|>, <|endoftext|> as the tiny tokenizer spells them
    assert {s["well_formed"] for s in samples} == {True, False}  # the checks above saw both kinds
    assert not (run_a / "samples.jsonl.partial").exists()
    assert {p.name for p in (run_a / "logs").iterdir()} == {"eval-engine.log", "eval-reward.log"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{summary['engines'][0]['url']}/health", timeout=5)


@pytest.mark.slow
def test_eval_with_urls_then_compare(world: World, run_a: Path) -> None:
    """Guards against the URL path (no local services), a prompt over the context not counting wrong, a seed
    that does not reproduce, and compare flips or deltas that disagree with the two runs' samples."""
    world.wait_ready()
    out_b = world.tmp / "run-b"
    args = (
        "--engine_urls", json.dumps([world.engine_url]), "--reward_url", world.reward_url, "--tokenizer_path",
        str(world.model), "--dataset_path", str(world.data), "--k", "2", "--seed", "1", "--temperature", "1.0",
        "--max_response_len", str(MAX_RESPONSE), "--max_context_len", "40",
    )  # fmt: skip
    _eval(*args, "--out_dir", str(out_b), "--json")
    samples_b = _lines(out_b / "samples.jsonl")
    _check_samples(samples_b, k=2, too_long={"3"})
    _check_summary(json.loads((out_b / "summary.json").read_text()), samples_b, k=2)
    assert json.loads((out_b / "summary.json").read_text())["num_prompts_too_long"] == 1
    # The same settings again, on the core in-process: the seeds reproduce every answer.
    again = run_eval(load_config(EvalConfig, overrides=list(args)), [world.engine_url], world.reward_url)
    assert [s.response for s in again.samples] == [s["response"] for s in samples_b]

    result = json.loads(_eval("compare", str(run_a), str(out_b / "summary.json"), "--json").stdout)
    acc = {
        name: {q: sum(s["outcome"] for s in ss if s["id"] == q) / sum(s["id"] == q for s in ss) for q in "0123"}
        for name, ss in (("a", _lines(run_a / "samples.jsonl")), ("b", samples_b))
    }
    assert [f["id"] for f in result["flips"]["right_in_a_wrong_in_b"]] == [
        q for q in "0123" if acc["a"][q] >= 0.5 > acc["b"][q]
    ]
    assert [f["id"] for f in result["flips"]["wrong_in_a_right_in_b"]] == [
        q for q in "0123" if acc["b"][q] >= 0.5 > acc["a"][q]
    ]
    assert result["flips"]["right_in_a_wrong_in_b"] or result["flips"]["wrong_in_a_right_in_b"]  # seeded: some
    rows = {r["metric"]: r for r in result["metrics"]}
    assert rows["avg_at_k"]["delta"] == pytest.approx(rows["avg_at_k"]["b"] - rows["avg_at_k"]["a"])
    assert {"k", "temperature", "seed", "max_context_len"} <= set(result["settings_differ"])
    text = format_compare(compare(load(run_a), load(out_b)))
    assert "avg@k" in text and "right in A and wrong in B" in text


@pytest.mark.slow
def test_launcher_eval_job_keeps_its_result_line(world: World) -> None:
    """Guards against the launcher's held-out eval (deploy/launcher/evaluate.py, read by deploy/report.py)
    changing its appended line, overwriting earlier lines, or evaluating engines on stale weights."""
    world.wait_ready()
    out = world.tmp / "launcher" / "eval.jsonl"
    out.parent.mkdir()
    out.write_text('{"earlier": 1}\n')
    cfg = EvalJobConfig(
        engine_urls=[world.engine_url], reward_url=world.reward_url, dataset_path=str(world.data),
        tokenizer_path=str(world.model), out_path=str(out), phase="rl", when="after", step=3, expect_version=0,
        max_new_tokens=MAX_RESPONSE, temperature=0.0, num_examples=2,
    )  # fmt: skip
    result = run(cfg)
    lines = _lines(out)
    assert lines[0] == {"earlier": 1} and lines[1] == result
    assert set(result) == {
        "phase", "when", "step", "time_s", "num_questions", "accuracy", "rubric_hit_rate", "well_formed_rate",
        "response_len_mean", "temperature", "weight_versions", "policy_version_min", "policy_version_max", "eval_s",
        "examples",
    }  # fmt: skip
    assert (result["phase"], result["when"], result["step"], result["num_questions"]) == ("rl", "after", 3, 4)
    assert result["weight_versions"] == [0]  # "default": the start-up weights, policy version 0 (weights/version.py)
    assert (result["policy_version_min"], result["policy_version_max"]) == (0, 0)  # the versions of the samples' tokens
    # Greedy: every answer is "alpha </think> paris" (the paris / rome tie goes to the lower id): right for
    # questions 0 and 3, whose label and rubric are paris.
    assert (result["accuracy"], result["rubric_hit_rate"], result["well_formed_rate"]) == (0.5, 0.5, 1.0)
    assert result["response_len_mean"] == 4
    assert [e["response"] for e in result["examples"]] == ["alpha </think> paris <|im_end|>"] * 2
    assert [e["accuracy"] for e in result["examples"]] == [1.0, 0.0]
    with pytest.raises(EvalError, match="expected 5"):
        run(cfg.model_copy(update={"expect_version": 5}))
    assert len(_lines(out)) == 2
