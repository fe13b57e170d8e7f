"""Where the weights come from: the learner's megatron model, or a plain HF model (tests, the benchmark).

A `WeightSource` yields (HF name, full tensor) on the sending rank of each pipeline stage, writes a loadable
HF directory, and carries the few learner-side collectives the push needs (object broadcast/gather and a
barrier over the learner's ranks, on a gloo group with a timeout). Both sources feed the same sender.
"""

from __future__ import annotations

import abc
import datetime
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Files of an HF directory that hold weights; everything else (config, tokenizer, templates) is copied on export.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")


class WeightSource(abc.ABC):
    """This rank's view: its pipeline stage, whether it sends its stage's tensors, whether it coordinates."""

    pp_rank: int = 0
    pp_size: int = 1
    is_stage_leader: bool = True
    """Sends its stage's tensors to the engines (TP, CP and DP rank 0 of the stage)."""
    is_coordinator: bool = True
    """Global rank 0: talks to the broker and pauses/resumes the engines."""

    @abc.abstractmethod
    def named_tensors(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of this stage's parameters on the stage leader; nothing elsewhere.

        A collective: every rank must exhaust it (TP ranks take part in the gathers)."""

    @abc.abstractmethod
    def export(self, model: Any, out_dir: Path) -> None:
        """Write a loadable HF directory (a collective over the learner's ranks)."""

    def broadcast_object(self, obj: Any) -> Any:
        """The coordinator's `obj` on every rank."""
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on the coordinator (elsewhere: an empty list)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every learner rank."""
        return None


def copy_non_weight_files(src: Path, out: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy tokenizer, templates and other non-weight files of an HF directory (not those named in `skip`)."""
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in skip:
            shutil.copy2(path, out / path.name)


class HFModelSource(WeightSource):
    """A transformers model in this single process: its parameters under their own (HF) names.

    Tied parameters go once (named_parameters drops the duplicate lm_head of tied embeddings, as HF's own
    save does); the engine ties them itself. `hf_dir` supplies tokenizer files for exports.
    """

    def __init__(self, hf_dir: str | Path | None = None) -> None:
        self.hf_dir = Path(hf_dir) if hf_dir else None

    def named_tensors(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            yield name, param.detach()

    def export(self, model: Any, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        if self.hf_dir is not None:
            copy_non_weight_files(self.hf_dir, out_dir, skip=("config.json", "generation_config.json"))


class MegatronSource(WeightSource):
    """The learner's megatron model (any TP/PP/CP/DP layout) through learner.model.export.

    Construct on every rank (it creates a gloo group over the learner's world, a collective).
    """

    def __init__(self, arch: Any, hf_config_dir: str | Path, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        from learner.parallel import current_layout

        layout = current_layout()
        self.arch = arch
        self.hf_config_dir = Path(hf_config_dir)
        self.pp_rank = layout.pp_rank
        self.pp_size = layout.pp_size
        self.is_stage_leader = layout.is_stage_leader
        self.is_coordinator = layout.rank == 0
        # Object collectives need gloo; a timeout keeps a dead rank from hanging the others.
        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def named_tensors(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        from learner.model.export import iter_hf_weights

        return iter_hf_weights(model, self.arch)

    def export(self, model: Any, out_dir: Path) -> None:
        from learner.model.export import export_hf

        export_hf(model, out_dir, self.hf_config_dir)

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] | None = [None] * dist.get_world_size() if self.is_coordinator else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out or []

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._group)
