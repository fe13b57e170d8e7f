"""Local model tools: the tiny Qwen3/Llama directory, its tokenizer and chat template, the word-level variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rollout_server.models import GENERATION_PROMPT, init_tiny_model


def test_tiny_model_is_a_normal_hf_directory(tmp_path: Path) -> None:
    """Guards against a directory that only our code can read: it must reload offline with Auto* classes,
    carry Qwen3's special tokens, the generation prompt, and eos ids in generation_config."""
    out = init_tiny_model(tmp_path / "m", hidden_size=64, vocab_size=400, seed=1)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3" and model.config.vocab_size >= len(tok)
    ids = {
        t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
    }
    assert len(set(ids.values())) == 5 and tok.unk_token_id not in ids.values()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who?"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWho?<|im_end|>\n" + GENERATION_PROMPT
    # Specials are skipped when decoding, the reasoning markers stay (the worker parses them).
    text = tok.decode(
        tok.encode("<|im_start|>a<think>b</think>c<|im_end|>", add_special_tokens=False), skip_special_tokens=True
    )
    assert text == "a<think>b</think>c"
    gen = GenerationConfig.from_pretrained(out)
    assert set(gen.eos_token_id) == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    assert tok.eos_token_id == ids["<|im_end|>"]


def test_tiny_model_weights_follow_the_seed(tmp_path: Path) -> None:
    """Guards against unseeded initialisation: tests and the demo rely on identical weights for a seed."""
    a = AutoModelForCausalLM.from_pretrained(init_tiny_model(tmp_path / "a", hidden_size=64, seed=3))
    b = AutoModelForCausalLM.from_pretrained(init_tiny_model(tmp_path / "b", hidden_size=64, seed=3))
    c = AutoModelForCausalLM.from_pretrained(init_tiny_model(tmp_path / "c", hidden_size=64, seed=4))
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_word_level_tokenizer_and_llama_arch(tmp_path: Path) -> None:
    """Guards against the word-vocabulary option losing the specials or mangling words, and the llama arch."""
    vocab = tmp_path / "words.txt"
    vocab.write_text("alpha beta gamma\ndelta\n")
    out = init_tiny_model(tmp_path / "w", hidden_size=64, word_vocab=vocab, arch="llama", vocab_size=64)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("alpha delta zeta", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["alpha", "delta", "<unk>"]
    assert (
        tok.decode(tok.encode("<|im_start|>beta gamma<|im_end|>", add_special_tokens=False), skip_special_tokens=True)
        == "beta gamma"
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    """Guards against a too-small BPE vocabulary or a missing corpus failing deep inside tokenizers."""
    with pytest.raises(ValueError, match="--vocab-size"):
        init_tiny_model(tmp_path / "x", vocab_size=100)
    with pytest.raises(ValueError, match="--corpus"):
        init_tiny_model(tmp_path / "y", corpus=tmp_path / "missing.txt")


def test_init_tiny_model_overwrites_an_existing_directory(tmp_path: Path) -> None:
    """Guards against init_tiny_model refusing an existing directory (tests and the demo re-run into the same place)."""
    first = init_tiny_model(tmp_path / "m", hidden_size=64)
    assert init_tiny_model(first, hidden_size=64, seed=9) == first
    assert AutoModelForCausalLM.from_pretrained(first).config.hidden_size == 64
