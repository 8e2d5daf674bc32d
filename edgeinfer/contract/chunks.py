"""Artifacts over MQTT (docs/protocol.md "Artifacts over MQTT"): what an agent asks the
fleet's chunk server for, and the user properties each answer carries.

The agent's side is agent/chunk_client.py, the server's fleet/chunk_server.py.
"""

from __future__ import annotations

import msgspec


class ChunkRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A byte range of one artifact, asked for on `{prefix}/artifacts/req`; the answer goes
    to `reply_to` (the asking device's `{prefix}/dev/<id>/artifacts`)."""

    sha256: str
    offset: int
    length: int
    reply_to: str
