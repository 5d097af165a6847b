"""Configuration: YAML into frozen dataclasses, errors naming key path and line, documented."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from freecall.config import (
    Config,
    ConfigError,
    HostPort,
    Listener,
    PortRange,
    UserConfig,
    config_to_dict,
    ensure_auto_user,
    load_config,
    parse_config,
    parse_duration,
    reference_markdown,
    resolve_config,
    softphone_instructions,
)

ROOT = Path(__file__).resolve().parents[1]
ETC = ROOT / "etc" / "freecall.yaml"
REFERENCE = ROOT / "docs" / "configuration.md"
ENV = {"HOME": "/home/tester", "USER": "tester"}


def problems_of(text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, **kwargs)
    return [str(p) for p in info.value.problems]


def one_problem(text: str) -> str:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


# --- defaults, the documented file and the generated reference --------------------------------


def test_no_file_gives_working_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"HOME": str(tmp_path)}, hostname="box.example")
    assert [str(x) for x in cfg.sip.listen] == ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
    assert cfg.node.name == "box"
    assert cfg.node.state_dir == str(tmp_path / ".local/share/freecall")
    assert cfg.sip.realm == "box"
    assert cfg.sip.allow_register_from == (ipaddress.ip_network("127.0.0.0/8"),
                                           ipaddress.ip_network("::1/128"))
    assert cfg.sip.tls.certificate == str(tmp_path / ".local/share/freecall/tls/cert.pem")
    assert cfg.control.token_file.endswith("/control.token")
    assert cfg.openpgp.home.endswith("/freecall/gnupg")
    assert cfg.security.policy == "prefer"
    assert cfg.node.role == "endpoint"
    assert dict(cfg.users) == {}
    assert cfg.sip.auto_user is True


def test_etc_file_documents_exactly_the_defaults() -> None:
    assert parse_config(ETC.read_text(), source=str(ETC)) == Config()
    assert load_config(ETC, environ=ENV, hostname="h") == load_config(None, environ=ENV,
                                                                      hostname="h")


def _leaf_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict) and value and prefix not in ("users", "routes"):
        out: set[str] = set()
        for key, sub in value.items():
            out |= _leaf_paths(sub, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix}


def test_etc_file_lists_every_key() -> None:
    written = _leaf_paths(yaml.safe_load(ETC.read_text()))
    schema = _leaf_paths(config_to_dict(Config()))
    assert written == schema


def test_reference_doc_is_current() -> None:
    assert REFERENCE.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `python -m freecall.config --reference "
        "> docs/configuration.md`")


def test_reference_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "freecall.config", "--reference"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == reference_markdown()


def test_every_field_has_help() -> None:
    def walk(cls: type[Any]) -> None:
        for f in dataclasses.fields(cls):
            if f.metadata.get("section"):
                walk(f.default_factory)  # type: ignore[arg-type]
            else:
                assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name}"

    walk(Config)


def test_dataclasses_are_frozen_with_slots() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sip.realm = "x"  # type: ignore[misc]
    assert not hasattr(cfg, "__dict__")
    assert not hasattr(cfg.sip, "__dict__")
    with pytest.raises(TypeError):
        cfg.users["x"] = UserConfig(password="p")  # type: ignore[index]


def test_round_trip_through_plain_values() -> None:
    text = """
sip:
  listen: ["udp:[::1]:5060", "tls:127.0.0.1:0"]
  domains: [Example.ORG.]
  timers: {t1: 200ms}
users: {alice: {password: secret}}
routes: {example.net: "sip:192.0.2.20:5061;transport=tls"}
media: {turn: [{server: "turn.example.net", username: u, password: p}]}
"""
    cfg = parse_config(text)
    assert cfg.sip.domains == ("example.org",)
    assert parse_config(yaml.safe_dump(config_to_dict(cfg))) == cfg


# --- the error format --------------------------------------------------------------------------


def test_error_names_key_path_and_line() -> None:
    text = "node:\n  name: n\nsip:\n  listen:\n    - udp:127.0.0.1:5060\n    # comment\n" \
           "    - udpx:127.0.0.1:5060\n"
    assert one_problem(text) == \
        "sip.listen[1]: line 7: bad transport 'udpx' (expected udp, tcp or tls)"


def test_config_error_lists_every_problem_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("node:\n  role: relai\nsecurity:\n  on_mitm: hangp\nsip:\n  realmm: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}: node.role: line 2: bad value 'relai' (expected endpoint or relay); "
        "did you mean 'relay'?",
        f"{path}: security.on_mitm: line 4: bad value 'hangp' (expected hangup or warn); "
        "did you mean 'hangup'?",
        f"{path}: sip.realmm: line 6: unknown key; did you mean 'sip.realm'?",
    ]


def test_unknown_key_in_the_wrong_section_points_to_the_right_one() -> None:
    assert one_problem("sip:\n  state_dir: /x\n") == \
        "sip.state_dir: line 2: unknown key; did you mean 'node.state_dir'?"
    assert one_problem("nod:\n  name: x\n") == "nod: line 1: unknown key; did you mean 'node'?"
    assert "known keys here" in one_problem("log:\n  zzz: 1\n")


def test_yaml_syntax_error_has_a_line() -> None:
    msg = one_problem("sip:\n  listen: [a\n  public: []\n")
    assert msg.startswith("line ") and "YAML syntax error" in msg


def test_duplicate_keys_are_reported() -> None:
    assert one_problem("log:\n  level: info\n  level: debug\n") == \
        "log.level: line 3: duplicate key (first at line 2)"


def test_top_level_must_be_a_mapping() -> None:
    assert "must be a mapping" in one_problem("- a\n- b\n")


def test_wrong_shapes() -> None:
    assert one_problem("sip:\n  domains: example.org\n") == \
        "sip.domains: line 2: expected a list, e.g. [example.org]"
    assert one_problem("sip: [1]\n") == "sip: line 1: expected a mapping (key: value)"
    assert one_problem("log:\n  level: [info]\n") == \
        "log.level: line 2: expected one of `debug`, `info`, `warning`, `error`, got a list"


# --- YAML 1.1 traps ----------------------------------------------------------------------------


def test_values_are_read_as_written() -> None:
    cfg = parse_config("security:\n  policy: off\nusers:\n  alice: {password: 0123}\n"
                       "sip:\n  domains: [no]\n")
    assert cfg.security.policy == "off"
    assert cfg.users["alice"].password == "0123"
    assert cfg.sip.domains == ("no",)


def test_booleans_and_nulls() -> None:
    cfg = parse_config("peering:\n  mdns: no\n  listen: null\nlog:\n  sip_trace: yes\n"
                       "control:\n  listen: ~\n")
    assert cfg.peering.mdns is False and cfg.log.sip_trace is True
    assert cfg.peering.listen is None and cfg.control.listen is None
    assert one_problem("peering:\n  mdns: maybe\n") == \
        "peering.mdns: line 2: expected true or false, got 'maybe'"


def test_merge_keys_and_anchors() -> None:
    text = "users:\n  alice: &u {password: a}\n  bob:\n    <<: *u\n    password: b\n"
    cfg = parse_config(text)
    assert cfg.users["alice"].password == "a" and cfg.users["bob"].password == "b"


def test_empty_file_and_empty_sections_give_defaults() -> None:
    assert parse_config("") == Config()
    assert parse_config("# nothing\n") == Config()
    assert parse_config("sip:\nnode:\n") == Config()


# --- value types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("udp:127.0.0.1:5060", Listener("udp", "127.0.0.1", 5060)),
    ("tls:[::1]:5061", Listener("tls", "::1", 5061)),
    ("TCP:0.0.0.0:0", Listener("tcp", "0.0.0.0", 0)),
    ("udp:[::]:5062", Listener("udp", "::", 5062)),
])
def test_listener_parse(text: str, expected: Listener) -> None:
    assert Listener.parse(text) == expected
    assert Listener.parse(str(expected)) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("udpx:127.0.0.1:5060", "bad transport 'udpx' (expected udp, tcp or tls)"),
    ("127.0.0.1:5060", "bad transport '127.0.0.1'"),
    ("udp", "expected TRANSPORT:HOST:PORT"),
    ("udp:localhost:5060", "not an IP address: 'localhost'"),
    ("udp:::1:5060", "an IPv6 address needs brackets"),
    ("udp:[::1:5060", "missing ']'"),
    ("udp:127.0.0.1:70000", "port 70000 out of range"),
    ("udp:127.0.0.1:50x", "bad port '50x'"),
    ("udp:127.0.0.1", "missing port"),
])
def test_listener_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Listener.parse(text)
    assert message in str(info.value)


@given(transport=st.sampled_from(["udp", "tcp", "tls"]), port=st.integers(0, 65535),
       ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_listener_round_trip(transport: str, port: int, ip: Any) -> None:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    lst = Listener.parse(f"{transport}:{host}:{port}")
    assert (lst.transport, ipaddress.ip_address(lst.host), lst.port) == (transport, ip, port)
    assert Listener.parse(str(lst)) == lst


def test_host_port_and_port_range() -> None:
    assert HostPort.parse("seed.example.net", default_port=5064) == \
        HostPort("seed.example.net", 5064)
    assert str(HostPort.parse("[2001:db8::1]:3478")) == "[2001:db8::1]:3478"
    with pytest.raises(ValueError, match="not an IP"):
        HostPort.parse("name:53", ip_only=True)
    rng = PortRange.parse("20000-20001")
    assert 20000 in rng and 20002 not in rng and len(rng) == 2
    with pytest.raises(ValueError, match="empty port range"):
        PortRange.parse("5-5")


@pytest.mark.parametrize(("text", "seconds"), [
    ("2", 2.0), ("2.5", 2.5), ("500ms", 0.5), ("3m", 180.0), ("1h", 3600.0), ("1d", 86400.0),
    (" 4 s ", 4.0), (".5", 0.5),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("sip:\n  timers: {t1: 2x}\n", "sip.timers.t1: line 2: bad duration '2x'"),
    ("dns:\n  timeout: 1:30\n", "dns.timeout: line 2: bad duration '1:30'"),
    ("dns:\n  timeout: 0\n", "dns.timeout: line 2: must be between 0.05 and 60"),
    ("sip:\n  registration: {min_expires: 1.5}\n", "must be whole seconds"),
    ("sip:\n  max_message_size: lots\n", "expected an integer, got 'lots'"),
    ("sip:\n  allow_register_from: [10.0.0.1/8]\n",
     "sip.allow_register_from[0]: line 2: bad CIDR '10.0.0.1/8' (host bits set"),
    ("sip:\n  allow_register_from: [10.0.0.0/33]\n", "bad CIDR '10.0.0.0/33'"),
    ("sip:\n  advertise: 0.0.0.0\n", "0.0.0.0 is a wildcard"),
    ("sip:\n  domains: [-bad-.org]\n", "not a host name or IP address"),
    ("media:\n  address: example.org\n", "not an IP address"),
    ("media:\n  ports: 30000-20000\n", "empty port range"),
    ("dns:\n  servers: [dns.example.org]\n", "not an IP address: 'dns.example.org'"),
    ("peering:\n  listen: tcp:0.0.0.0:5064\n", "bad transport 'tcp' (expected udp)"),
    ("openpgp:\n  key: ABCD\n", "bad OpenPGP fingerprint"),
    ("routes:\n  example.net: http://x\n", 'routes["example.net"]: line 2: bad SIP URI'),
    ("routes:\n  'a b': sip:x\n", 'routes["a b"]: line 2: not a host name'),
    ("users:\n  'a b': {password: x}\n", "bad user name 'a b'"),
    ("users:\n  bob: {}\n", "users.bob: line 2: set exactly one of password and password_file"),
    ("node:\n  name: 'my node'\n", "bad node name"),
    ("security:\n  policy: required\n", "did you mean 'require'?"),
    ("log:\n  level: 3\n", "bad value '3' (expected debug, info, warning or error)"),
    ("security:\n  auth_failures: -1\n", "security.auth_failures: line 2: must be between 0"),
    ("security:\n  lockout: 0\n", "security.lockout: line 2: must be between 1"),
    ("security:\n  rate_window: fast\n", "security.rate_window: line 2: bad duration 'fast'"),
    ("security:\n  rate_limit: many\n", "security.rate_limit: line 2:"),
    ("security:\n  rate_exempt: [10.0.0.1/8]\n",
     "security.rate_exempt[0]: line 2: bad CIDR '10.0.0.1/8' (host bits set"),
    ("security:\n  max_sources: 0\n", "security.max_sources: line 2: must be between 1"),
])
def test_bad_values(yaml_text: str, message: str) -> None:
    found = problems_of(yaml_text)
    assert any(message in p for p in found), found


def test_good_values_are_normalised() -> None:
    cfg = parse_config("""
sip:
  domains: [Example.ORG., 192.0.2.1, "[2001:db8::1]"]
  advertise: Node.Example.org
  allow_register_from: [192.168.1.0/24, "2001:db8::/32"]
openpgp:
  key: "0123 4567 89ab cdef 0123  4567 89ab cdef 0123 4567"
routes:
  bob@Example.NET: "sips:[2001:db8::2]:5061"
dns:
  servers: ["127.0.0.1:5353", "::1"]
""")
    assert cfg.sip.domains == ("example.org", "192.0.2.1", "2001:db8::1")
    assert cfg.sip.advertise == "node.example.org"
    assert cfg.openpgp.key == "0123456789ABCDEF0123456789ABCDEF01234567"
    assert dict(cfg.routes) == {"bob@example.net": "sips:[2001:db8::2]:5061"}
    assert cfg.dns.servers == (HostPort("127.0.0.1", 5353), HostPort("::1", 53))


# --- cross-key checks ----------------------------------------------------------------------------


def test_bind_conflicts_are_found() -> None:
    assert one_problem("control:\n  listen: 127.0.0.1:5060\n") == \
        "control.listen: line 2: tcp port 5060 on 127.0.0.1 is already used by sip.listen[1]"
    found = problems_of("sip:\n  listen: [udp:127.0.0.1:5062]\n  public: [udp:0.0.0.0:5062]\n")
    assert found == ["sip.public[0]: line 3: udp port 5062 on 0.0.0.0 is already used by "
                     "sip.listen[0]"]
    # a tcp listener and a udp one may share a port; tls is tcp
    parse_config("sip:\n  listen: [udp:127.0.0.1:7000, tcp:127.0.0.1:7000]\n  public: []\n")
    assert "already used" in one_problem(
        "sip:\n  listen: [tcp:127.0.0.1:7000, tls:127.0.0.1:7000]\n  public: []\n")
    # IPv6 wildcard sockets take IPv4 too
    assert "already used" in one_problem("sip:\n  public: ['udp:[::]:5060']\n")


def test_udp_listener_inside_the_media_range() -> None:
    # the listeners are defaults, so there is no line to name
    assert problems_of("media:\n  ports: 5000-6000\n") == [
        "sip.listen[0]: udp port 5060 lies inside media.ports (5000-6000)",
        "peering.listen: udp port 5064 lies inside media.ports (5000-6000)",
    ]


def test_registration_and_timer_order() -> None:
    assert one_problem("sip:\n  registration: {min_expires: 2h}\n") == (
        "sip.registration.min_expires: line 2: needs min_expires <= default_expires <= "
        "max_expires, got 7200 / 600 / 3600")
    assert one_problem("sip:\n  timers: {t1: 5s, t2: 1s}\n").startswith("sip.timers.t2: line 2")


def test_tls_certificate_and_key_go_together() -> None:
    assert "given together" in one_problem("sip:\n  tls: {certificate: c.pem}\n")


def test_cross_checks_skip_values_that_already_failed() -> None:
    # sip.listen is invalid, so its defaults must not be blamed for the control port
    found = problems_of("sip:\n  listen: [udpx:127.0.0.1:1]\ncontrol:\n  listen: 127.0.0.1:5060\n")
    assert found == ["sip.listen[0]: line 2: bad transport 'udpx' (expected udp, tcp or tls)"]


# --- overrides and resolution ------------------------------------------------------------------


def test_command_line_overrides(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("node:\n  role: endpoint\n  state_dir: state\n")
    cfg = load_config(path, overrides={"node.role": "relay", "node.state_dir": None}, environ=ENV)
    assert cfg.node.role == "relay"
    assert cfg.node.state_dir == str(tmp_path / "state")  # relative to the file
    cfg = load_config(path, overrides={"node.state_dir": tmp_path / "elsewhere"}, environ=ENV)
    assert cfg.node.state_dir == str(tmp_path / "elsewhere")
    # a relative --state-dir is relative to the working directory, not to the file
    cfg = load_config(path, overrides={"node.state_dir": "rel"}, environ=ENV)
    assert cfg.node.state_dir == str(Path.cwd() / "rel")
    cfg = load_config(None, overrides={"log.level": "debug", "sip.listen": ["udp:127.0.0.1:0"]},
                      environ=ENV)
    assert cfg.log.level == "debug" and cfg.sip.listen == (Listener("udp", "127.0.0.1", 0),)
    assert problems_of("", overrides={"node.role": "boss"}) == [
        "node.role: command line: bad value 'boss' (expected endpoint or relay)"]


def test_paths_expand_home_and_live_in_the_state_dir(tmp_path: Path) -> None:
    cfg = parse_config("node:\n  state_dir: ~/fc\nsip:\n  tls: {ca_file: ca.pem}\n"
                       "control:\n  token_file: ~/tok\n")
    (tmp_path / "fc").mkdir()
    (tmp_path / "fc" / "ca.pem").write_text("x")
    res = resolve_config(cfg, environ={"HOME": str(tmp_path)}, hostname="h")
    assert res.node.state_dir == str(tmp_path / "fc")
    assert res.sip.tls.ca_file == str(tmp_path / "fc" / "ca.pem")
    assert res.control.token_file == str(tmp_path / "tok")
    assert res.control.socket == str(tmp_path / "fc" / "control.sock")
    assert res.state_dir == tmp_path / "fc"


def test_realm_defaults_to_first_domain() -> None:
    cfg = load_config(None, overrides={"sip.domains": ["b.example", "a.example"]}, environ=ENV)
    assert cfg.sip.realm == "b.example"


def test_named_files_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(f"node: {{state_dir: {tmp_path}}}\n"
                    "sip:\n  tls: {certificate: c.pem, private_key: k.pem}\n"
                    "users:\n  bob: {password_file: bob.pw}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "sip.tls.certificate: file" in text and "does not exist" in text
    assert "users.bob.password_file: file" in text
    (tmp_path / "c.pem").write_text("c")
    (tmp_path / "k.pem").write_text("k")
    (tmp_path / "bob.pw").write_text("s3cret\n")
    cfg = load_config(path)
    assert cfg.users["bob"].password == "s3cret"
    assert cfg.sip.tls.private_key == str(tmp_path / "k.pem")


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "nope.yaml")


def test_config_check_command(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sip:\n  listen: [udpx:127.0.0.1:5060]\n")
    out = subprocess.run([sys.executable, "-m", "freecall.config", "check", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert f"{path}: sip.listen[0]: line 2: bad transport 'udpx'" in out.stderr


# --- the generated user --------------------------------------------------------------------------


def test_auto_user_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    cfg = load_config(None, overrides={"node.state_dir": tmp_path}, environ=ENV)
    with_user, auto = ensure_auto_user(cfg, environ={"USER": "carol"}, urandom=lambda n: b"\1" * n)
    assert auto is not None and auto.created and auto.name == "carol"
    assert with_user.users["carol"].password == auto.password and len(auto.password) == 16
    assert stat.S_IMODE(os.stat(auto.path).st_mode) == 0o600
    assert json.loads(auto.path.read_text()) == {"user": "carol", "password": auto.password}
    # a later start (even as another login) keeps the same credentials
    again, auto2 = ensure_auto_user(cfg, environ={"USER": "dave"})
    assert auto2 is not None and not auto2.created
    assert (auto2.name, auto2.password) == ("carol", auto.password)
    assert dict(again.users) == dict(with_user.users)
    text = softphone_instructions(again, "carol", password=f"in {auto.path}")
    assert "SIP address : sip:carol@127.0.0.1" in text
    assert "proxy       : 127.0.0.1:5060 (tcp, udp)" in text
    assert f"password    : in {auto.path}" in text and auto.password not in text
    cfg_domain = load_config(None, overrides={"sip.domains": ["example.org"],
                                              "sip.listen": ["tcp:0.0.0.0:5070"]}, environ=ENV)
    text = softphone_instructions(cfg_domain, "carol", password="s3")
    assert "sip:carol@example.org" in text and "127.0.0.1:5070 (tcp)" in text
    assert 'outbound="sip:127.0.0.1:5070;transport=tcp"' in text and "s3" in text


def test_no_auto_user_when_users_are_configured_or_it_is_off(tmp_path: Path) -> None:
    cfg = load_config(None, overrides={"node.state_dir": tmp_path,
                                       "users": {"alice": {"password": "x"}}}, environ=ENV)
    assert ensure_auto_user(cfg) == (cfg, None)
    cfg = load_config(None, overrides={"node.state_dir": tmp_path, "sip.auto_user": False},
                      environ=ENV)
    assert ensure_auto_user(cfg) == (cfg, None)
    assert not (tmp_path / "auto-user.json").exists()


def test_corrupt_auto_user_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "auto-user.json").write_text("{not json")
    cfg = load_config(None, overrides={"node.state_dir": tmp_path}, environ=ENV)
    with pytest.raises(ConfigError, match=r"auto-user\.json"):
        ensure_auto_user(cfg)


def test_auto_user_name_falls_back_when_user_is_unset(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    cfg = load_config(None, overrides={"node.state_dir": state}, environ=ENV)
    _, auto = ensure_auto_user(cfg, environ={})
    assert auto is not None and auto.name  # the passwd entry's name, sanitised
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700  # a new state directory is private


def test_security_limits() -> None:
    """Lockout and rate-limit keys (issue 11): defaults, durations and CIDRs as written."""
    default = Config().security
    assert (default.auth_failures, default.auth_window, default.lockout) == (5, 60.0, 300.0)
    assert (default.rate_limit, default.rate_window, default.rate_block) == (200, 2.0, 60.0)
    assert default.rate_softphones is False and default.rate_exempt == ()
    cfg = parse_config("security:\n  auth_failures: 3\n  auth_window: 2m\n  lockout: 1h\n"
                       "  rate_limit: 0\n  rate_window: 500ms\n  rate_block: 10s\n"
                       "  rate_softphones: true\n  rate_exempt: [192.0.2.0/24]\n"
                       "  max_sources: 50\n")
    sec = cfg.security
    assert (sec.auth_failures, sec.auth_window, sec.lockout) == (3, 120.0, 3600.0)
    assert (sec.rate_limit, sec.rate_window, sec.rate_block) == (0, 0.5, 10.0)
    assert sec.rate_softphones is True and sec.max_sources == 50
    assert sec.rate_exempt == (ipaddress.ip_network("192.0.2.0/24"),)
