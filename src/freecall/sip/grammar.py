"""Regular expressions for the RFC 3261 section 25.1 grammar, each under the rule it implements.

Kept in one place, h11-style, so a reviewer can check every pattern against the ABNF. The
patterns are deliberately a little more liberal than the ABNF where RFC 4475 and RFC 5118 ask a
parser to be robust (``tolerate``), and strict where they ask for a 400.
"""

from __future__ import annotations

import re

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"  # noqa: S105 (a grammar rule, not a password)
TOKEN = rf"[{TOKEN_CHARS}]+"
TOKEN_RE = re.compile(TOKEN)

# Method = INVITEm / ACKm / ... / extension-method ; extension-method = token
METHOD_RE = re.compile(TOKEN)

# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)   (we accept any char but CR/LF after "\")
QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
QUOTED_RE = re.compile(QUOTED)

# IPv6reference = "[" IPv6address "]".  RFC 5118 section 4.10: the RFC 3261 IPv6address ABNF
# admits "2001:db8:::192.0.2.1" (three colons) although RFC 4291 does not; "an implementation must
# tolerate both of the above constructs", so the reference is matched loosely (hex, ":" and ".").
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]"
# hostname = *( domainlabel "." ) toplabel [ "." ] ; IPv4address = 1*3DIGIT "." ...
# Matched loosely (labels of alphanum, "-" and "_", as deployed names use "_" too).
HOSTNAME_OR_IPV4 = r"[A-Za-z0-9\-_.]+"
HOST = rf"(?:{IPV6_REFERENCE}|{HOSTNAME_OR_IPV4})"
HOST_RE = re.compile(HOST)

# gen-value = token / host / quoted-string.  Via received= may carry a bare IPv6address
# (RFC 3261 section 20.42 / RFC 5118 section 4.5), hence ":" in the unquoted form.
GEN_VALUE = rf"(?:{QUOTED}|{IPV6_REFERENCE}|[{TOKEN_CHARS}:]+)"

# generic-param = token [ EQUAL gen-value ] ; SEMI = SWS ";" SWS ; EQUAL = SWS "=" SWS
PARAM_RE = re.compile(rf"[ \t]*;[ \t]*({TOKEN})(?:[ \t]*=[ \t]*({GEN_VALUE}))?")
PARAMS_TAIL_RE = re.compile(rf"(?:[ \t]*;[ \t]*{TOKEN}(?:[ \t]*=[ \t]*{GEN_VALUE})?)*[ \t]*")

# The same, as one pattern that also validates the whole parameter list (captured raw).
PARAMS_TAIL = rf"(?:[ \t]*;[ \t]*{TOKEN}(?:[ \t]*=[ \t]*{GEN_VALUE})?)*"

# via-parm = sent-protocol LWS sent-by *( SEMI via-params )
# sent-protocol = protocol-name SLASH protocol-version SLASH transport ; SLASH = SWS "/" SWS
# sent-by = host [ COLON port ]
VIA_RE = re.compile(
    rf"[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+"
    rf"({HOST})(?:[ \t]*:[ \t]*([0-9]{{1,5}}))?({PARAMS_TAIL})[ \t]*"
)

# name-addr = [ display-name ] LAQUOT addr-spec RAQUOT
# display-name = *(token LWS)/ quoted-string ; LAQUOT = SWS "<" ; RAQUOT = ">" SWS
# RFC 4475 section 3.1.1.6: no LWS is required between the display name and "<".
# No white space is allowed inside the brackets (RFC 4475 section 3.1.2.14).
NAME_ADDR_RE = re.compile(rf"[ \t]*({QUOTED}|(?:{TOKEN}(?:[ \t]+{TOKEN})*)?)[ \t]*<([^<>\s]+)>")
# addr-spec without brackets: RFC 3261 section 20.10, a URI holding "," "?" or ";" must be in
# brackets, so the unbracketed form ends at the first ";" (which starts a header parameter).
ADDR_SPEC_RE = re.compile(r'[ \t]*([^\s;,<>"?]+)')

# SIP-URI = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
# user = 1*( unreserved / escaped / user-unreserved ), user-unreserved = & = + $ , ; ? /
# password = *( unreserved / escaped / & = + $ , )
# uri-parameter: pname [ "=" pvalue ], paramchar = param-unreserved / unreserved / escaped,
# param-unreserved = [ ] / : & + $
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_PARAMCHAR = rf"[{_UNRESERVED}\[\]/:&+$%]"
SIP_URI = (
    rf"([Ss][Ii][Pp][Ss]?):"
    rf"(?:([{_UNRESERVED}%&=+$,;?/]+)(?::([{_UNRESERVED}%&=+$,]*))?@)?"
    rf"({IPV6_REFERENCE}|{HOSTNAME_OR_IPV4})"
    rf"(?::([0-9]{{1,5}}))?"
    rf"((?:;{_PARAMCHAR}+(?:={_PARAMCHAR}+)?)*)"
    rf"(?:\?([{_UNRESERVED}\[\]/?:+$%&=]*))?"
)
SIP_URI_RE = re.compile(SIP_URI)
# name-addr whose URI is a SIP URI, in one pass: display, (uri, its 7 parts), parameters.
NAME_ADDR_SIP_RE = re.compile(
    rf"[ \t]*({QUOTED}|(?:{TOKEN}(?:[ \t]+{TOKEN})*)?)[ \t]*<({SIP_URI})>({PARAMS_TAIL})[ \t]*"
)
URI_PARAM_RE = re.compile(rf";({_PARAMCHAR}+)(?:=({_PARAMCHAR}+))?")

# absoluteURI = scheme ":" ( hier-part / opaque-part ) ; scheme = ALPHA *( ALPHA / DIGIT / "+" /
# "-" / "." ).  The rest is kept opaque (RFC 4475 sections 3.3.2 and 3.3.3).
ABSOLUTE_URI_RE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*):([^\s<>\"]+)")

# telephone-subscriber (RFC 3966): kept as number plus parameters.
TEL_URI_RE = re.compile(r"([Tt][Ee][Ll]):([0-9A-Fa-f*#+\-.()pwPW]+)((?:;[^;\s]+)*)")

# Call-ID = word [ "@" word ] ; word = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" /
# "`" / "'" / "~" / "(" / ")" / "<" / ">" / ":" / "\" / DQUOTE / "/" / "[" / "]" / "?" / "{" / "}")
CALL_ID_RE = re.compile(
    r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+(?:@[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+)?"
)

# CSeq = 1*DIGIT LWS Method
CSEQ_RE = re.compile(rf"[ \t]*([0-9]+)[ \t]+({TOKEN})[ \t]*")

# Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF ; Status-Code = 3DIGIT
STATUS_LINE_RE = re.compile(r"(SIP/[0-9]+\.[0-9]+) ([0-9]+) (.*)", re.DOTALL)
# Request-Line = Method SP Request-URI SP SIP-Version CRLF (exactly one SP each: RFC 4475
# sections 3.1.2.9 and 3.1.2.10 allow rejecting extra and trailing SP; we do, never forwarding them)
REQUEST_LINE_RE = re.compile(rf"({TOKEN}) (\S+) (SIP/[0-9]+\.[0-9]+)")
SIP_VERSION = "SIP/2.0"

# Folded header lines: LWS = [*WSP CRLF] 1*WSP, replaced by a single SP (RFC 3261 section 7.3.1).
# The lookbehind starts a match only at the first blank of a run: without it, a long run of
# blanks with no line end after it is retried from every position (quadratic; 60 kB of spaces
# in one datagram took 18 s, tests/vectors/regressions/fold-blank-run.sip).
FOLD_RE = re.compile(r"(?<![ \t])[ \t]*\r?\n[ \t]+")
# end of the header section: an empty line (CRLF CRLF; bare LF tolerated, RFC 5118's archive)
HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
