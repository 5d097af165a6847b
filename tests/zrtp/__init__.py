"""Tests of the ZRTP core (freecall.srtp)."""
