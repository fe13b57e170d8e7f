"""The engine's sampler: the logprob convention, top-k/top-p/min-p filtering, per-request RNG, parameter validation."""

from __future__ import annotations

import pytest
import torch

from rollout_server.engine.sampling import SamplingParams, make_generator, sample


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def test_logprobs_are_temperature_scaled_and_unfiltered() -> None:
    """Guards against returning logprobs of the filtered (top-k/top-p) distribution, of the unscaled logits
    for T != 1, or of T = 0 for greedy rows: the learner recomputes log_softmax(logits / T) and must match."""
    logits = _logits()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=1),
        SamplingParams(temperature=1.3, top_p=0.5, min_p=0.1),
    ]
    gens = [make_generator(i, torch.device("cpu")) for i in range(3)]
    tokens, lps = sample(logits, params, gens)
    for i, (t, p) in enumerate(zip((1.0, 0.7, 1.3), params, strict=True)):
        expected = torch.log_softmax(logits[i] / t, dim=-1)[tokens[i]].item()
        assert lps[i] == pytest.approx(expected, abs=1e-6), p
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == int(logits[1].argmax())  # top_k=1 draws the argmax, its logprob is not 0
    assert lps[1] < -1e-3


def test_original_logprob_flag_skips_temperature() -> None:
    """Guards against the SGLANG_RETURN_ORIGINAL_LOGPROB equivalent silently still dividing by T."""
    logits = _logits(1)
    tokens, lps = sample(logits, [SamplingParams(temperature=0.5)], [make_generator(0, torch.device("cpu"))], True)
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0], -1)[tokens[0]].item(), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [({"top_k": 2}, 2), ({"top_p": 1e-4}, 1), ({"min_p": 1.0}, 1)],
)
def test_filters_restrict_the_support(kwargs: dict[str, float], allowed: int) -> None:
    """Guards against top-k/top-p/min-p not being applied to the draw (tokens outside the kept set)."""
    logits = _logits(1, vocab=20, seed=3)
    top = set(logits[0].argsort(descending=True)[:allowed].tolist())
    gen = make_generator(7, torch.device("cpu"))
    drawn = {sample(logits, [SamplingParams(temperature=1.0, **kwargs)], [gen])[0][0] for _ in range(200)}  # type: ignore[arg-type]
    assert drawn <= top
    assert len(drawn) == allowed


def test_seeded_rows_do_not_depend_on_batch_composition() -> None:
    """Guards against one shared RNG: a seeded request must draw the same tokens whatever its neighbours are."""
    logits = _logits(4, vocab=30, seed=5)
    p = SamplingParams(temperature=1.0, sampling_seed=11)

    def run(rows: list[int]) -> list[int]:
        gens = [make_generator(11 if r == 2 else r + 100, torch.device("cpu")) for r in rows]
        out = []
        for _ in range(20):
            tokens, _ = sample(logits[rows], [p] * len(rows), gens)
            out.append(tokens[rows.index(2)])
        return out

    assert run([2]) == run([0, 1, 2, 3]) == run([3, 2])


def test_sampling_params_validation_names_the_problem() -> None:
    """Guards against typos or unsupported knobs being silently ignored, and against SGLang's defaults drifting."""
    p = SamplingParams.from_dict({"stop": "END", "temperature": None}, vocab_size=100)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.skip_special_tokens, p.no_stop_trim) == (
        128,
        1.0,
        -1,
        True,
        False,
    )
    assert p.stop == ["END"]
    with pytest.raises(ValueError, match="unknown sampling_params: max_tokens"):
        SamplingParams.from_dict({"max_tokens": 3}, 100)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams.from_dict({"frequency_penalty": 0.5}, 100)
    assert SamplingParams.from_dict({"frequency_penalty": 0.0}, 100).top_p == 1.0
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams.from_dict({"top_p": 0}, 100)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams.from_dict({"top_k": 0}, 100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams.from_dict({"stop_token_ids": [100]}, 100)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_dict({"temperature": -1}, 100)
    with pytest.raises(ValueError, match="max_new_tokens must be int"):
        SamplingParams.from_dict({"max_new_tokens": "5"}, 100)
