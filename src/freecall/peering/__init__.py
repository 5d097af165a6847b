"""freecall.peering: node records, the host cache and the gossip that fills it.

records (identity, signed node records), hostcache (bounded store, lookups, persistence),
wire (datagram codec), gossip (the pure state machine), simulate (thousands of nodes on
virtual time). See docs/peering.md.
"""
