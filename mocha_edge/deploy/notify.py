"""Track events to an MQTT broker (Home Assistant) and to webhooks: outputs that never stall the frame loop.

Both sinks take the loop's events (:class:`~mocha_edge.deploy.tracking.Event`) through ``write_events``, which
only puts them in a bounded in-memory queue; a worker thread delivers them. When the queue is full the
*oldest* queued events are dropped and counted (one log line when dropping starts, then at most one a minute);
``close()`` delivers what it can within ``flush`` seconds and reports events sent, dropped and still pending
(:class:`~mocha_edge.deploy.sinks.SinkReport`: ``count`` sent, ``dropped``, ``buffered`` = pending, lost).
Credentials (``user:password@``, ``?token=`` ...) never appear in a message, a report or a record: every
message names the sink by its redacted address (:func:`~mocha_edge.deploy.sources.redact_uri`).

**MQTT** -- ``mqtt://[user:password@]host[:port][/prefix][?options]`` (``mqtts://``: TLS, port 8883 by
default; the system's CA store, or ``?ca=FILE``). ``prefix`` defaults to ``mocha`` (levels of
``[A-Za-z0-9_.-]``); special characters in the user or password are percent-encoded (``%40`` for ``@``).
The client is paho-mqtt with its own network thread: an unreachable broker at start is one warning and
reconnection attempts with backoff (1 s to 30 s), never an exit; events queued meanwhile are sent once it
connects. One sink serves every camera of the process (``camera`` of each event).

| topic | retained | payload |
|---|---|---|
| ``<prefix>/status`` | yes | ``online`` once connected; ``offline`` at a clean close, and as the client's last will (the broker sends it when the process dies or the link is lost) |
| ``<prefix>/<camera>/events`` | no | every event, ``Event.record()`` as JSON (``event``: enter, identified, changed, leave) |
| ``<prefix>/<camera>/<identity>/presence`` | yes | ``ON`` while a track of that identity is on that camera, else ``OFF`` |
| ``<prefix>/<camera>/<identity>/attributes`` | yes | JSON: ``identity`` (exact name), ``camera``, and the last event's ``event``, ``track_id``, ``similarity``, ``t``, ``box_xyxy`` |
| ``<prefix>/<camera>/<identity>/snapshot`` | yes | ``?snapshot=1``: JPEG of the track's best shot, at ``identified`` / ``changed`` |
| ``<discovery>/binary_sensor/<uid>/config`` | yes | Home Assistant discovery: a ``presence`` binary sensor per identity and camera |
| ``<discovery>/image/<uid>_snapshot/config`` | yes | ``?snapshot=1``: a Home Assistant ``image`` entity showing the snapshot |

``<camera>`` and ``<identity>`` are topic slugs (:func:`topic_slug`): a name of ``[A-Za-z0-9_-]`` is kept; any
other (``/``, ``+``, ``#``, spaces, non-ASCII) becomes its ASCII letters and digits with ``_``, plus ``-`` and a
short hash of the exact name, so two names never share a topic; payloads carry the exact names.
``<discovery>`` is ``homeassistant`` (``?discovery_prefix=``); ``<uid>`` = ``mocha_<prefix>_<camera>_<identity>``
(``[A-Za-z0-9_-]``, also the entity's ``unique_id``). Discovery configs go out for each identity the first
time an event names it (:meth:`MqttSink.announce` announces a bank's identities up front) and again at
every (re)connection, with the presence states. Entities are grouped in one Home Assistant device per
camera, available while ``<prefix>/status`` is ``online``.

Options: ``discovery=0`` (no Home Assistant configs), ``discovery_prefix=P``, ``snapshot=1``, ``qos=0|1|2``
(1), ``queue=N`` (events held, 1000), ``keepalive=S`` (30), ``flush=S`` (close deadline, 2), ``client_id=ID``,
``ca=FILE`` and ``insecure=1`` (mqtts: no certificate check).

**Webhook** -- ``http(s)://[user:password@]host[:port]/path[?query][#options]``: each event is POSTed as JSON
(``Event.record()``; ``#batch=1``: one POST per frame with a JSON list). The URL, query included, goes to the
server as written (``user:password@`` as HTTP basic auth); the sink's own options come after ``#``, which is
never sent: ``#tries=5`` (attempts per POST), ``timeout=5`` (seconds per attempt), ``queue=1000`` (events
held), ``flush=2`` (close deadline), ``batch=1``. Connection errors, timeouts, 5xx and 429 are retried with
exponential backoff and jitter (0.5 s doubling to 30 s; a 429's ``Retry-After`` is honoured up to 30 s);
after ``tries`` attempts, or at once for another 4xx, the POST's events are dropped and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import ssl
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from mocha_edge.deploy.sinks import Log, Sink, SinkError, SinkReport, SinkURI, camera_slug, log_stderr

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.sources import Frame
    from mocha_edge.deploy.tracking import Event

MQTT_SCHEMES = ("mqtt", "mqtts")
WEBHOOK_SCHEMES = ("http", "https")
MQTT_OPTIONS = ("discovery", "discovery_prefix", "snapshot", "qos", "queue", "keepalive", "flush", "client_id",
                "ca", "insecure")  # fmt: skip
WEBHOOK_OPTIONS = ("batch", "tries", "timeout", "queue", "flush")
DEFAULT_PREFIX = "mocha"
DISCOVERY_PREFIX = "homeassistant"
QUEUE = 1000  # events held per sink while the broker / server does not take them
FLUSH = 2.0  # seconds close() spends delivering what is queued
KEEPALIVE = 30  # seconds (the broker declares the client dead, and sends its will, after 1.5x)
RECONNECT = (1, 30)  # seconds: paho's reconnection backoff, doubling from the first to the second
INFLIGHT = 100  # MQTT messages handed to paho and not yet acknowledged
TRANSITIONS = 4  # unpublished ON/OFF changes kept per identity and camera
TRIES = 5  # webhook attempts per POST
TIMEOUT = 5.0  # seconds per webhook attempt
BACKOFF = (0.5, 30.0)  # webhook retry backoff: first delay, cap (seconds; doubled per attempt, jittered)
DROP_LOG_EVERY = 60.0  # seconds between the log lines about dropped events
ONLINE, OFFLINE = "online", "offline"
PAYLOAD_ON, PAYLOAD_OFF = "ON", "OFF"
_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")


# ------------------------------------------------------------------------------------------ names
def topic_slug(name: str, length: int = 6) -> str:
    """``name`` as one MQTT topic level and Home Assistant id fragment (``[A-Za-z0-9_-]``): kept when it is
    already that, else its ASCII letters and digits joined by ``_`` plus ``-`` and ``length`` hex digits of
    its hash (``"Rex's bowl"`` -> ``Rex_s_bowl-1a2b3c``)."""
    name = str(name)
    if _SAFE.fullmatch(name):
        return name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9]+", "_", ascii_name).strip("_")[:40] or "x"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:length]}"


class Slugs:
    """Topic slugs that never collide within one sink (thread-safe): ``slug(name)`` gives a name's slug; a
    name whose slug another name took gets a hash (or a longer one)."""

    def __init__(self, slug: Callable[[str], str] = topic_slug) -> None:
        self.slug = slug
        self.by_name: dict[str, str] = {}
        self.names: dict[str, str] = {}  # slug -> name
        self.lock = threading.Lock()

    def __call__(self, name: str) -> str:
        with self.lock:
            slug = self.by_name.get(name)
            if slug is None:
                digest = hashlib.sha256(name.encode()).hexdigest()
                base = re.sub(r"[^A-Za-z0-9_-]+", "_", self.slug(name))[:40]
                for slug in (self.slug(name), *(f"{base}-{digest[:n]}" for n in (6, 12, 64))):
                    if self.names.get(slug, name) == name:
                        break
                self.by_name[name], self.names[slug] = slug, name
            return slug


def camera_level(camera: str) -> str:
    """A camera's name (a source's name, credentials already redacted) as a topic level: a name of
    ``[A-Za-z0-9_-]`` as it is, else :func:`~mocha_edge.deploy.sinks.camera_slug` (``clip.mp4`` -> ``clip``)
    with dots as ``_``."""
    return camera if _SAFE.fullmatch(camera) else camera_slug(camera).replace(".", "_")


# ------------------------------------------------------------------------------------------ URIs
def _flag(value: str, key: str, shown: str) -> bool:
    if value not in ("0", "1"):
        raise SinkError(f"{shown}: {key}={value!r} must be 0 or 1")
    return value == "1"


def _positive(value: str, key: str, shown: str, kind: type = float) -> Any:
    try:
        x = kind(value)
    except ValueError:
        x = None
    if x is None or not math.isfinite(x) or x <= 0:
        what = "a whole number" if kind is int else "a number"
        raise SinkError(f"{shown}: {key}={value!r} must be {what} > 0")
    return x


def _host_port(text: str, shown: str, default_port: int) -> tuple[Any, str, int]:
    """The split URL, its host and port (one-line errors for a missing host or a bad port)."""
    u = urlsplit(text)
    try:
        port = u.port
    except ValueError:
        raise SinkError(f"{shown}: the port is not a number in 1-65535") from None
    if not u.hostname:
        raise SinkError(f"{shown}: no host (e.g. {u.scheme}://192.168.1.10)")
    if port == 0:
        raise SinkError(f"{shown}: the port is not a number in 1-65535")
    return u, u.hostname, port or default_port


def parse_mqtt(text: str, shown: str) -> SinkURI:
    """``mqtt(s)://[user:password@]host[:port][/prefix][?options]`` (module doc) -> a :class:`SinkURI` of
    kind ``mqtt``; a malformed one is a one-line :class:`SinkError` naming ``shown``."""
    scheme = text.split("://", 1)[0].lower()
    u, host, port = _host_port(text, shown, 8883 if scheme == "mqtts" else 1883)
    if u.fragment:
        raise SinkError(f"{shown}: an MQTT address has no #fragment (options go in the ?query)")
    prefix = u.path.strip("/") or DEFAULT_PREFIX
    if not all(_LEVEL.fullmatch(level) for level in prefix.split("/")):
        raise SinkError(
            f"{shown}: topic prefix {prefix!r} must be levels of letters, digits, '_', '.', '-' joined by '/'"
        )
    options: dict[str, Any] = {"host": host, "port": port, "prefix": prefix, "tls": scheme == "mqtts",
                               "username": unquote(u.username) if u.username else None,
                               "password": unquote(u.password) if u.password is not None else None}  # fmt: skip
    for k, v in parse_qsl(u.query, keep_blank_values=True):
        if k not in MQTT_OPTIONS:
            raise SinkError(f"{shown}: unknown option {k!r} (valid for mqtt: {', '.join(MQTT_OPTIONS)})")
        if k in ("discovery", "snapshot", "insecure"):
            options[k] = _flag(v, k, shown)
        elif k == "qos":
            if v not in ("0", "1", "2"):
                raise SinkError(f"{shown}: qos={v!r} must be 0, 1 or 2")
            options[k] = int(v)
        elif k in ("queue", "keepalive"):
            options[k] = _positive(v, k, shown, int)
        elif k == "flush":
            options[k] = _positive(v, k, shown)
        elif k == "discovery_prefix":
            if not _LEVEL.fullmatch(v):
                raise SinkError(f"{shown}: discovery_prefix={v!r} must be one topic level ([A-Za-z0-9_.-])")
            options[k] = v
        elif k == "client_id":
            if not v or len(v) > 64:
                raise SinkError(f"{shown}: client_id must be 1 to 64 characters")
            options[k] = v
        elif k == "ca":
            if not os.path.isfile(os.path.expanduser(v)):
                raise SinkError(f"{shown}: ca={v!r} is not a file")
            options[k] = os.path.expanduser(v)
    if not options["tls"] and ({"ca", "insecure"} & options.keys()):
        raise SinkError(f"{shown}: ca= and insecure= are for mqtts:// (TLS)")
    return SinkURI(text, "mqtt", shown, options)


def parse_webhook(text: str, shown: str) -> SinkURI:
    """``http(s)://[user:password@]host[:port]/path[?query][#options]`` (module doc) -> a :class:`SinkURI` of
    kind ``webhook``; a malformed one is a one-line :class:`SinkError` naming ``shown``."""
    scheme = text.split("://", 1)[0].lower()
    u, _, _ = _host_port(text, shown, 443 if scheme == "https" else 80)
    options: dict[str, Any] = {
        "url": urlunsplit((scheme, u.netloc.rpartition("@")[2], u.path or "/", u.query, "")),
        "username": unquote(u.username) if u.username else None,
        "password": unquote(u.password) if u.password is not None else None,
    }
    for k, v in parse_qsl(u.fragment, keep_blank_values=True):
        if k not in WEBHOOK_OPTIONS:
            raise SinkError(
                f"{shown}: unknown option {k!r} after '#' (valid for a webhook: {', '.join(WEBHOOK_OPTIONS)}; "
                "the ?query goes to the server as written)"
            )
        if k == "batch":
            options[k] = _flag(v, k, shown)
        elif k in ("tries", "queue"):
            options[k] = _positive(v, k, shown, int)
        else:
            options[k] = _positive(v, k, shown)
    return SinkURI(text, "webhook", shown, options)


def parse_network(text: str, shown: str) -> SinkURI:
    """An ``mqtt(s)://`` or ``http(s)://`` output address -> its :class:`SinkURI` (kind ``mqtt`` / ``webhook``)."""
    scheme = text.split("://", 1)[0].lower()
    return parse_mqtt(text, shown) if scheme in MQTT_SCHEMES else parse_webhook(text, shown)


def network_key(uri: SinkURI) -> str:
    """What two outputs must not share: the broker and prefix (one client, one will), or the webhook URL."""
    o = uri.options
    if uri.kind == "mqtt":
        return f"mqtt://{o['host']}:{o['port']}/{o['prefix']}"
    return str(o["url"])


def open_network(uri: SinkURI, log: Log | None = None) -> Sink:
    """The sink of a parsed ``mqtt`` / ``webhook`` :class:`SinkURI`."""
    return MqttSink(uri, log=log) if uri.kind == "mqtt" else WebhookSink(uri, log=log)


# ------------------------------------------------------------------------------------------ shared
class _Drops:
    """Dropped events: counted; one log line when dropping starts, then at most one per ``every`` s."""

    def __init__(self, shown: str, log: Log, bound: int, every: float = DROP_LOG_EVERY) -> None:
        self.shown, self.log, self.bound, self.every = shown, log, bound, every
        self.count = self.since = 0
        self.logged_at: float | None = None

    def add(self, n: int, why: str) -> None:
        self.count += n
        self.since += n
        now = time.monotonic()
        if self.logged_at is None:
            self.logged_at, self.since = now, 0
            self.log(
                f"warning: {self.shown}: {why}: dropping events (the oldest first; counted in the summary)"
            )
        elif now - self.logged_at >= self.every:
            self.log(f"warning: {self.shown}: {self.since} more events dropped in the last "
                     f"{now - self.logged_at:.0f} s ({self.count} in all; {why})")  # fmt: skip
            self.logged_at, self.since = now, 0


def _scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret in it replaced by ``***`` (exception messages may quote a URL)."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return " ".join(text.split())[:300]


def _secrets(uri: SinkURI) -> list[str]:
    """The password and the secret-named query values of ``uri`` (what :func:`_scrub` hides)."""
    from mocha_edge.deploy.sources import SECRET_PARAMS

    out = [str(uri.options.get("password") or "")]
    query = urlsplit(uri.text).query
    for k, v in parse_qsl(query, keep_blank_values=True):
        if any(k.lower().endswith(p) for p in SECRET_PARAMS) and len(v) >= 3:
            out.append(v)
    return sorted((s for s in out if s), key=len, reverse=True)


# ------------------------------------------------------------------------------------------ MQTT
@dataclass
class _Presence:
    """The retained state of one identity on one camera. ``pending``: its ON/OFF changes not yet published,
    in order; at most :data:`TRANSITIONS` (a broker that is not taking them loses the oldest, never the
    current state), so a short visit still shows as ON then OFF when the worker is a little behind."""

    camera: str
    identity: str
    on: bool | None = None  # the latest state (None: not set yet)
    pending: deque = field(default_factory=lambda: deque(maxlen=TRANSITIONS))
    attributes: dict[str, Any] | None = None
    snapshot: np.ndarray | None = None
    snapshot_new: bool = False

    def set(self, on: bool) -> None:
        if on != self.on:
            self.on = on
            self.pending.append(on)


class MqttSink(Sink):
    """Events, retained presence and Home Assistant discovery to an MQTT broker (module doc)."""

    needs_events = True

    def __init__(self, uri: SinkURI, *, log: Log | None = None, flush: float | None = None,
                 queue: int | None = None) -> None:  # fmt: skip
        import paho.mqtt.client as mqtt

        o = uri.options
        self.uri, self.path = uri, uri.shown  # path: the name in messages and the report (no credentials)
        self.log = log or log_stderr
        self.shown = uri.shown
        self.prefix: str = o["prefix"]
        self.qos: int = o.get("qos", 1)
        self.discovery: bool = o.get("discovery", True)
        self.discovery_prefix: str = o.get("discovery_prefix", DISCOVERY_PREFIX)
        self.snapshots: bool = o.get("snapshot", False)
        self.flush = float(flush if flush is not None else o.get("flush", FLUSH))
        bound = int(queue if queue is not None else o.get("queue", QUEUE))
        self.node = topic_slug(self.prefix.replace("/", "_").replace(".", "_"))
        self.cameras, self.identities = Slugs(camera_level), Slugs(topic_slug)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.events: deque[tuple[str, bytes]] = deque()  # (topic, JSON) waiting for the broker
        self.bound = bound
        self.drops = _Drops(self.shown, self.log, bound)
        self.presence: dict[tuple[str, str], _Presence] = {}
        self.dirty: deque[tuple[str, str]] = deque()  # presence keys whose retained messages are due
        self.dirty_set: set[tuple[str, str]] = set()
        self.announced: set[tuple[str, str]] = set()  # discovery configs published on this connection
        self.announced_snap: set[tuple[str, str]] = set()  # snapshots published on this connection
        self.backlog_events = 0  # events the worker took from the queue and paho has not taken yet
        self.resync = False  # (re)connected: status, every discovery config and state again
        self.connected = False
        self.ever_connected = False
        self.down_logged = False
        self.refused: str | None = None
        self.sent = 0  # events the broker acknowledged (qos 0: written to the socket)
        self.inflight: dict[int, bool] = {}  # mid -> is an event (worker thread only)
        self.acked: deque[int] = deque()  # mids paho confirmed (its network thread appends)
        self.early: set[int] = set()  # confirmed before the worker recorded them
        self.closing = False
        self.closed = False
        self.stop = threading.Event()
        self.client_id = o.get("client_id") or f"mocha-edge-{os.getpid()}-{os.urandom(3).hex()}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                        protocol=mqtt.MQTTv311)  # fmt: skip
        if o.get("username") is not None:
            c.username_pw_set(o["username"], o.get("password"))
        if o.get("tls"):
            ctx = ssl.create_default_context(cafile=o.get("ca"))
            if o.get("insecure"):
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            c.tls_set_context(ctx)
        c.will_set(self.status_topic, OFFLINE, qos=1, retain=True)  # before connecting: the broker keeps it
        c.reconnect_delay_set(*RECONNECT)
        c.max_inflight_messages_set(INFLIGHT)
        c.on_connect, c.on_disconnect, c.on_publish = self._on_connect, self._on_disconnect, self._on_publish
        c.on_connect_fail = self._on_connect_fail
        self.client = c
        try:
            c.connect_async(o["host"], o["port"], keepalive=int(o.get("keepalive", KEEPALIVE)))
        except (OSError, ValueError) as e:
            raise SinkError(f"{self.shown}: {_scrub(str(e), _secrets(uri))}") from None
        c.loop_start()  # paho's network thread: connects, reconnects with backoff, sends
        self.worker = threading.Thread(target=self._work, name="mqtt-sink", daemon=True)
        self.worker.start()

    # topics -------------------------------------------------------------------------------------
    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    def camera_topic(self, camera: str) -> str:
        """``<prefix>/<camera>``."""
        return f"{self.prefix}/{self.cameras(camera)}"

    def identity_topic(self, camera: str, identity: str) -> str:
        """``<prefix>/<camera>/<identity>``."""
        return f"{self.camera_topic(camera)}/{self.identities(identity)}"

    def unique_id(self, camera: str, identity: str) -> str:
        """The Home Assistant ``unique_id`` (and discovery object id) of an identity on a camera."""
        return f"mocha_{self.node}_{self.cameras(camera)}_{self.identities(identity)}"

    def discovery_configs(self, camera: str, identity: str) -> list[tuple[str, dict[str, Any]]]:
        """``(topic, payload)`` of the Home Assistant discovery configs of ``identity`` on ``camera``."""
        from mocha_edge import __version__

        base = self.identity_topic(camera, identity)
        uid = self.unique_id(camera, identity)
        cam_id = f"mocha_{self.node}_{self.cameras(camera)}"
        common = {
            "availability_topic": self.status_topic,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
            "device": {"identifiers": [cam_id], "name": f"mocha-edge {camera_level(camera)}", "manufacturer": "mocha-edge",
                       "model": "personalised detector", "sw_version": __version__},
            "origin": {"name": "mocha-edge", "sw_version": __version__},
            "qos": self.qos,
        }  # fmt: skip
        out = [
            (
                f"{self.discovery_prefix}/binary_sensor/{uid}/config",
                {"name": identity, "unique_id": uid, "device_class": "presence", "state_topic": f"{base}/presence",
                 "payload_on": PAYLOAD_ON, "payload_off": PAYLOAD_OFF, "json_attributes_topic": f"{base}/attributes",
                 **common},
            )
        ]  # fmt: skip
        if self.snapshots:
            out.append(
                (
                    f"{self.discovery_prefix}/image/{uid}_snapshot/config",
                    {"name": f"{identity} snapshot", "unique_id": f"{uid}_snapshot",
                     "image_topic": f"{base}/snapshot", "content_type": "image/jpeg", **common},
                )
            )  # fmt: skip
        return out

    # the frame loop's side: never blocks -------------------------------------------------------
    def announce(self, camera: str, identities: list[str]) -> None:
        """Publish discovery configs and an ``OFF`` presence for ``identities`` on ``camera`` (a bank's
        names, before any of them is seen) -- those already known are left as they are."""
        with self.lock:
            for name in identities:
                self._state(camera, str(name))
        self.wake.set()

    def _state(self, camera: str, identity: str) -> _Presence:
        key = (camera, identity)
        p = self.presence.get(key)
        if p is None:
            p = self.presence[key] = _Presence(camera, identity)
            p.set(False)
            self._mark(key)
        return p

    def _mark(self, key: tuple[str, str]) -> None:
        if key not in self.dirty_set:
            self.dirty_set.add(key)
            self.dirty.append(key)

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: Any) -> None:
        """Not used (``needs_events``): events come through :meth:`write_events`."""

    def write_events(self, frame: Frame, events: list[Event]) -> None:
        """Queue the frame's events and update the presence states (no I/O here)."""
        if not events or self.closing:
            return
        with self.lock:
            for e in events:
                rec = e.record()
                camera = e.camera or frame.source_name
                self.events.append((f"{self.camera_topic(camera)}/events",
                                    json.dumps(rec, separators=(",", ":"), allow_nan=False).encode()))  # fmt: skip
                if len(self.events) > self.bound:
                    self.events.popleft()
                    self.drops.add(1, f"{self.bound} events queued, the broker is not taking them")
                self._presence(camera, e, rec)
        self.wake.set()

    def _presence(self, camera: str, e: Event, rec: dict[str, Any]) -> None:
        attrs = {k: rec.get(k) for k in ("event", "track_id", "similarity", "t", "box_xyxy", "cls")}
        if e.kind == "changed" and e.previous is not None:
            p = self._state(camera, e.previous)
            p.attributes = {"identity": e.previous, "camera": camera, **attrs}
            p.set(False)
            self._mark((camera, e.previous))
        if e.identity is None:
            return
        key = (camera, e.identity)
        p = self.presence.get(key) or self.presence.setdefault(key, _Presence(camera, e.identity))
        p.attributes = {"identity": e.identity, "camera": camera, **attrs}
        if e.kind in ("identified", "changed"):
            p.set(True)
            if self.snapshots and e.snapshot is not None and e.snapshot.size:
                p.snapshot, p.snapshot_new = e.snapshot, True
        elif e.kind == "leave" or p.on is None:
            p.set(False)
        self._mark(key)

    # paho's network thread ----------------------------------------------------------------------
    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            why = str(reason)
            if why != self.refused:
                self.refused = why
                self.log(f"warning: {self.shown}: the broker refused the connection ({why}); retrying")
            return
        self.refused = None
        if self.down_logged or not self.ever_connected:
            again = " again" if self.ever_connected or self.down_logged else ""
            self.log(f"{self.shown}: connected{again}")
        self.connected, self.ever_connected, self.down_logged = True, True, False
        with self.lock:
            self.resync = True
        self.wake.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        self.connected = False
        if not self.closing and not self.down_logged:
            self.down_logged = True
            self.log(f"warning: {self.shown}: connection lost ({reason}); reconnecting with backoff "
                     f"({RECONNECT[0]} s to {RECONNECT[1]} s), events held up to {self.bound}")  # fmt: skip

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        if not self.down_logged and not self.closing:
            self.down_logged = True
            self.log(f"warning: {self.shown}: cannot reach the broker; retrying with backoff ({RECONNECT[0]} s "
                     f"to {RECONNECT[1]} s), events held up to {self.bound} (the run goes on)")  # fmt: skip

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any = None, properties: Any = None
    ) -> None:
        self.acked.append(mid)

    # the worker thread --------------------------------------------------------------------------
    def _settle(self) -> None:
        """Count what paho confirmed."""
        while self.acked:
            mid = self.acked.popleft()
            if mid in self.inflight:
                self.sent += self.inflight.pop(mid)
            else:
                self.early.add(mid)

    def _publish(self, topic: str, payload: bytes | str, retain: bool, event: bool) -> bool:
        """Hand one message to paho; False when it did not take it (disconnected)."""
        import paho.mqtt.client as mqtt

        info = self.client.publish(topic, payload, qos=self.qos, retain=retain)
        # qos 1/2 while disconnected: paho keeps the message and sends it once connected
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not (info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0):
            return False
        if info.mid in self.early:
            self.early.discard(info.mid)
            self.sent += event
        else:
            self.inflight[info.mid] = event
        return True

    def _retained(self, key: tuple[str, str]) -> list[tuple[str, bytes | str]]:
        """The retained messages of one presence state (discovery first, once per connection)."""
        camera, identity = key
        with self.lock:
            p = self.presence[key]
            on = p.pending.popleft() if p.pending else None  # None: no change to publish
            if p.pending:
                self._mark(key)  # the next change in a later round: in order, never merged
            attrs, snap, snap_new = p.attributes, p.snapshot, p.snapshot_new
            p.snapshot_new = False
        out: list[tuple[str, bytes | str]] = []
        if self.discovery and key not in self.announced:
            out += [
                (t, json.dumps(c, separators=(",", ":"))) for t, c in self.discovery_configs(camera, identity)
            ]
            self.announced.add(key)
        base = self.identity_topic(camera, identity)
        if on is not None:
            out.append((f"{base}/presence", PAYLOAD_ON if on else PAYLOAD_OFF))
        if attrs is not None:
            out.append((f"{base}/attributes", json.dumps(attrs, separators=(",", ":"), allow_nan=False)))
        if snap is not None and (snap_new or key not in self.announced_snap):
            import cv2

            ok, jpg = cv2.imencode(".jpg", snap, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                out.append((f"{base}/snapshot", jpg.tobytes()))
                self.announced_snap.add(key)
        return out

    def _work(self) -> None:
        backlog: deque[tuple[str, bytes | str, bool, bool]] = deque()  # built, not yet taken by paho
        while True:
            self.wake.wait(0.2)
            self.wake.clear()
            self._settle()
            if self.stop.is_set():
                return
            if not self.connected:
                continue
            with self.lock:
                resync, self.resync = self.resync, False
                if resync:  # a new connection: every state again (the broker may have lost them)
                    for key, p in self.presence.items():
                        if not p.pending and p.on is not None:
                            p.pending.append(p.on)
                        self._mark(key)
            if resync:
                self.announced.clear()
                self.announced_snap.clear()
                backlog.appendleft((self.status_topic, ONLINE, True, False))
            while self.connected and len(self.inflight) < INFLIGHT:
                self._settle()
                if not backlog:
                    with self.lock:
                        key = self.dirty.popleft() if self.dirty else None
                        if key is not None:
                            self.dirty_set.discard(key)
                        msg = self.events.popleft() if key is None and self.events else None
                    if key is not None:
                        backlog.extend((t, pl, True, False) for t, pl in self._retained(key))
                    elif msg is not None:
                        backlog.append((msg[0], msg[1], False, True))
                    else:
                        break
                topic, payload, retain, event = backlog[0]
                if not self._publish(topic, payload, retain, event):
                    break
                backlog.popleft()
            with self.lock:  # what is built but not handed over still counts as queued events
                self.backlog_events = sum(1 for *_, ev in backlog if ev)

    def pending(self) -> int:
        """Events not yet confirmed by the broker (queued, or handed to paho)."""
        with self.lock:
            queued = len(self.events) + self.backlog_events
        return queued + sum(1 for ev in list(self.inflight.values()) if ev)

    def idle(self) -> bool:
        """Nothing left to deliver (events and retained states)."""
        with self.lock:
            busy = bool(self.events or self.dirty or self.resync or self.backlog_events)
        return not busy and not self.inflight

    def close(self) -> SinkReport:
        """Deliver what can be within ``flush`` seconds, publish ``offline``, disconnect, and report."""
        if not self.closed:
            self.closed = self.closing = True
            deadline = time.monotonic() + self.flush
            self.wake.set()
            while time.monotonic() < deadline and not self.idle():  # connecting, or delivering
                time.sleep(0.01)
                self.wake.set()
            self.stop.set()
            self.wake.set()
            self.worker.join(max(0.5, deadline - time.monotonic()))
            self._settle()
            if self.connected:
                info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
                with contextlib.suppress(ValueError, RuntimeError):  # lost meanwhile: the will says it
                    info.wait_for_publish(max(0.2, min(1.0, deadline - time.monotonic())))
                self.client.disconnect()
            stopper = threading.Thread(target=self.client.loop_stop, daemon=True)
            stopper.start()
            stopper.join(max(0.5, deadline - time.monotonic()))
            self._settle()
        pending = self.pending()
        notes = []
        if not self.ever_connected:
            notes.append("the broker was never reached")
        if self.snapshots or self.presence:
            notes.append(f"{len(self.presence)} presence states")
        return SinkReport(self.path, "mqtt", self.sent, "events", note=", ".join(notes),  # type: ignore[arg-type]
                          buffered=pending, dropped=self.drops.count)  # fmt: skip


# ------------------------------------------------------------------------------------------ webhooks
class WebhookSink(Sink):
    """Events POSTed as JSON to a URL, from a worker thread, with retries and backoff (module doc)."""

    needs_events = True

    def __init__(self, uri: SinkURI, *, log: Log | None = None, backoff: tuple[float, float] = BACKOFF,
                 flush: float | None = None) -> None:  # fmt: skip
        import urllib3

        o = uri.options
        self.uri, self.path, self.shown = uri, uri.shown, uri.shown
        self.log = log or log_stderr
        self.url: str = o["url"]
        self.batch: bool = o.get("batch", False)
        self.tries = int(o.get("tries", TRIES))
        self.timeout = float(o.get("timeout", TIMEOUT))
        self.bound = int(o.get("queue", QUEUE))
        self.flush = float(flush if flush is not None else o.get("flush", FLUSH))
        self.backoff = backoff
        self.secrets = _secrets(uri)
        from mocha_edge import __version__

        self.headers = {"Content-Type": "application/json", "User-Agent": f"mocha-edge/{__version__}"}
        if o.get("username") is not None:
            self.headers.update(urllib3.make_headers(basic_auth=f"{o['username']}:{o.get('password') or ''}"))
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(self.timeout))
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.queue: deque[tuple[bytes, int]] = deque()  # (JSON body, events in it)
        self.queued = 0  # events in queue
        self.current = 0  # events in the POST being tried
        self.drops = _Drops(self.shown, self.log, self.bound)
        self.sent = self.posts = self.retries = 0
        self.failing: str | None = None  # why the last attempt failed (None: working)
        self.deadline = math.inf
        self.closing = self.closed = False
        self.worker = threading.Thread(target=self._work, name="webhook-sink", daemon=True)
        self.worker.start()

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: Any) -> None:
        """Not used (``needs_events``)."""

    def write_events(self, frame: Frame, events: list[Event]) -> None:
        """Queue the frame's events (one body each, or one per frame with ``batch``); no I/O here."""
        if not events or self.closing:
            return
        recs = [e.record() for e in events]
        bodies = [(json.dumps(recs, separators=(",", ":"), allow_nan=False).encode(), len(recs))] if self.batch \
            else [(json.dumps(r, separators=(",", ":"), allow_nan=False).encode(), 1) for r in recs]  # fmt: skip
        with self.lock:
            for body in bodies:
                self.queue.append(body)
                self.queued += body[1]
                while self.queued > self.bound and len(self.queue) > 1:
                    _, n = self.queue.popleft()
                    self.queued -= n
                    self.drops.add(n, f"{self.bound} events queued, the server is not taking them")
        self.wake.set()

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the close deadline comes first; False when it did."""
        end = min(time.monotonic() + seconds, self.deadline)
        while time.monotonic() < end:
            self.stop.wait(min(0.05, end - time.monotonic()))
        return time.monotonic() < self.deadline

    def _attempt(self, body: bytes) -> tuple[bool, bool, float | None, str]:
        """One POST: ``(delivered, worth retrying, Retry-After seconds, why not)``."""
        import urllib3

        try:
            r = self.http.request("POST", self.url, body=body, headers=self.headers, redirect=False,
                                  timeout=urllib3.Timeout(min(self.timeout, max(0.1, self.deadline - time.monotonic()))))  # fmt: skip
        except urllib3.exceptions.HTTPError as e:
            return False, True, None, _scrub(f"{type(e).__name__}: {e}", self.secrets)
        if 200 <= r.status < 300:
            return True, False, None, ""
        after = None
        if r.status == 429:
            try:
                after = min(BACKOFF[1], max(0.0, float(r.headers.get("Retry-After", ""))))
            except ValueError:
                after = None
        return (
            False,
            r.status >= 500 or r.status in (408, 429),
            after,
            f"HTTP {r.status} {r.reason or ''}".strip(),
        )

    def _deliver(self, body: bytes, n: int) -> None:
        """Send one body with retries; count it as sent or dropped (or leave it pending at the deadline)."""
        for attempt in range(self.tries):
            ok, again, after, why = self._attempt(body)
            if ok:
                self.sent += n
                self.posts += 1
                if self.failing is not None:
                    self.log(f"{self.shown}: delivering again")
                    self.failing = None
                return
            if self.failing is None:
                self.log(f"warning: {self.shown}: {why}; retrying with backoff (the run goes on)"
                         if again else f"warning: {self.shown}: {why} (not retried)")  # fmt: skip
            self.failing = why
            if not again or attempt == self.tries - 1:
                break
            self.retries += 1
            first, cap = self.backoff
            delay = after if after is not None else min(cap, first * 2**attempt) * random.uniform(0.5, 1.0)
            if not self._wait(delay):
                with self.lock:  # the close deadline: still pending
                    self.queue.appendleft((body, n))
                    self.queued += n
                return
        self.drops.add(n, f"{self.failing} after {self.tries} tries" if self.failing else "not delivered")

    def _work(self) -> None:
        while True:
            with self.lock:
                item = self.queue.popleft() if self.queue else None
                if item is not None:
                    self.queued -= item[1]
                    self.current = item[1]
            if item is None:
                if self.stop.is_set():
                    return
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            if time.monotonic() >= self.deadline:
                with self.lock:
                    self.queue.appendleft(item)
                    self.queued += item[1]
                    self.current = 0
                return
            self._deliver(*item)
            with self.lock:
                self.current = 0
            if time.monotonic() >= self.deadline:
                return

    def pending(self) -> int:
        """Events queued or being sent."""
        with self.lock:
            return self.queued + self.current

    def close(self) -> SinkReport:
        """Deliver what can be within ``flush`` seconds, then report sent / dropped / pending."""
        if not self.closed:
            self.closed = self.closing = True
            self.deadline = time.monotonic() + self.flush
            self.stop.set()
            self.wake.set()
            self.worker.join(self.flush + self.timeout + 1.0)
            self.http.clear()
        note = f"{self.retries} retries" if self.retries else ""
        return SinkReport(self.path, "webhook", self.sent, "events", note=note,  # type: ignore[arg-type]
                          buffered=self.pending(), dropped=self.drops.count)  # fmt: skip


__all__ = [
    "DISCOVERY_PREFIX",
    "MqttSink",
    "Slugs",
    "WebhookSink",
    "network_key",
    "open_network",
    "parse_mqtt",
    "parse_network",
    "parse_webhook",
    "topic_slug",
]
