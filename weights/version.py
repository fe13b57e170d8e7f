"""The policy version at the SGLang boundary: SGLang's `weight_version` string <-> our integer policy version.

Our policy version is an int: the optimizer steps whose weights reached the engines (the learner's
`LearnerState.policy_version` is its one owner). SGLang names the weights an engine serves with a free string,
`weight_version`: `--weight-version` at start, `/update_weight_version` and the update endpoints' `weight_version`
field to set it, `/get_model_info` and every `/generate` answer's `meta_info.weight_version` to read it. Every
reader and writer of that string goes through this module.

One meaning of SGLang's `"default"` (what an engine started without `--weight-version` reports): the weights
it was started with, whose policy version the caller knows from its config: `initial`, which is
`INITIAL_POLICY_VERSION` (0, the learner's starting weights) unless a config says otherwise (the rollout
worker's `initial_policy_version`, for engines started from an export without `--weight-version`).
"""

from __future__ import annotations

SGLANG_DEFAULT = "default"
"""SGLang's weight_version of an engine started without --weight-version."""
INITIAL_POLICY_VERSION = 0
"""The policy version of the learner's starting weights (and so of an engine's start-up weights)."""
_MAX_DIGITS = 18  # below 2**63: the version travels as a signed 64-bit integer (msgpack, Redis, JSON readers)


class WeightVersionError(ValueError):
    """A weight_version string that is not a policy version (neither ASCII digits nor "default")."""


def parse_weight_version(raw: str, initial: int) -> int:
    """The policy version an engine's weight_version string names; `initial` for SGLang's "default".

    Strict: only ASCII digits (at most 18) or "default". `str.isdigit` alone accepts "²" or "٣", which `int`
    then refuses (or reads as another number): such a value raises WeightVersionError naming it."""
    if raw == SGLANG_DEFAULT:
        return initial
    if not (raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS):
        raise WeightVersionError(
            f"weight_version {raw[:40]!r} is not a policy version: expected ASCII digits (at most {_MAX_DIGITS}) "
            f"or {SGLANG_DEFAULT!r}"
        )
    return int(raw)


def format_weight_version(policy_version: int) -> str:
    """The weight_version string that names `policy_version` on an engine (what parse_weight_version reads back)."""
    if policy_version < 0:
        raise WeightVersionError(f"policy version {policy_version} is negative")
    return str(policy_version)
