"""The HTTP server the test doubles share: threaded, and quiet when a client hangs up."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class QuietHTTPServer(ThreadingHTTPServer):
    """A client closing its connection (a pool at interpreter exit, a test cutting a request short)
    is normal here, not a traceback on stderr; any other handler error is still printed."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]
