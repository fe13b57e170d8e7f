"""`longtrace eval`: avg@k evaluation of a LongTraceRL JSONL through engines and the reward API (η = 0).

config.py (EvalConfig) -> run.py (generate k samples per question, score them) -> aggregate.py (avg@k, pass@k, ...)
-> outputs.py (samples.jsonl, summary.json) -> table.py (the terminal view); compare.py sets two runs side by side;
local.py starts a built-in engine and the reward API for `--model DIR`; cli.py registers the subcommands.
"""
