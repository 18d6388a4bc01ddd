"""What a traced, scraped agent has around it in production, for ``backup_bench.py --telemetry``: an OTLP/HTTP
collector that accepts every export (and counts what it got), and a Prometheus-like scraper that reads
``GET /metrics`` from the agent's control socket once a second while a backup runs."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kybdr_agent.postgres.cluster import free_port
from tests.daemon_support import UnixHTTPConnection

SCRAPE_INTERVAL_SECONDS = 1.0


@dataclass
class OtlpSink:
    """Answers 200 to every POST (``/v1/traces``) and counts requests and bytes."""

    port: int = field(default_factory=free_port)
    requests: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                sink.requests += 1
                sink.bytes += length
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Scraper:
    """Reads ``/metrics`` from a control socket every second until stopped; counts the scrapes."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(SCRAPE_INTERVAL_SECONDS):
            conn = UnixHTTPConnection(str(self.socket_path), timeout=10)
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.scrapes += 1
            finally:
                conn.close()
