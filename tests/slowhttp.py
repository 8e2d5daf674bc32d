"""An HTTP server that serves one body slowly: a trickle of bytes, or headers and then nothing."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class SlowServer:
    """Serves `body` at /a, `chunk` bytes every `interval` seconds (never past `stall_after`)."""

    def __init__(self, body: bytes, chunk: int, interval: float,
                 stall_after: int | None = None) -> None:
        self.body = body
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
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
