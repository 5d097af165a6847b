"""Which keys a reload applies live and which need a restart (freecall.ops.reload)."""

from __future__ import annotations

from freecall.config import parse_config
from freecall.ops.reload import LIVE, effective_config, plan_reload

BASE = """
sip: {listen: ["udp:127.0.0.1:5070"], domains: [a.test]}
users: {alice: {password: a}}
log: {level: info}
"""


def test_users_log_level_and_policy_apply_live_the_rest_waits_for_a_restart() -> None:
    running = parse_config(BASE, source="old")
    loaded = parse_config("""
sip: {listen: ["udp:127.0.0.1:5071"], domains: [a.test], trusted: ["10.0.0.0/8"]}
users: {alice: {password: a}, carol: {password: c}}
log: {level: debug}
security: {policy: require}
routes: {b.test: "sip:192.0.2.2"}
""", source="new")
    plan = plan_reload(running, loaded)
    assert plan.live == ["log.level", "routes", "security.policy", "sip.trusted", "users"]
    assert plan.restart == ["sip.listen"]
    assert plan.users_added == ["carol"] and plan.users_removed == []
    effective = effective_config(running, loaded, plan)
    assert set(effective.users) == {"alice", "carol"}
    assert effective.log.level == "debug" and effective.security.policy == "require"
    assert str(effective.sip.trusted[0]) == "10.0.0.0/8"
    assert effective.sip.listen == running.sip.listen  # not applied: still the running one
    assert plan.summary()["restart_needed"] == ["sip.listen"]


def test_an_unchanged_file_changes_nothing() -> None:
    plan = plan_reload(parse_config(BASE), parse_config(BASE))
    assert not plan.changed and plan.live == [] and plan.restart == []


def test_removed_users_are_reported() -> None:
    plan = plan_reload(parse_config(BASE), parse_config(BASE.replace(
        "users: {alice: {password: a}}", "users: {bob: {password: b}}")))
    assert plan.users_added == ["bob"] and plan.users_removed == ["alice"]
    assert plan.live == ["users"]


def test_every_live_key_exists_in_the_schema() -> None:
    from freecall.config import config_to_dict

    plain = config_to_dict(parse_config(""))
    for key in LIVE:
        node = plain
        for part in key.split("."):
            assert part in node, key
            node = node[part]


def test_rate_limit_and_lockout_settings_apply_live() -> None:
    loaded = parse_config(BASE + "security: {rate_limit: 50, rate_exempt: [10.0.0.0/8], "
                          "auth_failures: 3, lockout: 10m}\n", source="new")
    plan = plan_reload(parse_config(BASE), loaded)
    assert plan.live == ["security.auth_failures", "security.lockout", "security.rate_exempt",
                         "security.rate_limit"]
    assert plan.restart == []
    effective = effective_config(parse_config(BASE), loaded, plan)
    assert effective.security.rate_limit == 50 and effective.security.lockout == 600
