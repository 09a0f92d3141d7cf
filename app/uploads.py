"""Limits on what clients may upload to the demo: a rate per client and a cap on all uploads kept, plus removal of
every upload when the server stops, on SIGTERM as on Ctrl-C.

Gradio checks each file's size (`max_file_size`) but not how many files a client sends or how much they add up to:
200 uploads of 1 MB were accepted in 4 s and kept for an hour. Gradio has no setting for either, so this is a small
ASGI middleware in front of its upload route (passed to its FastAPI app through `launch(app_kwargs=...)`).
"""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict, deque
from pathlib import Path

MAX_UPLOADS_PER_MINUTE = 20  # per client address
MAX_TOTAL_BYTES = 64 * 2**20  # all uploads kept on disk at once


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


class UploadGuard:
    """ASGI middleware: refuses an upload request (429) when its client sent `per_minute` in the last minute, or
    (507) when the upload folder already holds `max_total` bytes; every other request passes untouched."""

    def __init__(self, app, folder: str, per_minute: int = MAX_UPLOADS_PER_MINUTE, max_total: int = MAX_TOTAL_BYTES):
        self.app, self.folder = app, Path(folder)
        self.per_minute, self.max_total = per_minute, max_total
        self.recent: dict[str, deque] = defaultdict(deque)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            refusal = self._refusal((scope.get("client") or ("?",))[0])
            if refusal is not None:
                status, message = refusal
                body = json.dumps({"detail": message}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _refusal(self, client: str) -> tuple[int, str] | None:
        now, hits = time.monotonic(), self.recent[client]
        while hits and now - hits[0] > 60:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return 429, f"too many uploads: at most {self.per_minute} a minute; wait and try again"
        if folder_bytes(self.folder) >= self.max_total:
            return 507, "the demo's upload space is full; try again later"
        hits.append(now)
        return None


def guarded_app_kwargs(**limits) -> dict:
    """`launch(app_kwargs=...)` that puts an UploadGuard in front of Gradio's upload route."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(UploadGuard, folder=get_upload_folder(), **limits)]}


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the server as Ctrl-C does, so Gradio's shutdown deletes the uploads in both cases."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
