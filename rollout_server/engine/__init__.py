"""The built-in rollout engine: SGLang's native HTTP API on a transformers model (see engine/api.py)."""
