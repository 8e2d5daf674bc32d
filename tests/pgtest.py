"""The registry's PostgreSQL backend under test: a throwaway schema on the local server.

Tests that take `registry_target` run once per backend, against the server at
`$EDGE_TEST_POSTGRES_URL` (default postgresql://127.0.0.1:5432/test, trust auth).
scripts/test.sh (through scripts/with-postgres.sh) starts a throwaway server and sets that
variable when none answers there; a plain `pytest` skips the PostgreSQL runs, with the
reason, where no server answers.

`python -m tests.pgtest` exits 0 when a server answers, else prints why not and exits 1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_URL = os.environ.get("EDGE_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")


def _unreachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'edgeinfer[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=2):
            return None
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"no PostgreSQL at {PG_URL}: {first} (scripts/test.sh, or "
                "scripts/with-postgres.sh COMMAND, starts a throwaway one)")


@contextmanager
def pg_schema_url() -> Iterator[str]:
    """`postgresql://...?schema=<unique>`; the schema is dropped afterwards."""
    reason = _unreachable()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    schema = f"edgeinfer_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}schema={schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    import sys

    why = _unreachable()
    if why is not None:
        sys.exit(why)
