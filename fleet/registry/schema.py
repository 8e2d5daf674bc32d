"""The registry's tables, as DDL both databases accept, and the schema's version.

Only the events table differs between the dialects (how an id numbers itself): each
backend (fleet/registry/sqlite.py, fleet/registry/postgres.py) brings its own.
Rollouts keep their tables next to these (fleet/rollout/store.py).
"""

from __future__ import annotations

# Written into `registry_meta` on creation; a registry newer than this is refused.
SCHEMA_VERSION = 1

TABLES = """
CREATE TABLE IF NOT EXISTS registry_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    online BOOLEAN,
    state TEXT NOT NULL DEFAULT 'unknown',
    last_seen TEXT,
    agent_version TEXT,
    session_id TEXT,
    started_at TEXT,
    revision BIGINT,
    models TEXT NOT NULL DEFAULT '[]',
    last_error TEXT,
    hardware TEXT NOT NULL DEFAULT '{}',
    reported_at TEXT
);
CREATE TABLE IF NOT EXISTS device_labels (
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    task TEXT NOT NULL,
    format TEXT NOT NULL,
    labels_sha256 TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL
);
"""

EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, id)"
