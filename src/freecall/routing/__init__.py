"""freecall.routing: where a call for another domain goes (static routes, host cache, DNS, ENUM).

* :mod:`.plan`: DNS answers as values and the plan protocol (pure logic asks, the edge answers);
* :mod:`.rfc3263`: RFC 3263 section 4 and RFC 2782 target selection (pure);
* :mod:`.e164`: ENUM, RFC 6116 (pure);
* :mod:`.dns`: dnspython's asyncio resolver with a TTL cache, negative caching and deadlines;
* :mod:`.router`: the chain, as the proxy's ``TargetResolver``.
"""

from .dns import AsyncDns, DnsCache, Lookup, drive
from .plan import Answer, Naptr, Outcome, Query, Srv
from .rfc3263 import Hop, Located, locate, order_srv
from .router import NoPeers, PeerRoutes, Router

__all__ = [
    "Answer",
    "AsyncDns",
    "DnsCache",
    "Hop",
    "Located",
    "Lookup",
    "Naptr",
    "NoPeers",
    "Outcome",
    "PeerRoutes",
    "Query",
    "Router",
    "Srv",
    "drive",
    "locate",
    "order_srv",
]
