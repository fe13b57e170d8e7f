"""The demo's data: tiny-world train and held-out rows, SFT demonstrations and the vocabulary.

Train, validation and held-out questions come from different worlds (different RNG streams), so their facts
were never seen in training and a model can only answer them by reading the context; settings are chosen on the
validation split and reported on the held-out one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from datagen.config import SynthConfig
from datagen.dataset import Row
from datagen.synth.pipeline import SynthResult, synthesize
from datagen.synth.tiny import sft_example, tiny_vocabulary


@dataclass
class DemoSplits:
    train: list[Row]
    heldout: list[Row]
    validation: list[Row]
    """Questions from other unseen worlds than the held-out ones: settings are chosen on these."""
    sft: list[dict[str, Any]]
    """One demonstration per train row (see datagen/synth/tiny.py: prompt, reasoning, content, response), and the
    one-hop ones of `num_sft_last_hop`, shuffled together."""
    vocabulary: list[str]
    """Every word of every prompt, label and response (datagen.synth.tiny.tiny_vocabulary)."""
    train_result: SynthResult
    heldout_result: SynthResult


def demo_splits(
    seed: int = 0,
    num_train: int = 1024,
    num_heldout: int = 256,
    num_validation: int = 0,
    num_sft_last_hop: int = 0,
    **knobs: Any,
) -> DemoSplits:
    """Tiny-style splits; `knobs` are SynthConfig fields (hops=2, context_tokens=60, num_entities=64, ...).

    `num_sft_last_hop`: that many one-hop demonstrations ("home of E42 ?", from worlds of their own) shuffled into
    the SFT set beside the training questions' k-hop ones: they teach the chain's last lookup, an entity's city
    among the context's cities, on its own, which a tiny model otherwise learns late (docs/demo_tuning.md)."""
    train = synthesize(SynthConfig(style="tiny", seed=seed, num_questions=num_train, **knobs), split="train")
    heldout = synthesize(SynthConfig(style="tiny", seed=seed, num_questions=num_heldout, **knobs), split="heldout")
    validation = (
        synthesize(SynthConfig(style="tiny", seed=seed, num_questions=num_validation, **knobs), split="validation")
        if num_validation
        else None
    )
    cfg = train.config
    sft = [sft_example(q, r) for q, r in zip(train.row_questions, train.rows, strict=True)]
    if num_sft_last_hop:
        one = synthesize(
            SynthConfig(style="tiny", seed=seed, num_questions=num_sft_last_hop, **(knobs | {"hops": 1})),
            split="sft-last-hop",
        )
        sft += [sft_example(q, r) for q, r in zip(one.row_questions, one.rows, strict=True)]
        random.Random(f"{seed}:sft-mix").shuffle(sft)
    return DemoSplits(
        train=train.rows,
        heldout=heldout.rows,
        validation=validation.rows if validation else [],
        sft=sft,
        vocabulary=tiny_vocabulary(cfg.num_entities, cfg.num_cities),
        train_result=train,
        heldout_result=heldout,
    )
