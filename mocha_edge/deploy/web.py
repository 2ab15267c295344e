"""``mocha-edge run --http [HOST:]PORT``: a local web page and REST API for live view, enrolment and corrections.

Two halves meet in a :class:`WebHub`:

* the frame loop (:func:`~mocha_edge.deploy.live.run_loop`) hands it, per camera, a *view* of a processed
  frame (the image and its shown detections) at most ``--http-fps`` times a second and only while someone
  watches (a page, a stream or an API client asked for that camera in the last :data:`WATCH_IDLE` seconds):
  a copy of the frame and of its detection arrays, nothing encoded on the frame thread. It also hands over
  events and per-camera stage times, and takes the page's commands (enrol, correct, rename, remove), which
  it runs on the frame thread between two frames through the same
  :class:`~mocha_edge.deploy.enroller.LiveEnroller` as ``enroll NAME`` on stdin: every bank edit goes through
  :func:`~mocha_edge.prototypes.edit_bank` (the file's lock, re-read and merge), so the page, ``mocha-edge
  enroll`` and another ``run`` never lose each other's identities;
* the server (FastAPI on uvicorn, in a thread of the same process) encodes JPEGs on its own threads, lazily,
  once per view, and answers the API the page (``web_static/``) uses and nothing else.

A detection id (``GET /api/cameras/{cam}/detections``) names one detection of one served view; the server
keeps the view's vectors (and its JPEG, for the shot's thumbnail) for :data:`ID_TTL` seconds after it was last
served, so a person can take a minute to type a name. The browser never sends a vector or a file path.

Security: the server listens on 127.0.0.1 unless told otherwise, and then accepts only loopback ``Host``
headers (a web site that rebinds its DNS name to 127.0.0.1 cannot read the camera). Any other address needs a
token (``--http-token``, or generated and printed once): ``Authorization: Bearer TOKEN``, or the cookie the
page gets when opened once as ``/?token=TOKEN``; a wrong or missing token is a bare 401. Calls that change
state need a JSON body (``Content-Type: application/json``) and are refused (403) from another origin
(``Origin`` / ``Sec-Fetch-Site``); request bodies are at most :data:`MAX_BODY` bytes; names follow
:func:`~mocha_edge.prototypes.check_name`; no request names a file.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mocha_edge.errors import MochaError

STATIC = Path(__file__).with_name("web_static")
WATCH_IDLE = 3.0  # s: a camera nobody asked for in this long gets no more views (nothing copied or encoded)
ID_TTL = 75.0  # s a served view (its detection ids) is kept after it was last served (>= 60 s promised)
UNSERVED_TTL = 5.0  # s a view nobody asked for is kept
MAX_VIEWS = 1200  # views kept per camera at most (memory bound: ID_TTL x 10 FPS x 1.6)
KEEP_IMAGES = 3  # newest views per camera whose raw image stays in memory (older ones keep their JPEG)
EVENT_HISTORY = 200  # events kept for GET /api/events/history
SSE_QUEUE = 256  # events buffered per event-stream client (a slow client loses the oldest)
MAX_BODY = 4096  # bytes of a request body
COMMAND_TIMEOUT = 15.0  # s an API call waits for the loop to carry out its command
JPEG_QUALITY = 80
TOKEN_COOKIE = "mocha_edge_token"
LONG_POLL = 1.0  # s GET detections?after=N waits for a newer view
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# every response: the page runs only its own files, is never framed by another site (no click-jacking of
# Enrol/Remove), and its address (which may hold the token) is never sent on as a referrer
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class WebError(MochaError):
    """The web server cannot start (bad address, port taken, missing dependency)."""


class CommandError(Exception):
    """A command the loop refused: ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


# ------------------------------------------------------------------------------------------ address
def parse_http(spec: str) -> tuple[str, int]:
    """``--http [HOST:]PORT`` -> ``(host, port)``; host defaults to 127.0.0.1 (``[::1]:8080`` for IPv6)."""
    text = spec.strip()
    host, port = "127.0.0.1", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise WebError(f"--http {spec}: expected [HOST:]PORT, e.g. 8080, 0.0.0.0:8080 or [::1]:8080")
        host, port = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise WebError(f"--http {spec}: {port!r} is not a port (0-65535)")
    if not host:
        raise WebError(f"--http {spec}: empty host")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------ hub
@dataclass
class View:
    """One processed frame of one camera as the page sees it."""

    seq: int  # view number on its camera (detection ids are seq * ID_SPAN + index)
    frame: int
    t: float
    made: float  # monotonic time it was made
    width: int
    height: int
    image: np.ndarray | None  # BGR copy (dropped when older than KEEP_IMAGES views; the JPEG stays)
    boxes: np.ndarray
    scores: np.ndarray
    cls: np.ndarray
    vectors: np.ndarray
    identity: np.ndarray  # index into ``identity_names``, -1: none
    similarity: np.ndarray
    track_ids: np.ndarray  # -1: none
    identity_names: list[str]
    class_names: list[str]
    served: float = -math.inf  # monotonic time its detections were last served
    jpeg: dict[bool, bytes] = field(default_factory=dict)  # annotated? -> JPEG
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def records(self) -> list[dict[str, Any]]:
        """The detections as the API gives them."""
        out = []
        for i in range(len(self.scores)):
            c, ident, tid = int(self.cls[i]), int(self.identity[i]), int(self.track_ids[i])
            sim = float(self.similarity[i])
            named = 0 <= ident < len(self.identity_names)
            out.append({
                "id": self.seq * ID_SPAN + i,
                "box_xyxy": [round(float(v), 1) for v in self.boxes[i]],
                "cls": self.class_names[c] if 0 <= c < len(self.class_names) else str(c),
                "score": round(float(self.scores[i]), 4),
                "track_id": tid if tid >= 0 else None,
                "identity": self.identity_names[ident] if named else None,
                "similarity": round(sim, 4) if named and math.isfinite(sim) else None,
            })  # fmt: skip
        return out

    def encode(self, annotated: bool) -> bytes | None:
        """The view's JPEG (raw or with boxes), encoded once (None: its image is gone and it never was)."""
        import cv2

        from mocha_edge.deploy.display import annotate

        with self.lock:
            got = self.jpeg.get(annotated)
            if got is not None or self.image is None:
                return got
            img = self.image
            if annotated:
                img = annotate(img, self, self.class_names, self.identity_names)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                return None
            self.jpeg[annotated] = buf.tobytes()
            return self.jpeg[annotated]

    def crop(self, i: int) -> np.ndarray | None:
        """Detection ``i``'s crop (BGR), from the image or the raw JPEG (None: neither is held)."""
        import cv2

        img = self.image
        if img is None:
            raw = self.jpeg.get(False)
            if raw is None:
                return None
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                return None
        x0, y0, x1, y1 = (int(v) for v in np.rint(self.boxes[i]))
        c = img[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
        return c.copy() if c.size else None


ID_SPAN = 1000  # detections per view at most in an id (max_det is 300)


@dataclass
class _CamState:
    name: str
    views: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # seq -> View
    seq: int = 0
    watched_until: float = -math.inf
    next_due: float = -math.inf
    stamps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))  # frame times
    latency_ms: float = 0.0
    stages_ms: dict[str, float] = field(default_factory=dict)
    frame: int = -1
    width: int = 0
    height: int = 0
    waiters: list = field(default_factory=list)  # asyncio futures of long polls


@dataclass
class Command:
    """A page's request for the frame thread: ``kind`` enrol | negative | rename | remove | enrol_track."""

    kind: str
    args: dict[str, Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class WebHub:
    """The state the frame loop and the web server share (module doc); every method is thread-safe."""

    def __init__(self, http_fps: float = 10.0, token: str | None = None, loopback_only: bool = True) -> None:
        if not http_fps > 0:
            raise WebError(f"--http-fps must be > 0, not {http_fps}")
        self.cams: dict[str, _CamState] = {}
        self.period = 1.0 / float(http_fps)
        self.http_fps = float(http_fps)
        self.token = token
        self.loopback_only = loopback_only
        self.started = time.time()
        self.bank_info: dict[str, Any] = {"path": None, "identities": 0, "problem": None}
        self.identities: list[dict[str, Any]] = []
        self.thumbs: dict[str, bytes] = {}
        self._bank_key: object = None
        self._lock = threading.Lock()
        self._commands: collections.deque[Command] = collections.deque()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)
        self._event_id = 0
        self._subscribers: set[asyncio.Queue] = set()
        self.aloop: asyncio.AbstractEventLoop | None = None  # the server's event loop (set when it starts)
        self.closed = False

    # -------------------------------------------------------------------- frame-thread side
    def add_camera(self, name: str) -> None:
        """A camera of the loop (its label: the name the API uses in paths)."""
        self.cams.setdefault(name, _CamState(name))

    def wants(self, camera: str, now: float | None = None) -> bool:
        """Whether the loop should hand over this frame of ``camera`` (watched, and a view is due)."""
        cs = self.cams.get(camera)
        if cs is None:
            return False
        now = time.monotonic() if now is None else now
        return now < cs.watched_until and now >= cs.next_due

    def offer(self, camera: str, frame: Any, dets: Any, class_names: list[str], identity_names: list[str],
              now: float | None = None) -> None:  # fmt: skip
        """A view of ``frame`` with its shown detections (copies; call when :meth:`wants` says so)."""
        now = time.monotonic() if now is None else now
        cs = self.cams[camera]
        img = frame.image_bgr
        n = len(dets.scores) if dets is not None else 0
        if n:
            tids = getattr(dets, "track_ids", None)
            arrays = (np.array(dets.boxes, np.float32).reshape(n, 4), np.array(dets.scores, np.float32),
                      np.array(dets.cls, np.int64), np.array(dets.vectors, np.float32).reshape(n, -1),
                      np.array(dets.identity, np.int64), np.array(dets.similarity, np.float32),
                      np.full(n, -1, np.int64) if tids is None else np.array(tids, np.int64))  # fmt: skip
        else:
            arrays = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                      np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                      np.zeros(0, np.int64))  # fmt: skip
        with self._lock:
            cs.seq += 1
            view = View(cs.seq, int(frame.index), float(frame.t), now, img.shape[1], img.shape[0], img.copy(),
                        *arrays, list(identity_names), list(class_names))  # fmt: skip
            cs.views[view.seq] = view
            # the schedule keeps the average rate at http_fps whatever the source's frame period
            cs.next_due = (
                max(cs.next_due + self.period, now - self.period) if cs.next_due > -math.inf else now
            )
            cs.next_due = max(cs.next_due, now + self.period * 0.5)
            self._prune(cs, now)
            waiters, cs.waiters = cs.waiters, []
        if waiters and self.aloop is not None:
            with contextlib.suppress(RuntimeError):  # the server's loop closed
                self.aloop.call_soon_threadsafe(_wake, waiters)

    def _prune(self, cs: _CamState, now: float) -> None:
        views = cs.views
        while views:
            seq, v = next(iter(views.items()))
            keep = now - v.served < ID_TTL or now - v.made < UNSERVED_TTL
            if keep and len(views) <= MAX_VIEWS:
                break
            views.pop(seq)
        for k, v in enumerate(reversed(list(views.values()))):
            if k < KEEP_IMAGES:
                continue
            if v.image is None:
                break
            v.image = None  # older views keep only the JPEG the server made of them (if any)

    def frame_done(self, camera: str, latency_ms: float, timings: dict[str, float], frame: Any) -> None:
        """Per-camera FPS, latency and stage times (every processed frame)."""
        cs = self.cams.get(camera)
        if cs is None:
            return
        now = time.monotonic()
        cs.stamps.append(now)
        a = 0.1
        cs.latency_ms = latency_ms if cs.frame < 0 else (1 - a) * cs.latency_ms + a * latency_ms
        for k, v in timings.items():
            old = cs.stages_ms.get(k)
            cs.stages_ms[k] = float(v) if old is None else (1 - a) * old + a * float(v)
        cs.frame = int(frame.index)
        cs.height, cs.width = frame.image_bgr.shape[:2]

    def add_events(self, records: list[dict[str, Any]]) -> None:
        """Events of a frame (their JSON records) for the history and the event streams."""
        if not records:
            return
        with self._lock:
            items = []
            for rec in records:
                self._event_id += 1
                items.append((self._event_id, rec))
                self._events.append({"id": self._event_id, **rec})
            subs = list(self._subscribers)
        if subs and self.aloop is not None:
            with contextlib.suppress(RuntimeError):
                self.aloop.call_soon_threadsafe(_fan_out, subs, items)

    def set_bank(self, bank: Any, path: Path | None, problem: str | None) -> None:
        """The bank in use (identities list, thumbnails) and its file's state, for the page."""
        import cv2

        key = (id(bank), problem, str(path))
        if key == self._bank_key:
            return
        idents, thumbs = [], {}
        if bank is not None:
            for name in sorted(bank.identities):
                ident = bank.identities[name]
                thumb = getattr(ident, "thumb", None)
                if thumb is not None:
                    ok, buf = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
                    if ok:
                        thumbs[name] = buf.tobytes()
                c = ident.coarse
                idents.append({
                    "name": name,
                    "shots": len(ident.shots),
                    "negatives": len(getattr(ident, "negatives", ())),
                    "cls": bank.class_names[c] if 0 <= c < len(bank.class_names) else str(c),
                    "threshold": round(float(ident.threshold), 4),
                    "threshold_source": ident.threshold_source,
                })  # fmt: skip
        with self._lock:
            self._bank_key = key
            self.identities, self.thumbs = idents, thumbs
            self.bank_info = {"path": str(path) if path is not None else None, "identities": len(idents),
                              "problem": problem}  # fmt: skip

    def take_commands(self) -> list[Command]:
        out = []
        while self._commands:
            out.append(self._commands.popleft())
        return out

    # -------------------------------------------------------------------- server side
    def watch(self, camera: str) -> _CamState:
        cs = self.cams[camera]
        now = time.monotonic()
        if now >= cs.watched_until:
            cs.next_due = now  # a first viewer gets a view from the next frame
        cs.watched_until = now + WATCH_IDLE
        return cs

    def latest(self, camera: str, serve: bool = False) -> View | None:
        cs = self.watch(camera)
        with self._lock:
            if not cs.views:
                return None
            v = next(reversed(cs.views.values()))
            if serve:
                v.served = time.monotonic()
            return v

    def view(self, camera: str, seq: int) -> View | None:
        with self._lock:
            return self.cams[camera].views.get(seq)

    def detection(self, camera: str, det_id: int) -> tuple[View, int] | None:
        """The view and index of a served detection id, while it is held."""
        seq, i = divmod(int(det_id), ID_SPAN)
        with self._lock:
            v = self.cams[camera].views.get(seq)
        if v is None or i >= len(v.scores) or time.monotonic() - v.served >= ID_TTL:
            return None
        return v, i

    def submit(self, kind: str, **args: Any) -> concurrent.futures.Future:
        cmd = Command(kind, args)
        self._commands.append(cmd)
        return cmd.future

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def camera_info(self) -> list[dict[str, Any]]:
        out = []
        now = time.monotonic()
        for cs in self.cams.values():
            st = list(cs.stamps)
            fresh = [s for s in st if now - s <= 5.0]
            fps = (
                (len(fresh) - 1) / (fresh[-1] - fresh[0]) if len(fresh) > 1 and fresh[-1] > fresh[0] else 0.0
            )
            out.append({
                "name": cs.name, "fps": round(fps, 2), "frame": cs.frame, "width": cs.width, "height": cs.height,
                "latency_ms": round(cs.latency_ms, 2), "stages_ms": {k: round(v, 3) for k, v in cs.stages_ms.items()},
                "http_fps": self.http_fps,
            })  # fmt: skip
        return out


def _wake(waiters: list) -> None:
    for f in waiters:
        if not f.done():
            f.set_result(None)


def _fan_out(subs: list[asyncio.Queue], items: list[tuple[int, dict[str, Any]]]) -> None:
    for q in subs:
        for item in items:
            if q.full():  # a slow client loses its oldest events, never the loop's time
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(item)


# ------------------------------------------------------------------------------------------ frame-thread commands
def run_command(cmd: Command, enroller: Any, cams: dict[str, Any]) -> None:
    """Carry out one page command on the frame thread; its future gets ``(status, body)`` when the bank edit
    is done (or a :class:`CommandError`). ``cams``: camera name -> its track identities (or None)."""
    a = cmd.args
    try:
        if cmd.kind == "enrol_track":
            idents = cams.get(a["camera"])
            if idents is None:
                raise CommandError(409, f"camera {a['camera']} has no tracker (run with --tracker bytetrack)")
            tr = idents.tracks.get(int(a["track_id"]))
            if tr is None or getattr(tr, "best_vector", None) is None:
                raise CommandError(
                    404, f"track {a['track_id']} is not on camera {a['camera']} now (or has no shot yet)"
                )
            enroller.enrol(a["name"], tr.best_vector, tr.cls, f"{a['camera']} track {tr.tid}",
                           thumb=tr.best_shot, done=_pin_when_done(cmd, idents, tr.tid))  # fmt: skip
        elif cmd.kind == "enrol":
            idents = cams.get(a["camera"])
            tid = a.get("track_id")
            done = cmd.future if idents is None or tid is None else _pin_when_done(cmd, idents, int(tid))
            enroller.enrol(a["name"], a["vector"], a["cls"], a["where"], thumb=a.get("thumb"), done=done)
        elif cmd.kind == "negative":
            enroller.add_negative(a["name"], a["vector"], a["cls"], a["where"], done=cmd.future)
            idents = cams.get(a["camera"])
            tid = a.get("track_id")
            if idents is not None and tid is not None:
                idents.refuse(int(tid), a["name"])
        elif cmd.kind == "rename":
            enroller.rename(a["name"], a["new"], done=cmd.future)
        elif cmd.kind == "remove":
            enroller.remove(a["name"], done=cmd.future)
        else:
            raise CommandError(400, f"unknown command {cmd.kind}")
    except CommandError as e:
        cmd.future.set_exception(e)
    except Exception as e:  # the loop's fault log counts it too
        if not cmd.future.done():
            cmd.future.set_exception(CommandError(500, f"{type(e).__name__}: {e}"))
        raise


def _pin_when_done(cmd: Command, idents: Any, track_id: int) -> concurrent.futures.Future:
    """The future to hand the enroller: once the enrolment is in the bank, the clicked track holds the name (a
    person said so; from the next frame, whatever the track's running mean and confidence say), and only then
    is ``cmd.future`` resolved, so an answered request means the pin is in place."""
    inner: concurrent.futures.Future = concurrent.futures.Future()

    def pin(fut: concurrent.futures.Future) -> None:
        if fut.cancelled():
            cmd.future.cancel()
            return
        err = fut.exception()
        if err is not None:
            cmd.future.set_exception(err)
            return
        try:
            idents.assign(track_id, cmd.args["name"])
        finally:
            cmd.future.set_result(fut.result())

    inner.add_done_callback(pin)
    return inner


# ------------------------------------------------------------------------------------------ ASGI guard
class Guard:
    """ASGI middleware: token, loopback Host, same-origin state changes, JSON bodies, body size (module doc)."""

    def __init__(self, app: Any, hub: WebHub) -> None:
        self.app, self.hub = app, hub

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope["method"]
        host = headers.get("host", "")
        if self.hub.loopback_only and not _loopback_host(host):
            await _send(send, 403, {"detail": f"Host {host!r} refused: this server answers only on loopback"})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = self.hub.token
        if token is not None:
            given = _bearer(headers.get("authorization", "")) or _cookie(
                headers.get("cookie", ""), TOKEN_COOKIE
            )
            from_query = (query.get("token") or [""])[0]
            if from_query and hmac.compare_digest(from_query.encode(), token.encode()) and method == "GET":
                if scope["path"] in (
                    "/",
                    "/index.html",
                ):  # the page's first load: a cookie, and the URL cleaned
                    await send({"type": "http.response.start", "status": 303, "headers": [
                        (b"location", b"/"), (b"content-length", b"0"), (b"cache-control", b"no-store"),
                        (b"set-cookie", f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode()),
                    ]})  # fmt: skip
                    await send({"type": "http.response.body", "body": b""})
                    return
                given = from_query
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-length", b"0"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
                await send({"type": "http.response.body", "body": b""})
                return
        if method in STATE_CHANGING:
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            foreign = origin is not None and (origin == "null" or urlsplit(origin).netloc != host)
            if foreign or (site is not None and site not in ("same-origin", "none")):
                await _send(send, 403, {"detail": "cross-origin request refused"})
                return
            size = headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
                await _send(send, 413, {"detail": f"request body over {MAX_BODY} bytes"})
                return
            has_body = size not in (None, "0") or "transfer-encoding" in headers
            if has_body and headers.get("content-type", "").split(";")[0].strip() != "application/json":
                await _send(send, 415, {"detail": "send a JSON body (Content-Type: application/json)"})
                return
            receive = _limited(receive, MAX_BODY)
        await self.app(scope, receive, send)


def _with_headers(send: Callable) -> Callable:
    async def inner(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), *SECURITY_HEADERS]}
        await send(msg)

    return inner


class _TooLarge(Exception):
    pass


def _limited(receive: Callable, limit: int) -> Callable:
    seen = [0]

    async def inner() -> dict:
        msg = await receive()
        if msg["type"] == "http.request":
            seen[0] += len(msg.get("body", b""))
            if seen[0] > limit:
                raise _TooLarge
        return msg

    return inner


async def _send(send: Callable, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def _bearer(value: str) -> str:
    scheme, _, tok = value.partition(" ")
    return tok.strip() if scheme.lower() == "bearer" else ""


def _cookie(value: str, name: str) -> str:
    for part in value.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


def _loopback_host(host: str) -> bool:
    h = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    h = h.strip("[]")
    return is_loopback(h)


# ------------------------------------------------------------------------------------------ the app
class Enrol(BaseModel):
    """POST /api/identities: a served detection, or a track (its best shot)."""

    name: str = Field(max_length=256)
    camera: str = Field(max_length=256)
    detection_id: int | None = None
    track_id: int | None = None


class Negative(BaseModel):
    """POST /api/identities/{name}/negatives: the served detection that is not NAME."""

    camera: str = Field(max_length=256)
    detection_id: int


class Rename(BaseModel):
    """PATCH /api/identities/{name}: the new name."""

    name: str = Field(max_length=256)


def create_app(hub: WebHub) -> Any:
    """The FastAPI application of the page and the REST API (``/openapi.json``; no docs page: its assets would
    come from a CDN)."""

    from mocha_edge import __version__
    from mocha_edge.prototypes import BankError, check_name

    app = FastAPI(title="mocha-edge", version=__version__, docs_url=None, redoc_url=None,
                  description="Live view, enrolment and corrections of a running `mocha-edge run`.")  # fmt: skip

    def cam_or_404(cam: str) -> str:
        if cam not in hub.cams:
            raise HTTPException(404, f"no camera {cam!r} (have: {', '.join(hub.cams)})")
        return cam

    def valid(name: str) -> str:
        try:
            return check_name(name)
        except BankError as e:
            raise HTTPException(422, str(e)) from None

    def known(name: str) -> str:
        if name not in {i["name"] for i in hub.identities}:
            raise HTTPException(404, f"no identity {name!r}")
        return name

    def held(cam: str, det_id: int) -> tuple[View, int]:
        got = hub.detection(cam, det_id)
        if got is None:
            raise HTTPException(409, f"detection {det_id} is no longer held (ids last {int(ID_TTL)} s after "
                                     "they are shown): click the box again")  # fmt: skip
        return got

    async def outcome(
        fut: concurrent.futures.Future, status: int = 200, camera: str | None = None
    ) -> JSONResponse:
        """The command's answer; with ``camera``, ``frame``: the change shows on every frame of it after this one
        (read once the loop answered, so at or after the frame before which the change was made)."""
        try:
            body = await asyncio.wait_for(asyncio.wrap_future(fut), COMMAND_TIMEOUT)
        except CommandError as e:
            raise HTTPException(e.status, e.detail) from None
        except TimeoutError:
            raise HTTPException(503, "the live loop did not answer in time (is it running?)") from None
        if camera is not None and isinstance(body, dict):
            body = {**body, "frame": hub.cams[camera].frame}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(_TooLarge)
    async def too_large(_request: Request, _exc: _TooLarge) -> JSONResponse:
        return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            raise HTTPException(404, "not found")
        return FileResponse(files[name], headers={"cache-control": "no-cache"})

    @app.get("/api/health", summary="Server, loop and bank state")
    async def health() -> dict[str, Any]:
        return {"ok": not hub.closed and hub.bank_info.get("problem") is None, "version": __version__,
                "uptime_s": round(time.time() - hub.started, 1), "bank": dict(hub.bank_info),
                "cameras": list(hub.cams)}  # fmt: skip

    @app.get("/api/cameras", summary="Cameras: FPS, latency, stage times (ms)")
    async def cameras() -> dict[str, Any]:
        return {"cameras": hub.camera_info()}

    @app.get("/api/cameras/{cam}/detections", summary="The latest view's detections (ids valid >= 60 s)")
    async def detections(cam: str, after: int | None = None) -> dict[str, Any]:
        cam = cam_or_404(cam)
        cs = hub.watch(cam)
        if after is not None:  # long poll: wait for a view newer than frame `after`
            deadline = time.monotonic() + LONG_POLL
            while True:
                v = hub.latest(cam)
                if v is not None and v.frame != after:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                fut = asyncio.get_running_loop().create_future()
                with hub._lock:
                    cs.waiters.append(fut)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, left)
        v = hub.latest(cam, serve=True)
        if v is None:
            return {"frame": -1, "t": None, "width": cs.width, "height": cs.height, "detections": []}
        await run_in_threadpool(v.encode, False)  # the page asks for this view's image next; thumbnails too
        return {"frame": v.frame, "t": v.t, "width": v.width, "height": v.height, "view": v.seq,
                "detections": v.records()}  # fmt: skip

    def jpeg_of(cam: str, frame: int | None) -> View | None:
        cs = hub.watch(cam)
        if frame is not None:
            with hub._lock:
                for v in reversed(cs.views.values()):
                    if v.frame == frame:
                        return v
        return hub.latest(cam)

    @app.get("/api/cameras/{cam}/frame.jpg", summary="The latest (or view `frame`) JPEG; boxes=0: no boxes",
             response_class=Response)  # fmt: skip
    async def frame_jpg(cam: str, boxes: int = 1, frame: int | None = None) -> Response:
        cam = cam_or_404(cam)
        v = jpeg_of(cam, frame)
        if v is None:
            v = await _first_view(hub, cam)
        if v is None:
            raise HTTPException(503, f"no frame from camera {cam} yet")
        data = await run_in_threadpool(v.encode, bool(boxes))
        if data is None:
            v = hub.latest(cam)
            data = await run_in_threadpool(v.encode, bool(boxes)) if v is not None else None
        if data is None:
            raise HTTPException(503, f"no frame from camera {cam} yet")
        return Response(
            data, media_type="image/jpeg", headers={"x-frame": str(v.frame), "cache-control": "no-store"}
        )

    @app.get(
        "/api/cameras/{cam}/stream.mjpg", summary="Annotated MJPEG stream", response_class=StreamingResponse
    )
    async def stream(cam: str, request: Request) -> StreamingResponse:
        cam = cam_or_404(cam)

        async def parts() -> Any:
            last = -1
            while not hub.closed:
                if await request.is_disconnected():
                    return
                hub.watch(cam)
                v = hub.latest(cam)
                if v is None or v.seq == last:
                    await asyncio.sleep(hub.period / 4)
                    continue
                last = v.seq
                data = await run_in_threadpool(v.encode, True)
                if data:
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                           + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")  # fmt: skip

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"cache-control": "no-store"})  # fmt: skip

    @app.get("/api/identities", summary="Enrolled identities")
    async def identities() -> dict[str, Any]:
        out = []
        for i in hub.identities:
            thumb = f"/api/identities/{_quote(i['name'])}/thumb.jpg" if i["name"] in hub.thumbs else None
            out.append({**i, "thumb": thumb})
        return {"identities": out}

    @app.get("/api/identities/{name}/thumb.jpg", summary="A shot's thumbnail", response_class=Response)
    async def thumb(name: str) -> Response:
        data = hub.thumbs.get(name)
        if data is None:
            raise HTTPException(404, f"no thumbnail of {name!r}")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "no-cache"})

    @app.post("/api/identities", status_code=201, summary="Enrol a detection or a track's best shot")
    async def enrol(req: Enrol = Body(...)) -> JSONResponse:  # noqa: B008
        name = valid(req.name)
        cam = cam_or_404(req.camera)
        if (req.detection_id is None) == (req.track_id is None):
            raise HTTPException(422, "give detection_id or track_id (one of them)")
        if req.track_id is not None:
            return await outcome(
                hub.submit("enrol_track", name=name, camera=cam, track_id=req.track_id), 201, cam
            )
        v, i = held(cam, req.detection_id)
        crop = await run_in_threadpool(v.crop, i)
        tid = int(v.track_ids[i])
        fut = hub.submit("enrol", name=name, camera=cam, vector=v.vectors[i], cls=int(v.cls[i]), thumb=crop,
                         track_id=tid if tid >= 0 else None, where=f"{cam} frame {v.frame} (web)")  # fmt: skip
        return await outcome(fut, 201, cam)

    @app.post(
        "/api/identities/{name}/negatives", summary='"Not NAME": the detection becomes a correction of NAME'
    )
    async def negative(name: str, req: Negative = Body(...)) -> JSONResponse:  # noqa: B008
        name = known(name)
        cam = cam_or_404(req.camera)
        v, i = held(cam, req.detection_id)
        tid = int(v.track_ids[i])
        fut = hub.submit("negative", name=name, camera=cam, vector=v.vectors[i], cls=int(v.cls[i]),
                         track_id=tid if tid >= 0 else None, where=f"{cam} frame {v.frame} (web)")  # fmt: skip
        return await outcome(fut, 200, cam)

    @app.patch("/api/identities/{name}", summary="Rename")
    async def rename(name: str, req: Rename = Body(...)) -> JSONResponse:  # noqa: B008
        name = known(name)
        return await outcome(hub.submit("rename", name=name, new=valid(req.name)))

    @app.delete("/api/identities/{name}", summary="Remove")
    async def remove(name: str) -> JSONResponse:
        return await outcome(hub.submit("remove", name=known(name)))

    @app.get("/api/events/history", summary="The latest events (bounded)")
    async def history() -> dict[str, Any]:
        return {"events": hub.history()}

    @app.get("/api/events", summary="Server-sent events: enter, identified, changed, leave",
             response_class=StreamingResponse)  # fmt: skip
    async def events(request: Request) -> StreamingResponse:
        q = hub.subscribe()

        async def lines() -> Any:
            try:
                yield b"retry: 2000\n\n"
                while not hub.closed:
                    try:
                        eid, rec = await asyncio.wait_for(q.get(), 15.0)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": keep-alive\n\n"
                        continue
                    yield f"id: {eid}\nevent: {rec.get('event', 'message')}\ndata: {json.dumps(rec)}\n\n".encode()
            finally:
                hub.unsubscribe(q)

        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})  # fmt: skip

    return app


async def _first_view(hub: WebHub, cam: str, wait: float = 2.0) -> View | None:
    """A first request for a camera nobody watched: wait (briefly) for the loop's next view."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        v = hub.latest(cam)
        if v is not None:
            return v
        await asyncio.sleep(0.02)
    return None


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


# ------------------------------------------------------------------------------------------ server thread
class WebServer:
    """uvicorn serving :func:`create_app` on a thread of this process; :meth:`stop` ends it."""

    def __init__(self, hub: WebHub, host: str, port: int) -> None:
        try:
            import uvicorn
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise WebError(f"--http needs uvicorn and fastapi ({e})") from None
        self.hub, self.host = hub, host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise WebError(f"--http {host}:{port}: cannot listen ({e.strerror or e})") from None
        sock.listen(64)
        self.sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(Guard(create_app(hub), hub), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, ws="none")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="mocha-web", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start() and stop()
            self.error = e

    async def _main(self) -> None:
        self.hub.aloop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.sock])

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise WebError(f"the web server did not start: {self.error or 'timeout'}")

    @property
    def url(self) -> str:
        """The page's address (every interface: this machine's name, which the others reach it by)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        self.hub.closed = True
        self.server.should_exit = True
        self.thread.join(5.0)
        with contextlib.suppress(OSError):
            self.sock.close()


def new_token() -> str:
    return secrets.token_urlsafe(18)
