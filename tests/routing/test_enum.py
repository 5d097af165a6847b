"""ENUM (RFC 6116 / RFC 3761): numbers, domains, substitution expressions and rule order."""

from __future__ import annotations

import pytest

from freecall.routing.e164 import (
    MAX_NON_TERMINAL,
    EnumNext,
    EnumUri,
    e164_of,
    enum_domain,
    enum_lookup,
    enum_rules,
    enum_services,
    parse_substitution,
    substitute,
)
from freecall.routing.plan import TIMEOUT, Naptr, Outcome, Query, run_sync
from freecall.sip.uri import parse_uri
from routing.fakedns import FakeDns

AUS = "+441632960083"  # the number of the RFC examples
DOMAIN = "3.8.0.0.6.9.2.3.6.1.4.4.e164.arpa"


@pytest.mark.parametrize(
    ("uri", "aus"),
    [
        ("tel:+44-1632-960083", AUS),  # visual separators go (RFC 3761 section 2.1)
        ("tel:+44(1632)960.083;phone-context=ignored", AUS),
        ("sip:+441632960083@example.net", AUS),  # a leading "+"
        ("sip:+44-1632-960083@example.net;user=phone", AUS),
        ("sip:+441632960083;isub=1234@example.net;user=phone", AUS),  # parameters after ";"
        ("sip:%2B441632960083@example.net;user=phone", AUS),  # escaped "+"
        ("tel:01632960083;phone-context=+44", None),  # a local number is not E.164
        ("sip:01632960083@example.net;user=phone", None),
        ("sip:alice@example.net", None),
        ("sip:+1234567890123456@example.net", None),  # more than 15 digits
        ("sip:+44abc@example.net", None),
        ("sip:example.net", None),
        ("mailto:bob@example.net", None),
    ],
)
def test_e164_of(uri: str, aus: str | None) -> None:
    assert e164_of(parse_uri(uri)) == aus


def test_enum_domain_rfc6116_section_2_4() -> None:
    assert enum_domain(AUS, "e164.arpa") == DOMAIN
    assert enum_domain(AUS, "E164.Example.") == "3.8.0.0.6.9.2.3.6.1.4.4.e164.example"


@pytest.mark.parametrize(
    ("regexp", "result"),
    [
        ("!^.*$!sip:info@example.com!", "sip:info@example.com"),  # RFC 3761 section 4.1
        ("!^\\+44(.*)$!sip:\\1@example.net!", "sip:1632960083@example.net"),  # back-reference
        ("!^\\+44([0-9]{4})([0-9]*)$!sip:\\2@\\1.example.net!", "sip:960083@1632.example.net"),
        ("/^\\+44(.*)$/sip:0\\1@example.net/", "sip:01632960083@example.net"),  # another delim
        ("!^\\+44(.*)$!sip:\\1@example.net;x=\\!!", "sip:1632960083@example.net;x=!"),
        ("#^\\+44[[:digit:]]+$#sip:pstn@example.net#", "sip:pstn@example.net"),  # POSIX class
        ("!^\\+44!sip:+44!", "sip:+441632960083"),  # sed semantics: the match only
        ("!^\\+44(.*)$!SIP:\\1@EXAMPLE.NET!i", "SIP:1632960083@EXAMPLE.NET"),
        ("!^\\+1(.*)$!sip:\\1@example.net!", None),  # does not match: the rule does not apply
        ("!^\\+44(.*)$!sip:\\2@example.net!", None),  # no group 2
        ("!^.*$!sip:x@example.net", None),  # unterminated
        ("!^.*$!sip:x@example.net!g", None),  # only the "i" flag exists
        ("1^.*$1sip:x@example.net1", None),  # digits cannot delimit
        ("!^(.*$!sip:x@example.net!", None),  # a bad ERE
        ("", None),
    ],
)
def test_substitution_expressions_rfc3402_section_3_2(regexp: str, result: str | None) -> None:
    assert substitute(regexp, AUS) == result


def test_case_insensitive_flag() -> None:
    sub = parse_substitution("!^\\+44(1632)!sip:\\1@x!i")
    assert sub.pattern.flags & 2  # re.IGNORECASE


@pytest.mark.parametrize(
    ("field", "types"),
    [
        ("E2U+sip", ["sip"]),
        ("e2u+SIP", ["sip"]),
        ("E2U+voice:tel+sip", ["voice", "sip"]),
        ("E2U+email:mailto", ["email"]),
        ("SIP+D2U", None),  # RFC 3263's application, not ENUM
        ("E2U+", None),
        ("E2U", []),  # a non-terminal rule's field
    ],
)
def test_enum_services_rfc6116_section_3_4_3(field: str, types: list[str] | None) -> None:
    assert enum_services(field) == types


def test_rfc3761_example_picks_the_sip_rule() -> None:
    """RFC 3761 section 4.1: SIP preferred, then H.323, then mail; we take the SIP one."""
    records = [
        Naptr(10, 101, "u", "E2U+h323", "!^.*$!h323:info@example.com!", "."),
        Naptr(10, 100, "u", "E2U+sip", "!^.*$!sip:info@example.com!", "."),
        Naptr(10, 102, "u", "E2U+msg", "!^.*$!mailto:info@example.com!", "."),
    ]
    rules = enum_rules(records, AUS)
    assert rules == [EnumUri(parse_uri("sip:info@example.com"), 10, 100)]  # type: ignore[arg-type]


def test_rules_sorted_by_preference_within_the_lowest_applicable_order() -> None:
    records = [
        Naptr(10, 20, "u", "E2U+sip", "!^.*$!sip:second@example.com!", "."),
        Naptr(10, 10, "U", "E2U+sip", "!^.*$!sips:first@example.com!", "."),
        Naptr(20, 1, "u", "E2U+sip", "!^.*$!sip:never@example.com!", "."),  # higher order
        Naptr(5, 1, "u", "E2U+h323", "!^.*$!h323:x@example.com!", "."),  # not applicable
        Naptr(5, 2, "u", "E2U+sip", "!^\\+1.*$!sip:us@example.com!", "."),  # no match
        Naptr(5, 3, "u", "E2U+sip", "!^.*$!mailto:x@example.com!", "."),  # not a SIP URI
    ]
    rules = enum_rules(records, AUS)
    assert [str(r.uri) for r in rules if isinstance(r, EnumUri)] == [
        "sips:first@example.com", "sip:second@example.com"]


def test_non_terminal_rule_names_the_next_domain() -> None:
    records = [Naptr(10, 10, "", "E2U+sip", "", "numbers.example.net.")]
    assert enum_rules(records, AUS) == [EnumNext("numbers.example.net", 10, 10)]


def test_lookup_tries_suffixes_in_order_and_follows_non_terminal_rules() -> None:
    dns = (FakeDns()
           .naptr(enum_domain(AUS, "e164.example"),
                  (10, 10, "", "E2U", "", "private.example"))
           .naptr("private.example",
                  (10, 10, "u", "E2U+sip", "!^\\+44(.*)$!sip:\\1@private.example!", ".")))
    found = run_sync(enum_lookup(AUS, ["e164.arpa", "e164.example"]), dns.answer)
    assert [str(u) for u in found.uris] == ["sip:1632960083@private.example"]
    assert found.domain == enum_domain(AUS, "e164.example")
    # both suffixes in the first batch, then the non-terminal's domain
    assert dns.asked == [Query(DOMAIN, "NAPTR"),
                         Query(enum_domain(AUS, "e164.example"), "NAPTR"),
                         Query("private.example", "NAPTR")]


def test_first_suffix_wins() -> None:
    dns = (FakeDns()
           .naptr(DOMAIN, (100, 10, "u", "E2U+sip", "!^.*$!sip:public@example.com!", "."))
           .naptr(enum_domain(AUS, "e164.example"),
                  (100, 10, "u", "E2U+sip", "!^.*$!sip:private@example.com!", ".")))
    found = run_sync(enum_lookup(AUS, ["e164.arpa", "e164.example"]), dns.answer)
    assert [str(u) for u in found.uris] == ["sip:public@example.com"]


def test_non_terminal_loops_and_long_chains_end() -> None:
    dns = FakeDns().naptr(DOMAIN, (10, 10, "", "", "", "loop.example"))
    dns.naptr("loop.example", (10, 10, "", "", "", DOMAIN))
    found = run_sync(enum_lookup(AUS, ["e164.arpa"]), dns.answer)
    assert found.uris == () and len(dns.asked) == 2

    chain = FakeDns().naptr(DOMAIN, (10, 10, "", "", "", "c0.example"))
    for i in range(10):
        chain.naptr(f"c{i}.example", (10, 10, "", "", "", f"c{i + 1}.example"))
    found = run_sync(enum_lookup(AUS, ["e164.arpa"]), chain.answer)
    assert found.uris == () and len(chain.asked) == 1 + MAX_NON_TERMINAL


def test_failures_are_reported() -> None:
    dns = FakeDns().put(DOMAIN, "NAPTR", TIMEOUT)
    found = run_sync(enum_lookup(AUS, ["e164.arpa"]), dns.answer)
    assert found.uris == () and found.errors == {Outcome.TIMEOUT}
    nothing = run_sync(enum_lookup(AUS, ["e164.arpa"]), FakeDns().answer)
    assert nothing.uris == () and nothing.errors == frozenset()
