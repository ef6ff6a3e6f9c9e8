"""FleetLite version: one place, read by setup.cfg and reported by both sides."""

__version__ = "0.1.0"
