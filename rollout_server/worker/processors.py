"""Message processors: parse a raw response of a thinking model into reasoning, content and a rollout status.

They follow LongTraceRL's processors (METHOD.md §3, "Message processors") for single-turn, tool-free answers
whose prompt ends inside the thinking block (`...assistant\\n<think>\\n`), so a well-formed response reads
`{reasoning}\\n</think>\\n\\n{content}{stop token}`. The engine must keep the stop token in the text
(`no_stop_trim=True`, `skip_special_tokens=False`).

- A truncated (finish reason "length") or aborted response is kept raw: not ill-formed, turn unfinished.
- Otherwise the trailing stop token is stripped; with none the turn counts as unfinished (scored 0 in training).
- Ill-formed when: the stop token is one that marks a broken turn (Qwen3's `<|endoftext|>`); `</think>`
  does not occur exactly once; the reasoning or the content is empty; the content holds a special token.
- `reasoning, content = response.rsplit("</think>", 1)`; one trailing "\\n" is removed from the reasoning and a
  leading "\\n\\n" from the content. The split is kept as offsets into the text (`TextSplit`): the wire carries
  the text once, and `Sample.reasoning` / `Sample.content` rebuild the parts from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from broker.schemas import FinishReason, Status, TextSplit

THINK_START = "<think>"
THINK_END = "</think>"

ProcessorName = Literal["qwen3", "deepseek_r1"]


@dataclass(frozen=True)
class ParsedResponse:
    """What a processor makes of one response text."""

    status: Status
    reasoning: str = ""
    content: str = ""
    split: TextSplit | None = None  # where `reasoning` and `content` are in the text; None when not split
    stop_token: str | None = None  # the stop token found at the end of the text, if any
    ill_formed: bool = False
    task_unfinished: bool = True  # not a finished turn: truncated, aborted or no stop token
    ill_formed_reasons: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class MessageProcessor:
    """The format of one model family: its stop tokens and the special tokens a final answer must not contain."""

    name: ProcessorName
    stop_tokens: tuple[str, ...]
    """Tokens that end a turn, tried in this order against the end of the text."""
    bad_stop_tokens: frozenset[str]
    """Stop tokens that end the turn abnormally (the sample is ill-formed)."""
    content_special_tokens: tuple[str, ...]
    """Tokens that make a final answer ill-formed when they appear in it."""
    default_stop_token_ids: tuple[int, ...]
    """Stop token ids sent to the engine when neither the task nor the config names any."""

    def parse(self, text: str, finish_reason: FinishReason) -> ParsedResponse:
        if finish_reason == "length":
            return ParsedResponse(status="truncated")
        if finish_reason == "abort":
            return ParsedResponse(status="aborted")

        stop_token = next((t for t in self.stop_tokens if text.endswith(t)), None)
        if stop_token is None:
            return ParsedResponse(status="completed")
        response = text[: -len(stop_token)]

        reasons: list[str] = []
        if stop_token in self.bad_stop_tokens:
            reasons.append(f"ended with {stop_token}")
        if response.count(THINK_END) != 1:
            reasons.append(f"{THINK_END} occurs {response.count(THINK_END)} times")
        split = _split(response)
        reasoning = text[: split.reasoning_end]
        content = text[split.content_start : split.content_end]
        if not reasoning:
            reasons.append("empty reasoning")
        if not content:
            reasons.append("empty content")
        reasons += [f"content contains {t}" for t in self.content_special_tokens if t in content]
        return ParsedResponse(
            status="completed",
            reasoning=reasoning,
            content=content,
            split=split,
            stop_token=stop_token,
            ill_formed=bool(reasons),
            task_unfinished=False,
            ill_formed_reasons=tuple(reasons),
        )


def _split(response: str) -> TextSplit:
    """`reasoning, content = response.rsplit("</think>", 1)` less one trailing "\\n" and one leading "\\n\\n", as
    offsets; without </think> all of it is reasoning."""
    end = response.rfind(THINK_END)
    if end < 0:
        return TextSplit(len(response), len(response), len(response))
    start = end + len(THINK_END)
    reasoning_end = end - 1 if end > 0 and response[end - 1] == "\n" else end
    content_start = start + 2 if response.startswith("\n\n", start) else start
    return TextSplit(reasoning_end, content_start, len(response))


_IM_START, _IM_END, _ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_DS_BOS, _DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_DS_USER, _DS_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

QWEN3 = MessageProcessor(
    name="qwen3",
    stop_tokens=(_IM_END, _ENDOFTEXT),
    bad_stop_tokens=frozenset({_ENDOFTEXT}),
    content_special_tokens=(_IM_START, _IM_END, _ENDOFTEXT),
    default_stop_token_ids=(151643, 151645),  # <|endoftext|>, <|im_end|>
)

# DeepSeek-R1-0528-Qwen3-8B: EOS <｜end▁of▁sentence｜> is id 151645 in its tokenizer (the distill models' 151643).
DEEPSEEK_R1 = MessageProcessor(
    name="deepseek_r1",
    stop_tokens=(_DS_EOS,),
    bad_stop_tokens=frozenset(),
    content_special_tokens=(_DS_BOS, _DS_EOS, _DS_USER, _DS_ASSISTANT, THINK_START, THINK_END),
    default_stop_token_ids=(151645,),
)

PROCESSORS: dict[str, MessageProcessor] = {p.name: p for p in (QWEN3, DEEPSEEK_R1)}


def get_processor(name: str) -> MessageProcessor:
    if name not in PROCESSORS:
        raise ValueError(f"--processor: unknown message processor {name!r}; choose one of {sorted(PROCESSORS)}")
    return PROCESSORS[name]
