"""An HTTP server that serves one body slowly: a trickle of bytes, headers and then nothing,
or a header trickled a byte at a time (never finished)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class SlowServer:
    """Serves `body` at /a, `chunk` bytes every `interval` seconds (never past `stall_after`).

    With `header_interval`, the response never gets past its header: one byte of it every
    `header_interval` seconds, for `give_up_s` seconds, then the connection is closed. A
    per-read socket timeout never fires on that; only an overall deadline ends it.
    """

    def __init__(self, body: bytes, chunk: int, interval: float,
                 stall_after: int | None = None, header_interval: float | None = None,
                 give_up_s: float = 60.0) -> None:
        self.body = body
        self.stopping = threading.Event()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if header_interval is not None:
                    self._trickle_header(header_interval)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                sent = 0
                try:
                    while sent < len(outer.body) and not outer.stopping.is_set():
                        if stall_after is not None and sent >= stall_after:
                            outer.stopping.wait(60)  # headers, some bytes, then silence
                            return
                        self.wfile.write(outer.body[sent:sent + chunk])
                        self.wfile.flush()
                        sent += chunk
                        time.sleep(interval)
                except OSError:
                    pass  # the client gave up: that is the point

            def _trickle_header(self, every: float) -> None:
                ends = time.monotonic() + give_up_s
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                    self.wfile.flush()
                    while time.monotonic() < ends and not outer.stopping.wait(every):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    pass  # the client gave up: that is the point
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/a"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
