"""The benchmark's judge: an OpenAI-compatible `POST /v1/chat/completions` that answers at once (or after
`--delay_s`), cheap enough that the servers under test, not the judge, use the machine.

A raw asyncio protocol (HTTP/1.1 keep-alive, Content-Length bodies), not a web framework: on a shared 2-core
machine every millisecond the judge spends is taken from the server under test. The verdict follows the judge
prompt (METHOD.md §2): `correct: yes` when the gold answer (`[correct_answer]: ...`) occurs in the `[response]`,
case-insensitively, as experiments/judge_stub.py answers; the body is a full chat.completion object (the openai
client parses it). With `--delay_s D --concurrency C`, at most C calls are served at once, each after D seconds.

    python -m reward_service.bench_judge --port P [--delay_s 0.5 --concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import msgspec

_GOLD = "[correct_answer]: "
_RESPONSE = "\n\n[response]: "
_END = "\n\nYour judgement must be in the format"
_MAX_HEAD = 64 * 1024


class _Message(msgspec.Struct):
    content: str


class _Request(msgspec.Struct):
    messages: list[_Message]


_REQUEST = msgspec.json.Decoder(_Request)


def verdict_body(body: bytes) -> tuple[int, bytes]:
    """HTTP status and JSON body answering one chat completion request body."""
    try:
        prompt = _REQUEST.decode(body).messages[0].content
    except (msgspec.DecodeError, IndexError):
        prompt = ""
    start = prompt.find(_GOLD)
    middle = prompt.find(_RESPONSE, start)
    end = prompt.rfind(_END)
    if start < 0 or middle < 0 or end < middle:
        return 400, b'{"error":{"message":"not a judge prompt (no [correct_answer]/[response])"}}'
    gold, response = prompt[start + len(_GOLD) : middle].strip(), prompt[middle + len(_RESPONSE) : end].strip()
    correct = bool(gold) and gold.lower() in response.lower()
    text = f"extracted_final_answer: {response[:80]}\nreasoning: stub\ncorrect: {'yes' if correct else 'no'}"
    return 200, msgspec.json.encode(
        {
            "id": "stub",
            "object": "chat.completion",
            "created": 0,
            "model": "judge-stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


class _Judge(asyncio.Protocol):
    def __init__(self, delay_s: float, slots: asyncio.Semaphore) -> None:
        self.delay_s = delay_s
        self.slots = slots
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._close()
                return
            length = 0
            for line in bytes(self.buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            status, payload = verdict_body(body)
            if self.delay_s > 0:
                asyncio.get_running_loop().create_task(self._later(status, payload))
            else:
                self._write(status, payload)

    async def _later(self, status: int, payload: bytes) -> None:
        async with self.slots:
            await asyncio.sleep(self.delay_s)
        self._write(status, payload)

    def _write(self, status: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = b"OK" if status == 200 else b"Bad Request"
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.transport.write(head % (status, reason, len(payload)) + payload)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int, delay_s: float, concurrency: int) -> None:
    """Serve until cancelled."""
    slots = asyncio.Semaphore(concurrency)
    server = await asyncio.get_running_loop().create_server(lambda: _Judge(delay_s, slots), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reward_service.bench_judge", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay_s", type=float, default=0.0, help="seconds each call waits before its verdict")
    parser.add_argument("--concurrency", type=int, default=64, help="calls served at once (with --delay_s)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(args.host, args.port, args.delay_s, args.concurrency))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
