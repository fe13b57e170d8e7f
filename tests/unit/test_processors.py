"""Message processors (METHOD.md §3): stop tokens, the reasoning/content split, ill-formed and unfinished samples."""

from __future__ import annotations

import pytest

from broker.schemas import Sample
from rollout_server.worker.processors import DEEPSEEK_R1, QWEN3, get_processor

DS_EOS = "<｜end▁of▁sentence｜>"


def test_qwen3_well_formed_response_splits_and_strips() -> None:
    """Guards against the split keeping the newline around </think> or the stop token in the content,
    which would change what the rubric reward scans."""
    p = QWEN3.parse("Let me think.\nStep 2.\n</think>\n\nThe answer is Paris.<|im_end|>", "stop")
    assert p.status == "completed"
    assert p.reasoning == "Let me think.\nStep 2."
    assert p.content == "The answer is Paris."
    assert p.stop_token == "<|im_end|>"
    assert not p.ill_formed and not p.task_unfinished


def test_only_one_newline_and_one_double_newline_are_stripped() -> None:
    """Guards against using str.strip(): only one trailing "\\n" of the reasoning and one leading "\\n\\n"
    of the content go, as in LongTraceRL's processors."""
    p = QWEN3.parse("r\n\n</think>\n\n\nc \n<|im_end|>", "stop")
    assert p.reasoning == "r\n"
    assert p.content == "\nc \n"


def test_split_uses_the_last_think_end_and_flags_two() -> None:
    """Guards against splitting on the first </think> (rsplit is the rule) and against accepting a response
    with two </think> as well-formed."""
    p = QWEN3.parse("a</think>b</think>\n\nc<|im_end|>", "stop")
    assert p.reasoning == "a</think>b"
    assert p.content == "c"
    assert p.ill_formed and not p.task_unfinished


@pytest.mark.parametrize("finish, status", [("length", "truncated"), ("abort", "aborted")])
def test_truncated_and_aborted_are_kept_raw_and_unfinished(finish: str, status: str) -> None:
    """Guards against validating a cut-off text: it is neither split nor ill-formed, only unfinished."""
    p = QWEN3.parse("half a thought </think>\n\nx", finish)  # type: ignore[arg-type]
    assert p.status == status
    assert (p.reasoning, p.content) == ("", "")
    assert p.task_unfinished and not p.ill_formed


def test_no_stop_token_means_unfinished_not_ill_formed() -> None:
    """Guards against treating a response that stopped without a stop token (e.g. on a stop string) as a
    finished turn: it scores 0 in training as task_unfinished."""
    p = QWEN3.parse("r\n</think>\n\nanswer", "stop")
    assert p.status == "completed"
    assert p.task_unfinished and not p.ill_formed
    assert p.stop_token is None


def test_qwen3_endoftext_stop_is_ill_formed() -> None:
    """Guards against accepting <|endoftext|> as a normal end of turn for Qwen3 (it marks a broken turn)."""
    p = QWEN3.parse("r\n</think>\n\nanswer<|endoftext|>", "stop")
    assert p.stop_token == "<|endoftext|>"
    assert p.ill_formed and not p.task_unfinished
    assert p.content == "answer"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("no think end at all<|im_end|>", "occurs 0 times"),
        ("\n</think>\n\nanswer<|im_end|>", "empty reasoning"),
        ("reasoning\n</think>\n\n<|im_end|>", "empty content"),
        ("r\n</think>\n\nans<|im_start|>user<|im_end|>", "content contains <|im_start|>"),
        ("r\n</think>\n\nans<|im_end|><|im_end|>", "content contains <|im_end|>"),
    ],
)
def test_qwen3_ill_formed_cases(text: str, reason: str) -> None:
    """Guards against each of METHOD.md's ill-formed rules being skipped (wrong </think> count, empty parts,
    special tokens left in the answer after one stop token is stripped)."""
    p = QWEN3.parse(text, "stop")
    assert p.ill_formed
    assert any(reason in r for r in p.ill_formed_reasons), p.ill_formed_reasons


def test_deepseek_r1_parses_its_own_stop_token_only() -> None:
    """Guards against the DeepSeek processor accepting Qwen3's <|im_end|> as a stop token or missing its EOS."""
    ok = DEEPSEEK_R1.parse(f"r\n</think>\n\nanswer{DS_EOS}", "stop")
    assert (ok.reasoning, ok.content, ok.ill_formed, ok.task_unfinished) == ("r", "answer", False, False)
    qwen_style = DEEPSEEK_R1.parse("r\n</think>\n\nanswer<|im_end|>", "stop")
    assert qwen_style.task_unfinished and qwen_style.stop_token is None


@pytest.mark.parametrize("token", ["<think>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", DS_EOS])
def test_deepseek_r1_content_special_tokens_are_ill_formed(token: str) -> None:
    """Guards against DeepSeek answers that leak chat-template tokens being scored as normal answers."""
    p = DEEPSEEK_R1.parse(f"r\n</think>\n\nans {token} more{DS_EOS}", "stop")
    assert p.ill_formed


def test_default_stop_ids_and_unknown_processor() -> None:
    """Guards against wrong default stop ids (METHOD.md: Qwen3 151643+151645, DeepSeek-R1-0528 151645) and a
    typo'd processor name passing silently."""
    assert set(get_processor("qwen3").default_stop_token_ids) == {151643, 151645}
    assert get_processor("deepseek_r1").default_stop_token_ids == (151645,)
    with pytest.raises(ValueError, match="--processor"):
        get_processor("llama")


@pytest.mark.parametrize(
    "text, finish",
    [
        ("Let me think.\nStep 2.\n</think>\n\nThe answer is Paris.<|im_end|>", "stop"),
        ("r\n\n</think>\n\n\nc \n<|im_end|>", "stop"),
        ("a</think>b</think>\n\nc<|im_end|>", "stop"),
        ("no think end at all<|im_end|>", "stop"),
        ("\n</think>\n\nanswer<|im_end|>", "stop"),
        ("reasoning\n</think>\n\n<|im_end|>", "stop"),
        ("r</think>answer<|endoftext|>", "stop"),
        ("r\n</think>\n\nanswer", "stop"),
        ("half a thought </think>\n\nx", "length"),
        ("half a thought </think>\n\nx", "abort"),
    ],
)
def test_the_split_rebuilds_reasoning_and_content_from_the_text(text: str, finish: str) -> None:
    """Guards against the wire's split (issue 19: the text travels once, reasoning and content as offsets into it)
    disagreeing with the processor's own reasoning and content, which the reward scans and eval reports."""
    p = QWEN3.parse(text, finish)  # type: ignore[arg-type]
    sample = Sample(response_ids=b"", logprobs=b"", text=text, finish_reason=finish, status=p.status, split=p.split)  # type: ignore[arg-type]
    assert (sample.reasoning, sample.content) == (p.reasoning, p.content)
    assert (p.split is None) == (p.status != "completed" or p.stop_token is None)
