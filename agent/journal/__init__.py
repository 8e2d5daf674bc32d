"""The durable job journal and result outbox: one SQLite database (WAL) under `state_dir`.

A job is written here before the broker gets its PUBACK, and its answer is written in
the same transaction that marks it done, together with the outbox row that carries the
answer to the broker. So a crash at any point loses nothing: a job without an answer is
run again after a restart (no answer had been recorded, so it never ran to completion
before), and an answer the broker has not acknowledged is sent again. A job seen again
(QoS 1 redelivery, a client's retry) is answered from its stored answer, not run again;
one whose request differs from the first's (`request_digest`) is told apart, not answered
with the other request's answer.

The rooms: `database.py` (the schema and `Journal`), `records.py` (what goes in and comes
out), `spool.py` (large payloads as files), `disk_full.py` (a full disk, by error code).
"""

from edgeinfer.agent.journal.database import RUNNING_FILE, SCHEMA, Journal
from edgeinfer.agent.journal.disk_full import DiskFull, disk_full_cause
from edgeinfer.agent.journal.records import (
    Admission,
    Completion,
    OutMessage,
    StoredAnswer,
    StoredJob,
)
from edgeinfer.agent.journal.spool import SPOOL_DIR, SPOOL_MIN_BYTES

__all__ = [
    "RUNNING_FILE", "SCHEMA", "SPOOL_DIR", "SPOOL_MIN_BYTES", "Admission", "Completion",
    "DiskFull", "Journal", "OutMessage", "StoredAnswer", "StoredJob", "disk_full_cause",
]
