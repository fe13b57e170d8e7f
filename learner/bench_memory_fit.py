"""The fits of `longtrace bench learner-memory` (learner/bench_memory.py): a power law and a line through a path's
measured peaks."""

from __future__ import annotations

import math
from typing import Any


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(c0, c1) of y = c0 + c1 x by least squares (at least two distinct x)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - c1 * mx, c1


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, k) of y = a x^k by least squares on log-log (positive values)."""
    log_a, k = linear_fit([math.log(x) for x in xs], [math.log(y) for y in ys])
    return math.exp(log_a), k


def measured_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if p["peak_mb"] is not None and p["peak_mb"] > 0]


def line_and_power_fits(points: list[dict[str, Any]]) -> tuple[float, float, float, float] | None:
    """(a, k, c0, c1) of a path's measured peaks (MiB) against seq_len; None below two lengths."""
    ok = measured_points(points)
    if len(ok) < 2:
        return None
    xs, ys = [float(p["seq_len"]) for p in ok], [float(p["peak_mb"]) for p in ok]
    return (*power_fit(xs, ys), *linear_fit(xs, ys))


def fit(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The reported fits: peak = a * L^k, and peak = c0 + c1 * L (c1 also as bytes per token)."""
    fits = line_and_power_fits(points)
    if fits is None:
        return None
    a, k, c0, c1 = fits
    return {
        "measured_lengths": len(measured_points(points)),
        "exponent": round(k, 3),
        "a": float(f"{a:.4g}"),
        "c0_mb": round(c0, 1),
        "c1_mb_per_token": round(c1, 5),
        "bytes_per_token": round(c1 * 2**20),
    }
