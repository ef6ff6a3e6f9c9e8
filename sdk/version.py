"""FleetLite version: one place, read by setup.cfg and reported by both sides."""

__version__ = "0.1.0"

#: A time (Unix seconds) known to have passed when this version was built: the initial floor of
#: a device's clock-independent time floor (see fleetlite.sdk.verify.TimeFloor).
BUILD_TIME = 1795000000  # 2026-11-19
