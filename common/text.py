"""The method's answer normalisation (METHOD.md §2), defined once: the rubric reward, the rule judge and the data
builder's statistics all count with it, so the builder's statistics count exactly what the reward credits.

`norm(s)`: lower-case, keep runs of ASCII word characters and single CJK characters, join with spaces (accented
letters are dropped: "é" is not in [a-zA-Z]).
"""

from __future__ import annotations

import re

_WORD_RE = re.compile(r"[a-zA-Z0-9_]+|[\u4e00-\u9fff]")
# ASCII bytes that survive norm(); every other byte becomes a separator.
_ASCII_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_ASCII_TABLE = bytes(c if c in _ASCII_KEEP else 0x20 for c in range(256))


def norm_reference(s: str) -> str:
    """The reference normalisation, verbatim: `" ".join(re.findall(r"[a-zA-Z0-9_]+|[\\u4e00-\\u9fff]", s.lower().strip()))`."""
    return " ".join(_WORD_RE.findall(s.lower().strip()))


def norm(s: str) -> str:
    """Same result as `norm_reference`, about 3x faster on ASCII text (byte translation instead of a regex).

    For ASCII input, lower() stays ASCII, CJK cannot occur, and every token is a maximal run of [a-z0-9_]:
    mapping all other bytes to spaces and splitting gives the same tokens. Non-ASCII input (where lower()
    can even produce ASCII, e.g. the Kelvin sign) takes the reference path.
    """
    if s.isascii():
        return b" ".join(s.lower().encode("ascii").translate(_ASCII_TABLE).split()).decode("ascii")
    return norm_reference(s)
