"""The benchmark's baseline: a reward server written the way simple research servers are (the reference's style).

Same formulas and same rule judge as the service, but: the body is parsed with stdlib json from the raw
request, the scanned text is re-normalised once per rubric, and every request prints its result (stdout
goes to /dev/null in the benchmark). Same uvicorn settings as `longtrace reward serve`.
Run: `python -m reward_service.bench_baseline --port P`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from reward_service.config import RuleJudgeConfig
from reward_service.judges.rule import rule_match

app = FastAPI()
_RULE = RuleJudgeConfig()


def normalize_string(text: str) -> str:
    text = text.lower().strip()
    words = re.findall(r"[a-zA-Z0-9_]+|[\u4e00-\u9fff]", text)
    return " ".join(words)


def outcome_reward(response: str, answer: str) -> float:
    if "</think>" in response:
        response = response.split("</think>")[-1].strip()
    if not response.strip():
        return 0.0
    return 1.0 if rule_match(_RULE, answer, response) else 0.0


def rubric_reward(history: list[dict[str, Any]], rubrics: list[str], use_reasoning: bool, use_content: bool) -> float:
    if len(rubrics) == 0:
        return 0.0
    full_text = ""
    for conv in history:
        if conv["role"] == "assistant":
            if use_reasoning and "reasoning_content" in conv:
                full_text += "\n\n" + conv["reasoning_content"].strip()
            if use_content and "content" in conv:
                full_text += "\n\n" + conv["content"].strip()
    hits = 0
    for rubric in rubrics:
        if normalize_string(rubric) in normalize_string(full_text):
            hits += 1
    return hits / len(rubrics)


@app.post("/evaluate")
async def evaluate(request: Request) -> JSONResponse:
    data = json.loads(await request.body())
    info = data["extra_reward_info"]
    if "history" in data:
        history = data["history"]
        response = history[-1]["content"]
    else:
        response = data["response"]
        history = [{"role": "assistant", "content": response}]
        if "</think>" in response:
            reasoning, content = response.split("</think>", 1)
            history = [
                {
                    "role": "assistant",
                    "reasoning_content": reasoning.removeprefix("<think>").strip(),
                    "content": content.strip(),
                }
            ]
            response = content.strip()
    eta = info["rubric_reward_ratio"]
    outcome = outcome_reward(response, str(data["label"])) if eta < 1 else 0.0
    rubric = 0.0
    if eta > 0:
        rubric = rubric_reward(
            history, info.get("rubrics", []), info["rubric_use_reasoning_content"], info["rubric_use_content"]
        )
    result = {"outcome_reward": outcome, "rubric_reward": rubric, "reward": (1 - eta) * outcome + eta * rubric}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return JSONResponse(result)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def main(argv: list[str] | None = None) -> None:
    from common.cli import run_cli, standalone

    def serve(args: argparse.Namespace) -> int:
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
        return 0

    parser = standalone("python -m reward_service.bench_baseline", serve, logs=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    run_cli(parser, argv)


if __name__ == "__main__":
    main()
