"""ENUM (RFC 6116, which obsoletes RFC 3761): E.164 number -> SIP URIs through NAPTR, pure.

* The Application Unique String (AUS) is the number with its "+" and digits only
  (RFC 6116 section 2.1 / RFC 3761 section 2.1): ``tel:+44-1632-960083`` -> ``+441632960083``.
  Only global numbers are E.164 numbers: a local number (no "+") is never looked up
  (RFC 6116 section 3.7, collision avoidance).
* The key (First Well Known Rule, identity) becomes a domain: the digits reversed, separated by
  dots, under each suffix in turn (``3.8.0.0.6.9.2.3.6.1.4.4.e164.arpa``; RFC 6116 section 2.4).
* Each NAPTR there is a rule (RFC 3403 section 4.1, RFC 3402 section 3.2): terminal rules have
  the flag "u" and an "E2U+<enumservice>" service field (RFC 6116 section 3.4.3); their regexp, a
  substitution expression ``delim ERE delim replacement delim [i]``, applied to the AUS gives
  the URI.  Non-terminal rules (empty flags) point at another domain whose NAPTRs are looked up
  with the same AUS; they are followed to a bounded depth.
* Rules are taken in order, then preference; once a rule of some order applies, rules of a
  higher order are not considered (RFC 3403 section 4.1).  Only the "sip" enumservice
  (RFC 3764) gives a usable result here, and only sip:/sips: URIs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..sip.errors import SipParseError
from ..sip.uri import SipUri, TelUri, Uri, parse_uri, unescape
from .plan import Naptr, Outcome, Plan, Query, ask, normalize_name

E164_RE = re.compile(r"\+[0-9]{1,15}")
"""ITU-T E.164: at most 15 digits after the "+"."""

VISUAL_SEPARATORS = frozenset("-.()")  # RFC 3966 section 5.1.1
MAX_NON_TERMINAL = 4  # how many non-terminal NAPTR hops are followed


def e164_of(uri: Uri) -> str | None:
    """The AUS of a URI that names a global telephone number, else None.

    ``tel:+...`` (RFC 3966); ``sip:+...@host`` with ``user=phone`` or simply a leading "+"
    (RFC 3261 section 19.1.6): the user part up to its first ";" (``;isub=``, ``;postd=``
    parameters), visual separators removed.
    """
    if isinstance(uri, TelUri):
        number = uri.digits if uri.is_global else ""
    elif isinstance(uri, SipUri) and uri.user is not None:
        user = unescape(uri.user).split(";", 1)[0]
        phone = (uri.param("user") or "").lower() == "phone"
        if not (phone or user.startswith("+")):
            return None
        number = "".join(ch for ch in user if ch not in VISUAL_SEPARATORS)
    else:
        return None
    return number if E164_RE.fullmatch(number) else None


def enum_domain(aus: str, suffix: str) -> str:
    """RFC 6116 section 2.4: the digits reversed, dot-separated, then the suffix."""
    digits = aus.lstrip("+")
    return ".".join(reversed(digits)) + "." + normalize_name(suffix)


# -- RFC 3402 section 3.2 substitution expressions ----------------------------------------------

_POSIX_CLASSES = {
    "[:digit:]": "0-9",
    "[:alpha:]": "A-Za-z",
    "[:alnum:]": "0-9A-Za-z",
    "[:upper:]": "A-Z",
    "[:lower:]": "a-z",
    "[:space:]": " \\t",
}


@dataclass(frozen=True, slots=True)
class Substitution:
    """A parsed ``delim ERE delim repl delim [i]``: the compiled ERE and the replacement parts
    (literal strings, and ints for back-references \\1 to \\9)."""

    pattern: re.Pattern[str]
    replacement: tuple[str | int, ...]

    def apply(self, text: str) -> str | None:
        """The substituted string, or None when the ERE does not match (the rule does not
        apply).  As in sed, only the matched part of ``text`` is replaced."""
        match = self.pattern.search(text)
        if match is None:
            return None
        out: list[str] = []
        for part in self.replacement:
            if isinstance(part, int):
                if part > (self.pattern.groups or 0):
                    return None  # a back-reference to a group that does not exist
                out.append(match.group(part) or "")
            else:
                out.append(part)
        return text[: match.start()] + "".join(out) + text[match.end() :]


def parse_substitution(text: str) -> Substitution:
    """Parse a NAPTR regexp field (RFC 3402 section 3.2).  Raises ValueError.

    The delimiter is the first character (not a digit 1-9, not "i"); "\\<delim>" is a literal
    delimiter in both halves; in the replacement "\\1".."\\9" are back-references and "\\\\" is a
    backslash.  The ERE is POSIX extended syntax, which Python's ``re`` reads the same for the
    expressions ENUM uses; POSIX bracket classes ([:digit:]) are translated.
    """
    if len(text) < 3:
        raise ValueError(f"substitution expression too short: {text!r}")
    delim = text[0]
    if delim in "123456789i\\":
        raise ValueError(f"bad delimiter {delim!r} in {text!r}")
    fields: list[str] = []
    current: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == delim and not fields:
                current.append(re.escape(delim))  # a literal delimiter inside the ERE
            else:
                current.append(ch + nxt)  # the replacement's escapes are read below
            i += 2
            continue
        if ch == delim:
            fields.append("".join(current))
            current = []
            i += 1
            if len(fields) == 2:
                break
            continue
        current.append(ch)
        i += 1
    if len(fields) != 2:
        raise ValueError(f"unterminated substitution expression {text!r}")
    flags = text[i:]
    if flags not in ("", "i"):
        raise ValueError(f"bad flags {flags!r} in {text!r}")
    ere, repl = fields
    for posix, python in _POSIX_CLASSES.items():
        ere = ere.replace(posix, python)
    try:
        pattern = re.compile(ere, re.IGNORECASE if flags == "i" else 0)
    except re.error as exc:
        raise ValueError(f"bad regular expression in {text!r}: {exc}") from None
    return Substitution(pattern, _replacement_parts(repl))


def _replacement_parts(repl: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    literal: list[str] = []
    i = 0
    while i < len(repl):
        ch = repl[i]
        if ch == "\\" and i + 1 < len(repl):
            nxt = repl[i + 1]
            if nxt in "123456789":
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(int(nxt))
            else:
                literal.append(nxt)  # "\\" -> "\", "\<delim>" (already folded), "\x" -> "x"
            i += 2
            continue
        literal.append(ch)
        i += 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def substitute(regexp: str, aus: str) -> str | None:
    """Apply a NAPTR regexp to the AUS; None if it is malformed or does not match."""
    try:
        return parse_substitution(regexp).apply(aus)
    except ValueError:
        return None


# -- rules ----------------------------------------------------------------------------------------


def enum_services(field: str) -> list[str] | None:
    """The enumservice types of an RFC 6116 section 3.4.3 service field, lower case
    (``E2U+sip`` -> ["sip"], ``E2U+voice:tel+sip`` -> ["voice", "sip"]); None if the field is
    not an E2U one (another DDDS application shares the NAPTR)."""
    parts = field.lower().split("+")
    if parts[0] != "e2u":
        return None
    types = [p.split(":", 1)[0] for p in parts[1:]]
    if not all(types):
        return None
    return types


@dataclass(frozen=True, slots=True)
class EnumUri:
    """A terminal rule's result: a SIP URI for the number."""

    uri: SipUri
    order: int
    preference: int


@dataclass(frozen=True, slots=True)
class EnumNext:
    """A non-terminal rule: look for NAPTRs of the same AUS at ``domain``."""

    domain: str
    order: int
    preference: int


EnumRule = EnumUri | EnumNext


def enum_rules(records: Sequence[Naptr], aus: str, service: str = "sip") -> list[EnumRule]:
    """The applicable rules of one NAPTR set, in the order to try them.

    Applicable: a terminal "u" rule whose service field lists ``service`` and whose regexp
    matches the AUS and gives a sip:/sips: URI; or a non-terminal rule (empty flags, an E2U or
    empty service field) naming a next domain.  Only the lowest order that has an applicable
    rule is kept (RFC 3403 section 4.1), sorted by preference.
    """
    rules: list[EnumRule] = []
    for record in records:
        flags = record.flags.lower()
        services = enum_services(record.services) if record.services else []
        if services is None:
            continue
        if flags == "u":
            if service not in services:
                continue
            result = substitute(record.regexp, aus)
            if result is None:
                continue
            try:
                uri = parse_uri(result)
            except SipParseError:
                continue
            if isinstance(uri, SipUri):
                rules.append(EnumUri(uri, record.order, record.preference))
        elif flags == "":
            if record.replacement not in ("", "."):
                domain = record.replacement
            else:
                domain = substitute(record.regexp, aus) or ""
            if domain:
                rules.append(EnumNext(normalize_name(domain), record.order, record.preference))
    if not rules:
        return []
    first = min(rule.order for rule in rules)
    return sorted((r for r in rules if r.order == first), key=lambda r: r.preference)


@dataclass(frozen=True, slots=True)
class EnumFound:
    """The SIP URIs ENUM gave for a number, best first, and the lookups that failed."""

    uris: tuple[SipUri, ...]
    errors: frozenset[Outcome] = frozenset()
    domain: str = ""  # the ENUM domain that answered


def enum_lookup(aus: str, suffixes: Sequence[str], service: str = "sip") -> Plan[EnumFound]:
    """Look the number up under every suffix at once; the first suffix (in configured order)
    that gives a URI wins.  Non-terminal rules are followed up to ``MAX_NON_TERMINAL`` hops."""
    errors: set[Outcome] = set()
    domains = [enum_domain(aus, s) for s in suffixes]
    queries = [Query.of(d, "NAPTR") for d in domains]
    answers = yield from ask(*queries)
    for domain, query in zip(domains, queries, strict=True):
        answer = answers[query]
        if answer.failed:
            errors.add(answer.outcome)
        uris = yield from _follow(enum_rules(answer.naptrs, aus, service), aus, service, errors,
                                  {domain}, 0)
        if uris:
            return EnumFound(tuple(dict.fromkeys(uris)), frozenset(errors), domain)
    return EnumFound((), frozenset(errors))


def _follow(
    rules: Sequence[EnumRule],
    aus: str,
    service: str,
    errors: set[Outcome],
    seen: set[str],
    depth: int,
) -> Plan[list[SipUri]]:
    uris: list[SipUri] = []
    for rule in rules:
        if isinstance(rule, EnumUri):
            uris.append(rule.uri)
            continue
        if depth >= MAX_NON_TERMINAL or rule.domain in seen:
            continue  # a loop or a chain too long: this rule leads nowhere
        seen.add(rule.domain)
        query = Query.of(rule.domain, "NAPTR")
        answers = yield from ask(query)
        answer = answers[query]
        if answer.failed:
            errors.add(answer.outcome)
        more = enum_rules(answer.naptrs, aus, service)
        uris.extend((yield from _follow(more, aus, service, errors, seen, depth + 1)))
    return uris


__all__ = [
    "E164_RE",
    "EnumFound",
    "EnumNext",
    "EnumRule",
    "EnumUri",
    "Substitution",
    "e164_of",
    "enum_domain",
    "enum_lookup",
    "enum_rules",
    "enum_services",
    "parse_substitution",
    "substitute",
]
