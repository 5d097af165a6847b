"""freecall: secure calls with no central provider."""

__version__ = "0.1.0"
