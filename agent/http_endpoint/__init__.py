"""The local KServe v2 REST endpoint (`http.listen`): OIP over HTTP for processes on the
gateway itself, on the agent's job path (docs/protocol.md, "The local HTTP endpoint").

    agent/http_endpoint/exchange.py  a request as the job path's `Inbound`; its answer's
                                     bytes as an HTTP status, headers and body
    agent/http_endpoint/server.py    the aiohttp server on its own thread and event loop
"""

from edgeinfer.agent.http_endpoint.server import HttpEndpoint

__all__ = ["HttpEndpoint"]
