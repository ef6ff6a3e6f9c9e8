"""Errors raised by the fleet side (``fleetlite.fleet``): store, controller, rollouts, CLI.

::

    FleetLiteError (fleetlite.sdk.errors)
    └── FleetError
        ├── MissingExtraError   a fleet-side dependency is not installed
        ├── BrokerAddressError  the broker address, a TLS file or the MQTT credentials are wrong
        ├── PublishError        the broker could not be reached or did not acknowledge a publish
        │   └── BrokerConnectionError  unreachable, or refused us: TLS, certificates, credentials
        ├── RolloutError        an invalid rollout spec, state or operator request
        ├── PkiError            the fleet PKI cannot issue, revoke or enrol (fleet/pki.py)
        ├── BrokerConfigError   the broker configuration cannot be written (fleet/broker_config.py)
        └── StoreError          the fleet store (SQLite or PostgreSQL) failed
            ├── StoreUnavailableError  cannot open or reach the database, or it stayed locked
            ├── SchemaVersionError     the database is not migrated, or newer than this fleetlite
            ├── StoreConstraintError   a write broke a constraint (duplicate id, unknown reference)
            └── RecordNotFoundError    the record an operation needs does not exist
"""

from __future__ import annotations

from fleetlite.sdk.errors import FleetLiteError


class FleetError(FleetLiteError):
    """Base of every error raised by the fleet side."""


class MissingExtraError(FleetError):
    """A fleet-side dependency is missing: install ``fleetlite[fleet]``."""


class BrokerAddressError(FleetError):
    """The broker address (``--broker``), a TLS file (``--tls-ca/-cert/-key``) or the MQTT
    credentials are invalid, missing or unreadable; the message names the option, the
    environment variable and the fix."""


class PublishError(FleetError):
    """The publisher could not reach the broker or a publish was not acknowledged in time."""


class BrokerConnectionError(PublishError):
    """The broker cannot be reached, or it refused the connection: TLS handshake, server or
    client certificate, credentials. The message says which and what to check."""


class StoreError(FleetError):
    """The fleet store failed; the message names the database and what to do."""


class StoreUnavailableError(StoreError):
    """The database cannot be opened or reached, or stayed locked too long: check the URL, that
    the server runs, and retry."""


class StoreGoneError(StoreError):
    """The SQLite store's file was deleted or replaced while it was in use: whatever is written
    now goes into a file nobody else can open. Restore the file (from a backup) or start again
    on a new store."""


class SchemaVersionError(StoreError):
    """The database schema does not fit this fleetlite: run ``Store.migrate()``, or upgrade
    fleetlite when the database was migrated by a newer version."""


class StoreConstraintError(StoreError):
    """A write broke a constraint: a duplicate id or a reference to a record that is not stored."""


class RecordNotFoundError(StoreError):
    """The record an operation needs (e.g. the rollout to lock) is not in the store."""


class RolloutError(FleetError):
    """A rollout spec, state or operator request is invalid; the message names the field."""
