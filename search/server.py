"""``search serve``: a small local web page over a :class:`search.query.Searcher`.

Python's own ``http.server`` (threads, one per request) on 127.0.0.1 only, serving one static page
(``page.html``: a search box, a drop zone, a grid of thumbnails with captions and scores; plain
JavaScript, nothing fetched from elsewhere, so it works offline) and a small JSON API:

    GET  /                       the page; /?q=a+red+bicycle runs that query when it loads
    GET  /api/info               {"n", "dim", "model", "engine", "top_k", "index"}
    GET  /api/search?q=TEXT&k=K  {"query", "results": [{"rank", "row", "id", "score", "captions", "thumb"}], "ms"}
    POST /api/search?k=K         the same for an image: the request body is the image file's bytes
    GET  /thumb/ROW              a JPEG thumbnail (THUMB_PX) of gallery row ROW

Errors are JSON ``{"error": "..."}`` with status 400 (bad query), 404, 413 (body over MAX_UPLOAD
bytes) or 500. Files are only ever opened by gallery row: the path comes from the index, never
from the request. A port already in use is a one-line error naming the fix.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from extract.datasets import to_rgb
from pipeline.errors import PipelineError
from search.engine import SearchError, check_config
from search.query import Searcher, check_top_k, decode_upload

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # local only: the page shows the user's files
MAX_K = 100  # results a request may ask for
MAX_UPLOAD = 32 * 2**20  # bytes of an uploaded query image
THUMB_PX = 160  # thumbnail side, pixels
THUMB_QUALITY = 85  # JPEG quality of thumbnails
THUMB_CACHE = 4096  # thumbnails kept in memory


class PortInUseError(SearchError, OSError):
    """The port ``search serve`` was asked to listen on is taken."""


class SearchServer(ThreadingHTTPServer):
    """The HTTP server; ``searcher`` may be set after binding (requests wait for it with 503)."""

    daemon_threads = True

    def __init__(self, port: int, searcher: Searcher | None = None, top_k: int = 10):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise SearchError(f"search.port must be 0..65535 (0 = any free port), got {port!r}.")
        try:
            super().__init__((HOST, port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"Port {port} on {HOST} is in use (another `search serve`?); pass --port N "
                                     "(0 = any free port) or stop the program using it.") from None
            raise SearchError(f"Cannot listen on {HOST}:{port}: {exc.strerror or exc}.") from None
        self.searcher = searcher
        self.top_k = check_top_k(top_k)
        self.thumbnail = functools.lru_cache(maxsize=THUMB_CACHE)(self._thumbnail)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def _thumbnail(self, row: int) -> bytes | None:
        """JPEG bytes of gallery row ``row`` shrunk to fit THUMB_PX, or None when its file is missing
        or does not decode."""
        path = self.searcher.index.items[row].path
        try:
            with Image.open(path) as im:
                im.load()
                img = to_rgb(im)
        except Exception as exc:  # a thumbnail is best effort; the result itself stands
            log.warning("no thumbnail for %s: %s", path, exc)
            return None
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=THUMB_QUALITY)
        return buf.getvalue()


@functools.lru_cache(maxsize=1)
def page() -> bytes:
    return resources.files("search").joinpath("page.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    server: SearchServer
    server_version = "platonic-align-search"

    def log_message(self, fmt, *args):  # noqa: D102 (requests go to the debug log, not stderr)
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if ctype.startswith("application/json") else "max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc) -> None:
        self._send(status, json.dumps(doc, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _k(self, params) -> int:
        raw = (params.get("k") or [str(self.server.top_k)])[0]
        try:
            k = int(raw)
        except ValueError:
            raise SearchError(f"k must be an integer, got {raw!r}.") from None
        return min(check_top_k(k), MAX_K)

    def _results(self, query: str, hits, t0: float) -> None:
        self._json(HTTPStatus.OK, {"query": query, "ms": round(1000 * (time.perf_counter() - t0), 1), "results": [
            {**h.to_json(), "thumb": f"/thumb/{h.row}"} for h in hits]})

    def _run(self, work) -> None:
        """Answer with ``work()``; expected errors are 400 with their message, others 500."""
        if self.server.searcher is None:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "The model is still loading; try again in a moment.")
        try:
            work()
        except PipelineError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # a bug: logged with its traceback, reported without it
            log.exception("search request failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ routes
    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        params = parse_qs(url.query)
        if url.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
        if url.path == "/api/info":
            return self._run(self._info)
        if url.path == "/api/search":
            return self._run(lambda: self._text(params))
        if url.path.startswith("/thumb/"):
            return self._run(lambda: self._thumb(url.path[len("/thumb/"):]))
        self._error(HTTPStatus.NOT_FOUND, f"no page {url.path!r}")

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/api/search":
            return self._error(HTTPStatus.NOT_FOUND, f"no page {url.path!r}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_UPLOAD:
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the image must be at most {MAX_UPLOAD // 2**20} MiB (with a Content-Length).")
        data = self.rfile.read(length)
        self._run(lambda: self._image(data, parse_qs(url.query)))

    def _info(self) -> None:
        s = self.server.searcher
        self._json(HTTPStatus.OK, {"n": s.index.n, "dim": s.index.dim, "model": s.ref.name,
                                   "engine": s.index.engine.name, "top_k": self.server.top_k,
                                   "index": str(s.index.folder)})

    def _text(self, params) -> None:
        t0 = time.perf_counter()
        query = (params.get("q") or [""])[0]
        self._results(query, self.server.searcher.text(query, self._k(params)), t0)

    def _image(self, data: bytes, params) -> None:
        t0 = time.perf_counter()
        image = decode_upload(data)
        self._results("(image)", self.server.searcher.image(image, self._k(params)), t0)

    def _thumb(self, row: str) -> None:
        n = self.server.searcher.index.n
        if not row.isdigit() or int(row) >= n:
            return self._error(HTTPStatus.NOT_FOUND, f"no gallery row {row!r} (rows 0..{n - 1})")
        jpeg = self.server.thumbnail(int(row))
        if jpeg is None:
            return self._error(HTTPStatus.NOT_FOUND, f"the image of row {row} cannot be read")
        self._send(HTTPStatus.OK, jpeg, "image/jpeg")


def serve(cfg, echo=print) -> None:
    """``search serve``: listen on 127.0.0.1:``search.port`` (checked first, so a port in use fails
    before the model loads), open the index and its model, serve until interrupted."""
    check_config(cfg.search)
    server = SearchServer(cfg.search.port, None, cfg.search.top_k)
    try:
        server.searcher = Searcher.open(cfg)
        echo(f"Serving {server.searcher.index.n} images of {server.searcher.index.folder} at {server.url} "
             "(Ctrl-C stops)")
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        server.server_close()
