"""Device class profiles shipped with FleetLite (YAML data, one file per class)."""
