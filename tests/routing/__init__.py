"""Tests of freecall.routing (a package, so helpers import as routing.fakedns)."""
