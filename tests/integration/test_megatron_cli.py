"""`longtrace export-hf` end to end: HF directory -> megatron (2 torchrun ranks, PP2) -> loadable HF directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.dist import REPO_ROOT, run_torchrun_argv


def _tiny_llama_with_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(3)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")  # type: ignore[no-untyped-call]
    fast.save_pretrained(path)


def test_export_hf_cli_under_torchrun_writes_a_loadable_hf_directory(tmp_path: Path) -> None:
    """Guards the export command: per-stage shard files plus one merged index, config and tokenizer copied,
    weights bit-exact, and transformers loads the result (a missing tied/untied or stage tensor fails it)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    _tiny_llama_with_tokenizer(src)
    run_torchrun_argv(2, ["-m", "deploy.cli", "export-hf", str(src), str(out), "--model.pp_size", "2"], timeout_s=180)

    assert {p.name for p in out.glob("*.safetensors")} == {
        "model-pp000-00000.safetensors",
        "model-pp001-00000.safetensors",
    }
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    original = load_file(str(src / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, original["model.embed_tokens.weight"])


def test_export_hf_cli_rejects_a_non_hf_source(tmp_path: Path) -> None:
    """Guards CLI input errors: a CKPT that is not an HF directory exits 2 with a message naming CKPT."""
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "export-hf", str(tmp_path / "missing"), str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "CKPT" in proc.stderr and "config.json" in proc.stderr
