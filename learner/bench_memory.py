"""`longtrace bench learner-memory`: peak memory of one learner rank for one training step vs sequence length.

Each (path, sequence length) runs `Learner.train_step` (learner/train_step.py: megatron-core, the GRPO loss) once
in a fresh process (learner/bench_memory_worker.py) on CPU, with Qwen3's vocabulary and a small hidden size, and
reports the step's peak RSS above the RSS right before it. The paths are TrainConfig overrides (PATHS below);
context parallelism runs CP_PATH under a real `torchrun --nproc_per_node 2` (gloo) and compares per-rank peaks with CP1 x DP2 on as many ranks.

Before a launch, the path's fits over the lengths it has measured predict the point's RSS; a prediction above
`max_rss_mb` is skipped (null, with the reason), as is a worker that fails, times out or is killed by the OOM
killer, so the bench always finishes. The baseline holds several fp32 copies of the `[tokens, vocab]` logits
(~0.6 MB per token each at Qwen3's vocabulary): it cannot run at 16K tokens on a 24 GiB machine.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import BaseConfig, merge_tables
from common.progress import bar
from learner.bench_memory_fit import fit, line_and_power_fits, measured_points
from learner.bench_memory_worker import MMAP_THRESHOLD_BYTES, MeasureSpec, ModelSpec, run_worker, worker_argv

PATHS: dict[str, dict[str, Any]] = {
    # name: TrainConfig overrides (dotted keys). "baseline" and "new" are the pair the result compares.
    "baseline": {"batch.logprob_impl": "megatron", "model.recompute": "none", "batch.packing": False},
    "new": {"batch.logprob_impl": "fused_head", "model.recompute": "full", "batch.packing": True},
}
CP_PATH, CP_SIZE = "new", 2
"""Context parallelism is measured on this path at this CP size (per-rank peak vs CP1)."""
BATCH = (
    "one GRPO group of 2 samples (rewards 1 and 0) of seq_len tokens each: a shared prompt of seq_len/2 random "
    "tokens and a random response, engine logprobs -log(vocab); batch.max_tokens_per_micro_batch = seq_len, so "
    "each sequence is a micro-batch of its own and the peak is that of one seq_len-token sequence"
)
MEASURE = (
    "allocated_peak_mb / activation_peak_mb / optimizer_peak_mb: the peak net tensor bytes allocated during the step / "
    "inside its forward_backward / optimizer_step ranges (torch.profiler with profile_memory, learner/alloc_trace.py: "
    "the CPU analogue of CUDA's max_memory_allocated, without what the allocator keeps); "
    "every worker runs with MALLOC_MMAP_THRESHOLD_=65536 (environment.malloc_mmap_threshold), so that freed blocks go "
    "back to the kernel and RSS follows the tensors; "
    "peak_mb = VmHWM (ru_maxrss in runs before 2026-12-06) after one train_step minus VmRSS right before it (MiB), one fresh process per point; "
    "the kernel's high-water mark is reset just before the step (/proc/self/clear_refs) so the model build "
    "cannot mask it. A warm-up step on a short batch comes first (Adam's moments and the optimizer's buffers "
    "allocated, as in every step of a run but the first): the measured step is a steady-state one"
)


class BenchMemoryConfig(BaseConfig):
    seq_lens: list[int] = [1024, 2048, 4096, 8192, 16384]
    """Tokens per sequence, measured in increasing order; `--seq_lens 1024,2048`."""
    cp_seq_len: int = Field(0, ge=0)
    """Length of the CP2-vs-CP1 comparison; 0: the longest of seq_lens."""
    skip_cp: bool = False
    """Do not measure context parallelism."""
    only_cp: bool = False
    """Measure context parallelism only (at cp_seq_len, or the longest of seq_lens), no sweep."""
    max_rss_mb: float = Field(0.0, ge=0)
    """Skip a point whose predicted RSS (all its processes) exceeds this; 0: 80 % of MemAvailable at start."""
    timeout_s: float = Field(1800.0, gt=0)
    """Wall-clock limit of one worker (build + one step); one over it is killed and reported as null."""
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(64, ge=1)
    intermediate_size: int = Field(768, ge=1)
    vocab_size: int = Field(151936, ge=16)
    """Qwen3's vocabulary; smaller only for tests (the logits, hence the baseline's memory, scale with it)."""
    threads: int = Field(2, ge=1)
    """torch threads of a worker (split over the ranks of a CP run)."""
    seed: int = 0
    """Seed of the random token ids."""
    path_overrides: dict[str, dict[str, Any]] = {}
    """Extra TrainConfig keys per path over PATHS, e.g. `--path_overrides.new.batch.logprob_chunk_mb 128`."""

    @field_validator("seq_lens", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):  # `--seq_lens 1024,2048` is not TOML: it arrives as a string
            return [part.strip() for part in value.split(",") if part.strip()]
        return [value] if isinstance(value, int) else value

    @field_validator("seq_lens")
    @classmethod
    def _sort(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 16:
            raise ValueError(f"--seq_lens must name lengths >= 16, got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _check(self) -> BenchMemoryConfig:
        if 0 < self.cp_seq_len < 16:
            raise ValueError(f"--cp_seq_len must be >= 16 (or 0: the longest of --seq_lens), got {self.cp_seq_len}")
        unknown = set(self.path_overrides) - set(PATHS)
        if unknown:
            raise ValueError(f"--path_overrides names unknown paths {sorted(unknown)} (paths: {', '.join(PATHS)})")
        return self


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """`{"batch.packing": False}` -> `{"batch": {"packing": False}}`."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        table = out
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return out


def dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nested`."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        out |= dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def train_config(cfg: BenchMemoryConfig, path: str, hf_path: str, seq_len: int, cp_size: int = 1) -> dict[str, Any]:
    """The TrainConfig (as a dict) of one point: the path's overrides over the bench's fixed keys."""
    base = {
        "model": {"hf_path": hf_path, "dtype": "fp32", "cp_size": cp_size},
        "data": {"dataset_path": "unused (bench)", "temperature": 1.0},
        "batch": {"max_tokens_per_micro_batch": seq_len},
    }
    return merge_tables(merge_tables(base, nested(PATHS[path])), cfg.path_overrides.get(path, {}))


def _validation_error(config: dict[str, Any]) -> str | None:
    from learner.train_config import TrainConfig

    try:
        TrainConfig.model_validate(config)
    except ValidationError as e:
        problems = (f"--{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors(include_url=False))
        return "invalid TrainConfig: " + "; ".join(problems)
    return None


def mem_available_mb() -> float:
    """MemAvailable of /proc/meminfo, MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# ---------------------------------------------------------------- fits


def predict_rss_mb(points: list[dict[str, Any]], seq_len: int, nproc: int = 1) -> float | None:
    """The RSS a point at `seq_len` is expected to reach (all `nproc` processes together): the larger of the two
    fits' peaks plus `nproc` times the RSS before the step; None below two measured lengths."""
    fits = line_and_power_fits(points)
    if fits is None:
        return None
    a, k, c0, c1 = fits
    base = max(float(r["rss_before_mb"]) for p in measured_points(points) for r in p["ranks"])
    return nproc * base + max(a * math.pow(seq_len, k), c0 + c1 * seq_len)


# ---------------------------------------------------------------- the run


class Bench:
    """One bench run: the model directory, the points measured so far (per path), the guard."""

    def __init__(
        self, cfg: BenchMemoryConfig, tmp: Path, max_rss_mb: float, progress: IO[str] | None, points_bar: Any = None
    ) -> None:
        self.cfg, self.tmp, self.max_rss_mb, self.progress = cfg, tmp, max_rss_mb, progress
        self.points_bar = points_bar
        """A common.progress bar over the points (one worker each), advanced as each ends; None: no bar."""
        self.hf_path = str(tmp / "qwen3")
        self.points: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
        self.cp_points: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        if self.progress is None:
            return
        if self.points_bar is not None:  # above the bar (tqdm.write clears and redraws it); plain when it is off
            self.points_bar.write(f"bench learner-memory: {text}", file=self.progress)
            self.progress.flush()
        else:
            print(f"bench learner-memory: {text}", file=self.progress, flush=True)

    def make_model(self) -> None:
        c = self.cfg
        shape = c.model_dump(include=set(ModelSpec.model_fields) - {"path", "max_position_embeddings"})
        spec = ModelSpec(path=self.hf_path, max_position_embeddings=max(40960, c.seq_lens[-1], c.cp_seq_len), **shape)
        error = run_worker(worker_argv(1, "make-model", spec), self.tmp / "make-model.log", c.timeout_s, c.threads)
        if error is not None:
            raise RuntimeError(f"building the bench model failed: {error}")

    def measure(self, path: str, seq_len: int, cp_size: int = 1, nproc: int = 1) -> dict[str, Any]:
        """One point on `nproc` ranks (DP = nproc / cp_size): skipped (invalid config, the guard), failed, or every
        rank's numbers and their max peak. One-rank points at a length of the sweep join the path's points (its
        fits); the others `cp_points`."""
        nproc = max(nproc, cp_size)
        point: dict[str, Any] = {"path": path, "seq_len": seq_len, "cp_size": cp_size, "nproc": nproc, "peak_mb": None}
        config = train_config(self.cfg, path, self.hf_path, seq_len, cp_size)
        predicted = predict_rss_mb(self.points[path], seq_len, nproc=nproc)
        point["predicted_rss_mb"] = None if predicted is None else round(predicted)
        reason = _validation_error(config)
        if reason is None and predicted is not None and predicted > self.max_rss_mb:
            reason = f"skipped: predicted peak RSS {predicted:.0f} MiB > --max_rss_mb {self.max_rss_mb:.0f}"
        log = self.tmp / f"{path}-{seq_len}-cp{cp_size}-n{nproc}.log"
        if reason is None:
            out_dir = log.with_suffix("")
            out_dir.mkdir()
            threads = max(1, self.cfg.threads // nproc)
            spec = MeasureSpec(
                train_config=config, seq_len=seq_len, out_dir=str(out_dir), threads=threads, seed=self.cfg.seed
            )
            start = time.monotonic()
            reason = run_worker(worker_argv(nproc, "measure", spec), log, self.cfg.timeout_s, threads)
            point["worker_s"] = round(time.monotonic() - start, 1)
            ranks = [json.loads(f.read_text()) for f in sorted(out_dir.glob("rank*.json"))]
            if reason is None and len(ranks) != nproc:
                reason = f"{len(ranks)} of {nproc} ranks wrote a result"
            if reason is None:
                point["ranks"] = ranks
                point["peak_mb"] = max(r["peak_mb"] for r in ranks)
        if reason is not None:
            point["reason"] = reason
            if log.exists():  # the temporary directory goes: keep what the worker said last
                point["log_tail"] = log.read_text(errors="replace")[-2000:]
        sweep = nproc == 1 and seq_len in self.cfg.seq_lens
        (self.points[path] if sweep else self.cp_points).append(point)
        if self.points_bar is not None:
            self.points_bar.update()
        self.say(f"{path} seq_len {seq_len} cp {cp_size} ranks {nproc}: {reason or str(point['peak_mb']) + ' MiB'}")
        return point

    def cp(self) -> dict[str, Any]:
        """CP_PATH at cp_seq_len on CP_SIZE ranks against CP1 x DP CP_SIZE, the same number of ranks (both hold the
        same gradient all-reduce buffers, and each rank of the CP1 run a whole sequence per micro-batch). The ratio
        is that of the per-rank activation memory: the peak tensor bytes of the forward and backward
        (`activation_peak_mb`, max over ranks), which CP divides; the whole step's tensor peak (the optimizer's
        temporaries too, which CP does not touch) and the RSS peak (what glibc keeps too) are given beside it."""
        seq_len = self.cfg.cp_seq_len or self.cfg.seq_lens[-1]
        cp1 = self.measure(CP_PATH, seq_len, 1, nproc=CP_SIZE)
        cpn = self.measure(CP_PATH, seq_len, CP_SIZE, nproc=CP_SIZE)
        out: dict[str, Any] = {"path": CP_PATH, "seq_len": seq_len, "cp_size": CP_SIZE, "cp1_dp_size": CP_SIZE}
        for key in ("activation_peak_mb", "allocated_peak_mb", "peak_mb"):
            one = max((r[key] for r in cp1.get("ranks", [])), default=None)
            per_rank = [r[key] for r in cpn.get("ranks", [])]
            ratio = round(max(per_rank) / one, 3) if one and per_rank and None not in per_rank else None
            out[key] = {"cp1": one, "cp_per_rank": per_rank, "ratio": ratio}
        out["ratio"] = out["activation_peak_mb"]["ratio"]
        if out["ratio"] is None:
            out["reason"] = cpn.get("reason") or cp1.get("reason") or "no activation peak recorded"
        return out

    def peaks(self, path: str) -> list[float | None]:
        by_len = {p["seq_len"]: p["peak_mb"] for p in self.points[path]}
        return [by_len.get(n) for n in self.cfg.seq_lens]

    def ratios(self) -> dict[str, Any]:
        """new / baseline at the longest length the new path measured (the baseline's linear fit there when the
        baseline was not measured at it), and at the longest length both measured."""
        lens, new, base = self.cfg.seq_lens, self.peaks("new"), self.peaks("baseline")
        out: dict[str, Any] = {"ratio_at_max": None, "ratio_at_max_seq_len": None, "ratio_at_max_basis": None}
        new_at = [(n, v, b) for n, v, b in zip(lens, new, base, strict=True) if v is not None]
        if new_at:
            longest, peak, measured = new_at[-1]
            fits = line_and_power_fits(self.points["baseline"])
            predicted = None if fits is None else fits[2] + fits[3] * longest
            out["ratio_at_max_seq_len"] = longest
            if measured is not None:
                out["ratio_at_max"], out["ratio_at_max_basis"] = round(peak / measured, 3), "measured"
            elif predicted is not None:
                n = len(measured_points(self.points["baseline"]))
                out["ratio_at_max"] = round(peak / predicted, 3)
                out["ratio_at_max_basis"] = f"baseline extrapolated from its linear fit over {n} measured lengths"
                out["baseline_extrapolated_mb"] = round(predicted, 1)
            else:
                out["ratio_at_max_basis"] = "none: the baseline was measured at fewer than 2 lengths"
        both = [(n, v / b) for n, v, b in new_at if b is not None]
        out["ratio_at_longest_measured"] = round(both[-1][1], 3) if both else None
        out["ratio_at_longest_measured_seq_len"] = both[-1][0] if both else None
        return out


def run_memory_bench(cfg: BenchMemoryConfig, progress: IO[str] | None = None) -> dict[str, Any]:
    """Measure every path at every length (then CP unless skipped); the result `--json` prints."""
    start = time.monotonic()
    max_rss_mb = cfg.max_rss_mb or 0.8 * mem_available_mb()
    num_points = (0 if cfg.only_cp else len(PATHS) * len(cfg.seq_lens)) + (0 if cfg.skip_cp else 2)
    with (
        tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp,
        bar(num_points, "bench learner-memory", "point") as b,
    ):
        bench = Bench(cfg, Path(tmp), max_rss_mb, progress, points_bar=b)
        bench.make_model()
        for path in [] if cfg.only_cp else PATHS:
            for seq_len in cfg.seq_lens:
                bench.measure(path, seq_len)
        cp = None if cfg.skip_cp else bench.cp()
    points = [p for ps in bench.points.values() for p in ps] + bench.cp_points
    ranks = [r for p in points for r in p.get("ranks", [])]
    masked = [f"{p['path']} {p['seq_len']}" for p in points for r in p.get("ranks", []) if r["build_peak_masks_step"]]
    return {
        "bench": "learner-memory",
        "seq_lens": cfg.seq_lens,
        "baseline_peak_mb": bench.peaks("baseline"),
        "peak_mb": bench.peaks("new"),
        "peak_mb_by_path": {path: bench.peaks(path) for path in PATHS},
        "skipped": {
            path: {str(p["seq_len"]): p["reason"] for p in ps if "reason" in p} for path, ps in bench.points.items()
        },
        "fit": {path: fit(ps) for path, ps in bench.points.items()},
        **bench.ratios(),
        "cp2_over_cp1": None if cp is None else cp["ratio"],
        "cp": cp if cp is not None else "skipped (--skip_cp)",
        "paths": {path: {**PATHS[path], **dotted(cfg.path_overrides.get(path, {}))} for path in PATHS},
        "batch": BATCH,
        "measure": MEASURE,
        "warnings": [f"the model build's peak RSS hides the step's at {where}" for where in masked],
        "max_rss_mb": round(max_rss_mb),
        "environment": {
            **{name: metadata.version(name) for name in ("torch", "transformers", "megatron-core")},
            "torch_threads": sorted({r["torch_threads"] for r in ranks}),
            "cpu_count": os.cpu_count(),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "heads": f"{cfg.num_heads} ({cfg.num_kv_heads} KV), head_dim {cfg.head_dim}",
            "intermediate_size": cfg.intermediate_size,
            "params": max((r["params"] for r in ranks), default=None),
            "dtype": "fp32",
            "device": "cpu",
            "malloc_mmap_threshold": MMAP_THRESHOLD_BYTES,
        },
        "points": points,
        "wall_s": round(time.monotonic() - start, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    """The human form: peaks per length, the fits, skipped points, the ratios."""

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    rows = [f"{'seq_len':>8} {'baseline MiB':>13} {'new MiB':>9} {'new/baseline':>13}"]
    for n, b, v in zip(result["seq_lens"], result["baseline_peak_mb"], result["peak_mb"], strict=True):
        rows.append(f"{n:>8} {cell(b):>13} {cell(v):>9} {'-' if b is None or v is None else f'{v / b:.3f}':>13}")
    for path, f in result["fit"].items():
        line = f and f"{f['a']:.4g} * L^{f['exponent']:.3f} MiB; {f['c0_mb']:.0f} MiB + {f['bytes_per_token']} B/token"
        rows.append(f"fit {path}: {line or 'fewer than 2 measured lengths'}")
    rows += [f"{path} {n}: {why}" for path, skipped in result["skipped"].items() for n, why in skipped.items()]
    rows.append(
        f"ratio_at_max (seq_len {result['ratio_at_max_seq_len']}): {result['ratio_at_max']} "
        f"({result['ratio_at_max_basis']})"
    )
    cp = result["cp"]
    if isinstance(cp, dict):
        rows.append(
            f"cp{cp['cp_size']}_over_cp1 (seq_len {cp['seq_len']}): {result['cp2_over_cp1']} {cp.get('reason', '')}"
        )
        for key in ("activation_peak_mb", "allocated_peak_mb", "peak_mb"):
            if key in cp:
                m = cp[key]
                rows.append(f"  {key}: CP1 {m['cp1']}, CP{cp['cp_size']} per rank {m['cp_per_rank']}: {m['ratio']}")
    rows += [f"warning: {w}" for w in result["warnings"]]
    rows.append(f"environment: {json.dumps(result['environment'])}; wall {result['wall_s']} s")
    return "\n".join(rows)
