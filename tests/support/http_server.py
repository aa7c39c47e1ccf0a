"""A plain HTTP server on a free loopback port, for answers no real peer would send
(garbage, cut-off transfers, redirects, odd multipart bodies)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler],
                  path: str = "/dicom-web") -> Iterator[str]:
    """Serve ``handler`` in a thread; yield ``http://127.0.0.1:<port><path>``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()
