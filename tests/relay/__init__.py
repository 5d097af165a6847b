"""Tests of the relay role (STUN, TURN, the relay daemon)."""
