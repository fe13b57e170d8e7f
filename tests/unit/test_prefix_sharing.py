"""Prefix sharing in the built-in engine: the prefix match (prefix_sharing.py) and the scheduler's K/V copy at
admission, driven step by step on the scheduler's own thread-free methods over a tiny model (no HTTP; the HTTP
paths are tests/integration/test_engine_prefix_sharing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from rollout_server.engine.model_runner import ModelRunner
from rollout_server.engine.prefix_sharing import DEFER, pick_source, shared_len
from rollout_server.engine.request_state import Req, Snapshot
from rollout_server.engine.sampling import SamplingParams, make_generator
from rollout_server.engine.scheduler import Scheduler
from rollout_server.models import init_tiny_model

PROMPT = [(7 * i) % 500 + 3 for i in range(40)]
OTHER = [(11 * i) % 500 + 5 for i in range(40)]


def _req(rid: str, ids: list[int], max_new: int = 6, **kw: Any) -> tuple[Req, list[Snapshot]]:
    out: list[Snapshot] = []
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    r = Req(rid, list(ids), params, max_new, make_generator(0, torch.device("cpu")), out.append, **kw)
    return r, out


def _held(ids: list[int], kv_len: int, outputs: Sequence[int] = (), epoch: int = 0, **kw: Any) -> Req:
    r, _ = _req("src", ids, **kw)
    r.output_ids, r.slot, r.kv_len, r.kv_epoch = list(outputs), 0, kv_len, epoch
    return r


def test_shared_len_is_the_common_prefix_within_the_sources_kv() -> None:
    """Guards against sharing past the first differing token, past the K/V the source holds, or not through the
    outputs of a resumed request (its prompt is the old prompt + tokens so far)."""
    r, _ = _req("r", PROMPT[:30] + [1, 2])
    assert shared_len(r, _held(PROMPT, 40), 40) == 30
    assert shared_len(r, _held(PROMPT, 40), 12) == 12
    assert shared_len(r, _held(OTHER, 40), 40) == 0
    resumed, _ = _req("r", PROMPT + [9, 8, 7])
    assert shared_len(resumed, _held(PROMPT, 42, outputs=[9, 8, 6]), 42) == 42
    assert shared_len(resumed, _held(PROMPT, 43, outputs=[9, 8, 6]), 43) == 42


def test_pick_source_leaves_the_last_token_and_respects_epoch_logprobs_and_routing() -> None:
    """Guards against a request copying its whole prompt (no logits to sample its first token from), sharing K/V
    made under other weights, skipping prompt positions whose logprobs were asked for, and a routed-experts request
    copying from a source that recorded no routing."""
    r, _ = _req("r", PROMPT)
    src = _held(PROMPT, 40)
    assert pick_source(r, [src], [], epoch=0) == (src, 39)
    assert pick_source(r, [src], [], epoch=1) == (None, 0)
    lp, _ = _req("r", PROMPT, return_logprob=True, logprob_start_len=0)
    assert pick_source(lp, [src], [], epoch=0) == (None, 0)
    routed, _ = _req("r", PROMPT, return_routed_experts=True)
    assert pick_source(routed, [src], [], epoch=0) == (None, 0)
    peer, _ = _req("p", PROMPT)
    assert pick_source(r, [], [peer], epoch=0) == DEFER  # same prompt admitted this step: copy from it next step
    short, _ = _req("s", PROMPT[:3] + OTHER)
    assert pick_source(short, [], [peer], epoch=0) == (None, 0)  # 3 shared tokens: not worth a step's wait


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    model = init_tiny_model(tmp_path_factory.mktemp("share") / "m", seed=3)
    return ModelRunner(str(model), num_slots=3, context_length=96)


def _scheduler(runner: ModelRunner, sharing: bool = True) -> Scheduler:
    runner.cache.reset()
    return Scheduler(runner, lambda ids, skip: "", set(), enable_prefix_sharing=sharing)


def _step(s: Scheduler) -> None:
    """One iteration of the scheduler loop's work (`Scheduler._run` without the thread)."""
    s._drain_inbox()
    if s.waiting and s.runner.cache.num_free > 0:
        s._prefill()
    else:
        s._decode()


def _until_done(s: Scheduler, *outs: list[Snapshot]) -> None:
    for _ in range(100):
        if all(o and o[-1].finish is not None for o in outs):
            return
        _step(s)
    raise AssertionError("requests did not finish")


def _alone(runner: ModelRunner, ids: list[int], max_new: int = 6) -> Snapshot:
    s = _scheduler(runner, sharing=False)
    r, out = _req("ref", ids, max_new)
    s.submit([r])
    _until_done(s, out)
    return out[-1]


def test_a_group_submitted_together_prefills_once_and_matches_unshared_outputs(runner: ModelRunner) -> None:
    """Guards against in-batch sharing that recomputes the prompt per sample, copies before the source's K/V exist
    (outputs would differ from a prefill of its own), or reports no cached tokens."""
    ref = _alone(runner, PROMPT)
    s = _scheduler(runner)
    reqs = [_req(f"g{i}", PROMPT) for i in range(3)]
    s.submit([r for r, _ in reqs])
    _until_done(s, *(o for _, o in reqs))
    assert s.num_prefill_tokens == len(PROMPT) + 2
    assert sorted(o[-1].cached_tokens for _, o in reqs) == [0, len(PROMPT) - 1, len(PROMPT) - 1]
    for _, o in reqs:
        assert o[-1].output_ids == ref.output_ids
        assert o[-1].output_logprobs == pytest.approx(ref.output_logprobs, abs=1e-5)


def test_unrelated_prompts_fill_every_free_slot_in_one_prefill(runner: ModelRunner) -> None:
    """Guards against admission giving out fewer slots than are free (slots taken during admission counted
    against the free ones): requests sharing nothing are prefilled together, as before prefix sharing."""
    s = _scheduler(runner)
    s.submit([_req(f"u{i}", [i + 1, *OTHER])[0] for i in range(3)])
    _step(s)
    assert len(s.running) == 3 and not s.waiting and s.num_steps == 1
    s.abort(None, "done")


def test_a_finished_sources_reused_slot_is_never_read(runner: ModelRunner) -> None:
    """Guards against sharing from K/V that no longer belong to the prompt: A (prompt P) finishes and frees its
    slot, B (another prompt) takes that slot and overwrites it, then C (prompt P) arrives: it must prefill itself
    (a lookup that remembered A's slot would copy B's K/V and generate something else)."""
    ref = _alone(runner, PROMPT)
    s = _scheduler(runner)
    a, a_out = _req("a", PROMPT, max_new=1)
    s.submit([a])
    _until_done(s, a_out)
    b, b_out = _req("b", OTHER, max_new=30)
    s.submit([b])
    _step(s)
    assert b.slot == 0 and not a_out[-1].cached_tokens  # B now holds A's old slot
    c, c_out = _req("c", PROMPT)
    s.submit([c])
    _until_done(s, c_out)
    assert c_out[-1].cached_tokens == 0
    assert c_out[-1].output_ids == ref.output_ids
    assert c_out[-1].output_logprobs == pytest.approx(ref.output_logprobs, abs=1e-5)
    s.abort(None, "done")


def test_a_source_that_finishes_in_its_prefill_is_not_copied_from(runner: ModelRunner) -> None:
    """Guards against the deferred copy reading a slot freed before it: samples of one prompt with one token each
    wait for the first to hold the prompt's K/V, but it finishes (and frees its slot) in that very step; each
    must then prefill the prompt itself and still give the unshared first token."""
    ref = _alone(runner, PROMPT, max_new=1)
    s = _scheduler(runner)
    reqs = [_req(f"g{i}", PROMPT, max_new=1) for i in range(3)]
    s.submit([r for r, _ in reqs])
    _until_done(s, *(o for _, o in reqs))
    assert [o[-1].cached_tokens for _, o in reqs] == [0, 0, 0]
    assert s.num_prefill_tokens == 3 * len(PROMPT)
    for _, o in reqs:
        assert o[-1].output_ids == ref.output_ids
        assert o[-1].output_logprobs == pytest.approx(ref.output_logprobs, abs=1e-5)


def test_an_aborted_source_is_not_shared_and_a_running_one_is(runner: ModelRunner) -> None:
    """Guards against a request admitted after its source was aborted copying the freed slot (the copy must happen
    at admission from a request that still holds its slot), and against sharing being skipped for a request that
    arrives while its source is decoding (only the prompt is shared, not the source's own output)."""
    ref = _alone(runner, PROMPT)
    s = _scheduler(runner)
    src, _ = _req("src", PROMPT, max_new=30)
    s.submit([src])
    _step(s)
    _step(s)
    late, late_out = _req("late", PROMPT)
    s.submit([late])
    _until_done(s, late_out)
    assert late_out[-1].cached_tokens == len(PROMPT) - 1
    assert late_out[-1].output_ids == ref.output_ids
    s.abort("src", "gone")
    s.submit([_req("filler", OTHER, max_new=30)[0]])  # takes the aborted source's slot and overwrites it
    _step(s)
    after, after_out = _req("after", PROMPT)
    s.submit([after])
    _until_done(s, after_out)
    assert after_out[-1].cached_tokens == 0
    assert after_out[-1].output_ids == ref.output_ids
    s.abort(None, "done")


def test_no_sharing_across_a_weight_load(runner: ModelRunner) -> None:
    """Guards against a request after a weight update copying K/V its source computed with the old weights (its
    prompt would be read under weights that no longer exist)."""
    s = _scheduler(runner)
    src, _ = _req("src", PROMPT, max_new=30)
    s.submit([src])
    _step(s)
    name = "model.norm.weight"
    runner.load_weights([(name, runner.parameter_names()[name].detach().clone())])
    late, late_out = _req("late", PROMPT)
    s.submit([late])
    _until_done(s, late_out)
    assert late_out[-1].cached_tokens == 0
    s.pause("in_place")
    s.resume()
    s.abort(None, "done")
