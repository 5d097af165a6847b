"""What a configuration reload may change in a running daemon (issue 10).

SIGHUP (``systemctl reload freecall``) and ``POST /api/reload`` re-read the configuration. The
settings in :data:`LIVE` take effect at once, without touching a call in progress; every other
changed setting is reported as needing a restart and keeps its running value, so the daemon
never runs half of a setting it could not apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, config_to_dict

LIVE: frozenset[str] = frozenset({
    "users",
    "routes",
    "peering.seeds",
    "peering.srv_domain",
    "security.policy",
    "security.on_mitm",
    "security.zrtp_timeout",
    "security.rate_limit",
    "security.rate_window",
    "security.rate_block",
    "security.rate_softphones",
    "security.rate_exempt",
    "security.max_sources",
    "security.calls_per_source",
    "security.auth_failures",
    "security.auth_window",
    "security.lockout",
    "media.rtp_timeout",
    "sip.trusted",
    "sip.allow_register_from",
    "sip.registration.min_expires",
    "sip.registration.max_expires",
    "sip.registration.default_expires",
    "sip.registration.max_contacts",
    "control.notify",
    "log.level",
    "log.sip_trace",
    "log.call_records",
})
"""Dotted keys applied live; ``users`` and ``routes`` are compared as whole tables."""

_TABLES = ("users", "routes")


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and path not in _TABLES:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{path}.{key}" if path else key))
        return out
    return {path: value}


@dataclass
class ReloadPlan:
    """The keys that changed, split into those applied now and those needing a restart."""

    live: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    users_added: list[str] = field(default_factory=list)
    users_removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)

    def summary(self) -> dict[str, Any]:
        return {"applied": self.live, "restart_needed": self.restart,
                "users_added": self.users_added, "users_removed": self.users_removed}


def plan_reload(running: Config, loaded: Config) -> ReloadPlan:
    old, new = _leaves(config_to_dict(running)), _leaves(config_to_dict(loaded))
    plan = ReloadPlan()
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        (plan.live if key in LIVE else plan.restart).append(key)
    plan.users_added = sorted(set(loaded.users) - set(running.users))
    plan.users_removed = sorted(set(running.users) - set(loaded.users))
    return plan


def effective_config(running: Config, loaded: Config, plan: ReloadPlan) -> Config:
    """``running`` with the live keys of ``loaded``: what the daemon runs after the reload."""
    result = running
    for key in plan.live:
        result = _set(result, key.split("."), _get(loaded, key.split(".")))
    return result


def _get(obj: Any, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _set(obj: Any, path: list[str], value: Any) -> Any:
    head, rest = path[0], path[1:]
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value)})
