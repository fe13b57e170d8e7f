"""The files of a checkpoint directory, read without torch: what `longtrace checkpoints list` shows, which
checkpoints retention keeps, the run record saved with each checkpoint, and where its HF config is.

    step_00000020/
        (megatron's sharded files: metadata.json, .metadata, *.distcp, common.pt)
        checkpoint.json       the run record: step, policy version, save time, run id, base model, model section
        hf_config/            the base model's config and tokenizer files (no weights): what export-hf needs
        learner_state.json    written last (learner/checkpoint.py `commit`); a step directory without it is incomplete
    latest                    the newest complete checkpoint's name

checkpoint.json and hf_config/ make a checkpoint self-contained: it exports after the base model directory (say an
SFT phase's pruned weight export) is gone, or on another machine. Checkpoints saved before them fall back on the run's
config.json (<run_dir>/config.json, the parent of the default checkpoints directory).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from learner.durable import write_durably
from learner.state import LearnerState

if TYPE_CHECKING:
    from learner.train_config import TrainConfig

LATEST = "latest"
STATE_FILE = "learner_state.json"
RECORD_FILE = "checkpoint.json"
HF_CONFIG_DIR = "hf_config"
MEGATRON_METADATA = "metadata.json"  # megatron's dist_checkpointing writes it with the shards
RUN_CONFIG = "config.json"  # the learner's resolved TrainConfig in its run_dir (learner/trainer.py `run`)
# Files of an HF directory that are weights (or their index); the rest (config, tokenizer, templates) is its config.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")
_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(_PREFIX)
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def is_complete(step_dir: Path) -> bool:
    return (step_dir / STATE_FILE).is_file()


# ---------------------------------------------------------------- the run record


class RunRecord(msgspec.Struct, kw_only=True):
    """What a run writes into each of its checkpoints besides the weights and the learner state."""

    run_id: str = ""  # --broker.run_id: a run started from this checkpoint must use another
    run_dir: str = ""
    hf_path: str = ""  # the base model directory (absolute), as the run was configured
    init_from: str = ""  # the checkpoint the run's lineage started from (--checkpoint.init_from), if any
    keep_every_steps: int = 0
    model: dict[str, Any] = {}  # the run's `model` section (LearnerModelConfig): layout, dtype, vocab padding


class CheckpointRecord(RunRecord, kw_only=True):
    step: int = 0
    policy_version: int = 0
    saved_unix_s: float = 0.0
    world_size: int = 1


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def run_record(cfg: TrainConfig, init: Path | None, resume: Path | None) -> RunRecord:
    """This run's record; a resumed run keeps the lineage (init_from) its checkpoint records."""
    init_from = str(init.resolve()) if init is not None else ""
    if resume is not None and (previous := read_record(resume)) is not None:
        init_from = init_from or previous.init_from
    return RunRecord(
        run_id=cfg.broker.run_id,
        run_dir=_absolute(cfg.run_dir),
        hf_path=_absolute(cfg.model.hf_path),
        init_from=init_from,
        keep_every_steps=cfg.checkpoint.keep_every_steps,
        model=cfg.model.model_dump(mode="json"),
    )


def write_record(step_dir: Path, run: RunRecord, state: LearnerState, world_size: int) -> None:
    """Rank 0, before `commit`: checkpoint.json and a copy of the base model's config/tokenizer (hf_config/)."""
    record = CheckpointRecord(
        **msgspec.structs.asdict(run),
        step=state.step,
        policy_version=state.policy_version,
        saved_unix_s=time.time(),
        world_size=world_size,
    )
    write_durably(step_dir / RECORD_FILE, msgspec.json.encode(record))
    if run.hf_path and (Path(run.hf_path) / "config.json").is_file():
        copy_hf_config(run.hf_path, step_dir / HF_CONFIG_DIR)


def read_record(step_dir: Path) -> CheckpointRecord | None:
    """The checkpoint's record; None for checkpoints saved before records existed."""
    path = step_dir / RECORD_FILE
    if not path.is_file():
        return None
    return msgspec.json.decode(path.read_bytes(), type=CheckpointRecord)


def _legacy_run_config(step_dir: Path) -> dict[str, Any] | None:
    """The TrainConfig the run dumped into its run_dir, for checkpoints without a record (default layout only)."""
    path = step_dir.parent.parent / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("model"), dict) else None


def model_section(step_dir: Path) -> dict[str, Any]:
    """The `model` section of the run that saved `step_dir` (empty when unknown)."""
    record = read_record(step_dir)
    if record is not None:
        return record.model
    legacy = _legacy_run_config(step_dir)
    return legacy["model"] if legacy is not None else {}


def copy_hf_config(src: str | Path, dst: Path) -> None:
    """The non-weight files of HF directory `src` (config, generation config, tokenizer, chat template) into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def find_hf_config(step_dir: Path) -> Path:
    """The HF config directory (config.json + tokenizer) of the model a checkpoint holds: the copy saved with it,
    else the base model directory its record or its run's config.json names. ValueError naming --hf_config."""
    tried: list[str] = []
    candidates = [step_dir / HF_CONFIG_DIR]
    record = read_record(step_dir)
    if record is not None and record.hf_path:
        candidates.append(Path(record.hf_path))
    legacy = _legacy_run_config(step_dir)
    if legacy is not None and legacy["model"].get("hf_path"):
        candidates.append(Path(legacy["model"]["hf_path"]))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
        tried.append(str(candidate))
    raise ValueError(
        f"no HF config for checkpoint {step_dir} (tried {', '.join(tried)}): pass --hf_config DIR, the base "
        "model's directory (its config.json and tokenizer files; the weights are not read)"
    )


# ---------------------------------------------------------------- finding checkpoints


def read_latest(root: Path) -> Path | None:
    """The directory `root/latest` names, or None (no marker)."""
    marker = root / LATEST
    return root / marker.read_text().strip() if marker.is_file() else None


def resolve_checkpoint(path: str | Path, flag: str) -> Path:
    """A complete checkpoint from a step directory, a checkpoints directory (its latest) or a run directory
    (checkpoints/latest); ValueError naming `flag` otherwise."""
    given = Path(path)
    if not given.is_dir():
        raise ValueError(f"{flag} {given}: no such directory")
    step_dir = given
    if not is_complete(given) and not (given / MEGATRON_METADATA).is_file():
        for root in (given, given / "checkpoints"):
            latest = read_latest(root)
            if latest is not None:
                step_dir = latest
                break
        else:
            raise ValueError(
                f"{flag} {given}: not a checkpoint (a step_N directory with {STATE_FILE}), nor a checkpoints "
                f"directory or run directory with a `{LATEST}` marker"
            )
    if not is_complete(step_dir):
        raise ValueError(
            f"{flag} {given}: {step_dir} is an incomplete checkpoint (no {STATE_FILE}: its save did not finish); "
            f"`longtrace checkpoints list {step_dir.parent}` shows the complete ones"
        )
    return step_dir


def checkpoint_roots(path: str | Path) -> list[Path]:
    """The checkpoints directories under `path`: itself, RUN_DIR/checkpoints, the directory a learner run's
    config.json names, or a `longtrace up` run's RUN_DIR/phases/*/checkpoints. ValueError when there is none."""
    given = Path(path)
    if not given.is_dir():
        raise ValueError(f"RUN_DIR {given}: no such directory")

    def holds_checkpoints(d: Path) -> bool:
        return (d / LATEST).is_file() or any(_step_of(p) is not None for p in d.iterdir() if p.is_dir())

    if holds_checkpoints(given):
        return [given]
    candidates = [given / "checkpoints"]
    config = given / RUN_CONFIG
    if config.is_file():
        try:
            custom = json.loads(config.read_text()).get("checkpoint", {}).get("dir", "")
        except (json.JSONDecodeError, AttributeError):
            custom = ""
        if custom:
            candidates.append(Path(custom))
    candidates += sorted((given / "phases").glob("*/checkpoints"))
    roots = [d for d in candidates if d.is_dir() and holds_checkpoints(d)]
    if not roots:
        raise ValueError(
            f"RUN_DIR {given}: no checkpoints (looked for step_N directories in it, in {given / 'checkpoints'} "
            f"and in {given / 'phases'}/*/checkpoints)"
        )
    return roots


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    step: int
    policy_version: int | None  # None: incomplete
    saved_unix_s: float
    size_bytes: int
    complete: bool
    latest: bool
    kept: bool  # a version keep_every_steps keeps for good

    def to_json(self) -> dict[str, Any]:
        saved = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.saved_unix_s))
        return asdict(self) | {"saved_at": saved}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every step directory under `root`, oldest first (incomplete ones too: they take disk until a save of the same
    step replaces them)."""
    latest = read_latest(root)
    out = []
    for step_dir in sorted(p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None):
        step = _step_of(step_dir)
        assert step is not None
        complete = is_complete(step_dir)
        record = read_record(step_dir) if complete else None
        version: int | None = None
        if record is not None:
            version, saved = record.policy_version, record.saved_unix_s
        elif complete:
            version = LearnerState.load(step_dir / STATE_FILE).policy_version
            saved = (step_dir / STATE_FILE).stat().st_mtime
        else:
            saved = step_dir.stat().st_mtime
        every = record.keep_every_steps if record is not None else 0
        out.append(
            CheckpointInfo(
                path=str(step_dir),
                step=step,
                policy_version=version,
                saved_unix_s=saved,
                size_bytes=_size(step_dir),
                complete=complete,
                latest=latest is not None and step_dir.name == latest.name,
                kept=complete and every > 0 and step % every == 0,
            )
        )
    return out


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_table(roots: dict[str, list[CheckpointInfo]]) -> str:
    """The human listing: one table per checkpoints directory."""
    blocks = []
    for root, infos in roots.items():
        lines = [f"{root}:", f"  {'STEP':>8}  {'POLICY':>8}  {'SAVED':<19}  {'SIZE':>10}  NOTE"]
        for c in infos:
            notes = [n for n, on in (("latest", c.latest), ("kept", c.kept), ("incomplete", not c.complete)) if on]
            version = "-" if c.policy_version is None else str(c.policy_version)
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.saved_unix_s))
            lines.append(
                f"  {c.step:>8}  {version:>8}  {saved:<19}  {_human_bytes(c.size_bytes):>10}  {', '.join(notes)}"
            )
        if not infos:
            lines.append("  (none)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- retention


def prunable(root: Path, keep_last: int, keep_every_steps: int) -> list[Path]:
    """Complete checkpoints that retention deletes: all but the newest `keep_last`, the multiples of
    `keep_every_steps` (when > 0) and the one `latest` names (never deleted, even if an older step)."""
    done = sorted(p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and is_complete(p))
    latest = read_latest(root)
    kept = set(done[-keep_last:])
    if keep_every_steps > 0:
        kept |= {p for p in done if (_step_of(p) or 0) % keep_every_steps == 0}
    return [p for p in done if p not in kept and (latest is None or p.name != latest.name)]


# ---------------------------------------------------------------- starting a new run from a checkpoint


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def init_source(cfg: TrainConfig, resuming: bool) -> Path | None:
    """The checkpoint --checkpoint.init_from names, validated; None when unset or when the run resumes from a
    checkpoint of its own (that one wins). ValueError naming the flag for a source that is not another run's."""
    if not cfg.checkpoint.init_from:
        return None
    given = Path(cfg.checkpoint.init_from)
    own = Path(cfg.checkpoint_dir).resolve()
    # Checked on a resume too: a run pointed at the source run's checkpoint directory would resume the source run
    # itself (its data cursor and streams) and prune its checkpoints.
    if _overlap(given.resolve(), own):
        raise ValueError(
            f"--checkpoint.init_from {given} overlaps this run's checkpoint directory {own}: a run started from "
            "another run's checkpoint needs its own --run_dir / --checkpoint.dir (to go on with the same run, resume)"
        )
    if resuming:
        return None
    path = resolve_checkpoint(given, "--checkpoint.init_from")
    record = read_record(path)
    legacy = _legacy_run_config(path)
    source_run_id = record.run_id if record is not None else (legacy or {}).get("broker", {}).get("run_id", "")
    if source_run_id and source_run_id == cfg.broker.run_id:
        raise ValueError(
            f"--checkpoint.init_from {path} was saved by run id {source_run_id!r}, this run's --broker.run_id: a new "
            "run needs its own run id (it would read and ack the source run's Redis streams)"
        )
    return path
