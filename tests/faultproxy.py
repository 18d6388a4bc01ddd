"""An HTTP reverse proxy in front of moto that injects S3 faults: failed or slow UploadPart requests.

It runs its own event loop in a thread, so the agent under test (a subprocess) reaches it over real TCP."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Final

import aiohttp
from aiohttp import web

from kybdr_agent.pgcluster import free_port

_HOP_HEADERS: Final = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}
_INTERNAL_ERROR: Final = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_upload_part = False
        self.delay_upload_part = 0.0
        self.counts: Counter[str] = Counter()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_part = request.method == "PUT" and "partNumber" in request.query
        if is_part:
            self.counts["upload_part"] += 1
            if self.fail_upload_part:
                return web.Response(status=500, body=_INTERNAL_ERROR, content_type="application/xml")
            if self.delay_upload_part:
                await asyncio.sleep(self.delay_upload_part)
        if request.method == "DELETE" and "uploadId" in request.query:
            self.counts["abort"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            data = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            return web.Response(status=upstream.status, body=data, headers=out_headers)
