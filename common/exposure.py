"""Refuse to serve an HTTP API on the network without a token, unless the operator says so.

A service bound to a non-loopback address without a bearer token serves anyone who reaches its port (the reward
API: scoring at our CPU's and judge's expense; the engine: pause, abort, weight replacement). Every service calls
`check_exposure` before it binds; it refuses such a start with a ConfigError (exit 2 through common.cli) that names
`--allow_unauthenticated` and where the token goes, and with the flag it logs a warning and lets it start.
"""

from __future__ import annotations

import ipaddress
import logging

from common.config import ConfigError

log = logging.getLogger(__name__)

ALLOW_FLAG = "--allow_unauthenticated"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 (also IPv4-mapped) and "localhost". Any other
    name is False: it may resolve to anything, and resolving it here would be a network call at start."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_exposure(
    host: str, has_token: bool, allow_unauthenticated: bool, what: str, token_hint: str, risk: str = "use it"
) -> None:
    """Raise ConfigError when `what` would serve on `host`, a non-loopback address, without a token and without
    `--allow_unauthenticated`. `token_hint` says where the token goes (its flags), `risk` what a stranger could do
    ("pause it or replace its weights"). With the flag: a warning, and the start goes on."""
    if has_token or is_loopback(host):
        return
    if allow_unauthenticated:
        log.warning("%s serves on %s without a token (%s): anyone who reaches it can %s", what, host, ALLOW_FLAG, risk)
        return
    raise ConfigError(
        f"{what} would bind {host!r}, which is not a loopback address, without a token: anyone who reaches it could "
        f"{risk}. Set a token ({token_hint}), bind 127.0.0.1 (--host), or pass {ALLOW_FLAG} to serve it without one"
    )
