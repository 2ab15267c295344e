"""Events to MQTT (Home Assistant) and webhooks, against a real broker (Debian's mosquitto, started here on a
free loopback port) and a real local HTTP server: delivery, retained presence, discovery payloads checked
against Home Assistant's documented fields, the last will, a broker that is down or stops answering, slugs,
credentials kept out of every message, retries/backoff/drops of webhooks, and the live loop end to end."""

from __future__ import annotations

import getpass
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from mocha_edge.deploy.notify import MqttSink, Slugs, WebhookSink, topic_slug
from mocha_edge.deploy.sinks import SinkError, open_sink, open_sinks, parse_sink, sink_paths
from mocha_edge.deploy.tracking import Event

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None,
    reason="the mosquitto broker is not installed (apt-get install mosquitto; .ci/run does)",
)
PASSWORD = "s3cret-Pa55"


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process on a loopback port: start, stop, pause (SIGSTOP: a peer that stops answering)."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None) -> None:
        self.port, self.folder = free_port(), folder
        # as root mosquitto drops to the user "mosquitto", who cannot read a private temporary folder
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", f"user {getpass.getuser()}"]
        if users:
            pw = folder / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True
                )
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip("the mosquitto broker is not installed (apt-get install mosquitto; .ci/run does)")
    b = Broker(tmp_path).start()
    yield b
    b.stop()


class Sub:
    """A paho subscriber that collects every message: ``(topic, payload bytes, retained)``."""

    def __init__(self, port: int, topic: str = "#", **auth: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        if auth:
            self.c.username_pw_set(auth["username"], auth["password"])
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()

    def _on_message(self, client, userdata, m) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait(self, pred, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if pred(list(self.messages)):
                    return True
            time.sleep(0.02)
        return False

    def wait_topic(self, topic: str, payload: bytes | None = None, n: int = 1, timeout: float = 10.0) -> bool:
        return self.wait(lambda ms: sum(t == topic and (payload is None or p == payload) for t, p, _ in ms) >= n,
                         timeout)  # fmt: skip

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def frame(i: int = 0, camera: str = "garden") -> SimpleNamespace:
    return SimpleNamespace(source_name=camera, index=i, t=float(i) / 10, image_bgr=None)


def event(kind: str, identity: str | None, tid: int = 1, i: int = 0, camera: str = "garden", **kw) -> Event:
    return Event(
        kind, camera, tid, i / 10, i, "dog", identity, 0.8 if identity else None, [1, 2, 30, 40], 0.9, **kw
    )


def life(
    identity: str, tid: int = 1, camera: str = "garden", snapshot: np.ndarray | None = None
) -> list[list]:
    """One track's events by frame: enter, identified, leave."""
    return [
        [event("enter", None, tid, 0, camera)],
        [event("identified", identity, tid, 3, camera, snapshot=snapshot)],
        [event("leave", identity, tid, 30, camera, first_seen=0.0)],
    ]


# Home Assistant's documented MQTT discovery fields (home-assistant.io/integrations/mqtt/ "Discovery messages",
# /integrations/binary_sensor.mqtt/, /integrations/image.mqtt/): full names and their documented abbreviations.
HA_COMMON = {
    "availability": "avty", "availability_mode": "avty_mode", "availability_template": "avty_tpl",
    "availability_topic": "avty_t", "payload_available": "pl_avail", "payload_not_available": "pl_not_avail",
    "device": "dev", "enabled_by_default": "en", "encoding": "e", "entity_category": "ent_cat",
    "entity_picture": "ent_pic", "icon": "ic", "json_attributes_template": "json_attr_tpl",
    "json_attributes_topic": "json_attr_t", "name": "name", "object_id": "obj_id", "default_entity_id": None,
    "origin": "o", "qos": "qos", "unique_id": "uniq_id", "platform": "p",
}  # fmt: skip
HA_COMPONENTS = {
    "binary_sensor": {
        "fields": {**HA_COMMON, "device_class": "dev_cla", "expire_after": "exp_aft", "force_update": "frc_upd",
                   "off_delay": "off_dly", "payload_off": "pl_off", "payload_on": "pl_on", "state_topic": "stat_t",
                   "value_template": "val_tpl"},
        "required": {"state_topic"},
        "device_classes": {"presence", "occupancy", "motion"},
    },
    "image": {
        "fields": {**HA_COMMON, "content_type": "cont_type", "image_encoding": "img_e", "image_topic": "img_t",
                   "url_template": "url_tpl", "url_topic": "url_t"},
        "required": set(),  # image_topic or url_topic
        "device_classes": set(),
    },
}  # fmt: skip
HA_DEVICE = {"configuration_url": "cu", "connections": "cns", "hw_version": "hw", "identifiers": "ids",
             "manufacturer": "mf", "model": "mdl", "model_id": "mdl_id", "name": "name", "serial_number": "sn",
             "suggested_area": "sa", "sw_version": "sw", "via_device": "via_device"}  # fmt: skip
HA_ORIGIN = {"name": "name", "sw_version": "sw", "support_url": "url"}
HA_ID = re.compile(r"[a-zA-Z0-9_-]+")
TOPIC_LEVEL = re.compile(r"[^+#/\x00]+")


def check_discovery(topic: str, payload: dict) -> str:
    """Check one discovery message against Home Assistant's documented fields; its component."""

    def full(d: dict, table: dict) -> dict:
        names = {v: k for k, v in table.items() if v}
        unknown = [k for k in d if k not in table and k not in names]
        assert not unknown, f"{topic}: fields Home Assistant does not document: {unknown}"
        out = {names.get(k, k): v for k, v in d.items()}
        assert len(out) == len(d), f"{topic}: a field given both in full and abbreviated"
        return out

    levels = topic.split("/")
    assert len(levels) in (4, 5) and levels[-1] == "config", (
        topic
    )  # <prefix>/<component>/[<node_id>/]<object_id>/config
    component = levels[1]
    assert component in HA_COMPONENTS, topic
    assert all(HA_ID.fullmatch(x) for x in levels[2:-1]), f"{topic}: node_id/object_id outside [a-zA-Z0-9_-]"
    spec = HA_COMPONENTS[component]
    p = full(payload, spec["fields"])
    assert spec["required"] <= p.keys(), f"{topic}: missing {spec['required'] - p.keys()}"
    if component == "image":
        assert "image_topic" in p or "url_topic" in p
        assert p.get("content_type", "image/jpeg").startswith("image/")
    if spec["device_classes"]:
        assert p["device_class"] in spec["device_classes"]
    assert HA_ID.fullmatch(p["unique_id"]), p["unique_id"]
    assert not ("availability" in p and "availability_topic" in p), (
        "availability and availability_topic exclude"
    )
    for key in ("state_topic", "availability_topic", "json_attributes_topic", "image_topic"):
        if key in p:
            assert all(TOPIC_LEVEL.fullmatch(x) for x in p[key].split("/")), (
                f"{key} {p[key]!r} is not a topic"
            )
    if "device" in p:  # a device needs identifiers or connections, and an entity with a device a unique_id
        dev = full(p["device"], HA_DEVICE)
        assert dev.get("identifiers") or dev.get("connections")
    if "origin" in p:
        assert "name" in full(p["origin"], HA_ORIGIN)
    assert p.get("qos", 0) in (0, 1, 2)
    return component


# ------------------------------------------------------------------------------------------ URIs
def test_network_uris_parse() -> None:
    u = parse_sink("mqtt://cam:p%40ss@Broker.lan:1884/home/mocha?snapshot=1&qos=2&queue=50")
    assert (
        u.kind == "mqtt"
        and u.path == u.shown == "mqtt://cam:***@Broker.lan:1884/home/mocha?snapshot=1&qos=2&queue=50"
    )
    assert {k: u.options[k] for k in ("host", "port", "prefix", "username", "password", "snapshot", "qos", "queue")} == {
        "host": "broker.lan", "port": 1884, "prefix": "home/mocha", "username": "cam", "password": "p@ss",
        "snapshot": True, "qos": 2, "queue": 50,
    }  # fmt: skip
    assert (
        parse_sink("mqtt://h").options["prefix"] == "mocha" and parse_sink("mqtt://h").options["port"] == 1883
    )
    assert parse_sink("mqtts://h/x").options["port"] == 8883 and parse_sink("mqtts://h/x").options["tls"]
    w = parse_sink("https://u:pw@h.example/hook?token=abc123&x=1#batch=1&tries=3&timeout=0.5")
    assert (
        w.kind == "webhook"
        and w.shown == "https://u:***@h.example/hook?token=***&x=1#batch=1&tries=3&timeout=0.5"
    )
    assert w.options["url"] == "https://h.example/hook?token=abc123&x=1"  # no userinfo, no fragment
    assert (w.options["batch"], w.options["tries"], w.options["timeout"]) == (True, 3, 0.5)
    # the same broker and prefix twice is one client twice; the files of the others still come back
    with pytest.raises(SinkError, match=r"^mqtt://h:1883/m: the same broker and prefix as mqtt://h/m "):
        sink_paths([parse_sink("mqtt://h/m"), parse_sink("mqtt://h:1883/m")])
    assert sink_paths([parse_sink("mqtt://h/m"), parse_sink("mqtt://h/n"), parse_sink("e.jsonl")]) == [
        Path("e.jsonl")
    ]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("mqtt://", r"^mqtt://: no host \(e.g. mqtt://192.168.1.10\)$"),
        ("mqtt://h:99999/x", r"^mqtt://h:99999/x: the port is not a number in 1-65535$"),
        ("mqtt://h:abc", r"the port is not a number"),
        ("mqtt://h/a/+/b", r"topic prefix 'a/\+/b' must be levels of letters"),
        ("mqtt://h/a#b", r"has no #fragment"),
        ("mqtt://h/a//b", r"topic prefix 'a//b' must be levels"),
        ("mqtt://h?color=red", r"unknown option 'color' \(valid for mqtt: discovery, discovery_prefix, snapshot"),
        ("mqtt://h?qos=3", r"qos='3' must be 0, 1 or 2$"),
        ("mqtt://h?snapshot=yes", r"snapshot='yes' must be 0 or 1$"),
        ("mqtt://h?queue=0", r"queue='0' must be a whole number > 0$"),
        ("mqtt://h?flush=nan", r"flush='nan' must be a number > 0$"),
        ("mqtt://h?discovery_prefix=a/b", r"discovery_prefix='a/b' must be one topic level"),
        ("mqtt://h?insecure=1", r"ca= and insecure= are for mqtts://"),
        ("mqtts://h?ca=/no/such.pem", r"ca='/no/such.pem' is not a file$"),
        ("mqtt://cam:s3cret@h:0/x", r"^mqtt://cam:\*\*\*@h:0/x: the port"),
        ("https://", r"^https://: no host"),
        ("http://h/hook#tries=0", r"tries='0' must be a whole number > 0$"),
        ("http://h/hook#retries=3", r"unknown option 'retries' after '#' \(valid for a webhook: batch, tries"),
        ("http://h/hook#frag", r"unknown option 'frag' after '#'"),
        ("https://h/hook?token=abc#timeout=-1", r"^https://h/hook\?token=\*\*\*#timeout=-1: timeout='-1' must be"),
        ("ftp://h/e.jsonl", r"unknown output scheme 'ftp' \(valid: a path, file://, mqtt://, mqtts://, http://, https://\)$"),
    ],
)  # fmt: skip
def test_bad_network_uris_are_one_line_errors(uri: str, message: str) -> None:
    with pytest.raises(SinkError, match=message) as e:
        parse_sink(uri)
    assert "\n" not in str(e.value) and "s3cret" not in str(e.value)


def test_topic_slugs_never_collide() -> None:
    assert topic_slug("rex") == "rex" and topic_slug("Blue_forklift-3") == "Blue_forklift-3"
    for name in ("a/b", "a+b", "a#b", "a b", "Zoë", "狗", "", "x" * 65):
        slug = topic_slug(name)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", slug) and len(slug) <= 64, (name, slug)
    assert topic_slug("Zoë").startswith("Zoe-") and topic_slug("a/b").startswith("a_b-")
    assert len({topic_slug(n) for n in ("a/b", "a+b", "a b", "a_b")}) == 4  # the same letters, four topics
    s = Slugs()
    taken = s("a b")  # a_b-<hash>; then a name that is literally that slug
    assert s(taken) != taken and s(taken).startswith(taken[:40]) and s("a b") == taken
    assert len({s(n) for n in ("a b", taken, "a/b", "a_b")}) == 4


# ------------------------------------------------------------------------------------------ MQTT
@needs_broker
def test_events_presence_and_discovery_arrive(broker: Broker) -> None:
    sub = Sub(broker.port)
    logs: list[str] = []
    name = "Rex/the #1 dog"  # unsafe in topics: slugged there, exact in payloads
    sink = open_sink(f"mqtt://127.0.0.1:{broker.port}/home/mocha", log=logs.append)
    assert isinstance(sink, MqttSink) and sink.needs_events and not sink.needs_records
    sink.announce("garden", ["bowl"])  # a bank's identity not seen yet: discovery + OFF
    for i, evs in enumerate(life(name) + life("Rex+the 1 dog", tid=2)):
        sink.write_events(frame(i), evs)
        sink.write_events(frame(i), [])  # what the loop does on a frame without events
    ident = topic_slug(name)
    base = f"home/mocha/garden/{ident}"
    assert sub.wait_topic(f"{base}/presence", b"OFF")
    assert sub.wait(lambda ms: sum(t == "home/mocha/garden/events" for t, *_ in ms) == 6)
    events = [json.loads(p) for p in sub.on("home/mocha/garden/events")]
    assert [e["event"] for e in events] == ["enter", "identified", "leave"] * 2
    assert events[1]["identity"] == name and events[4]["identity"] == "Rex+the 1 dog"
    assert sub.on(f"{base}/presence") == [b"ON", b"OFF"]
    attrs = json.loads(sub.on(f"{base}/attributes")[-1])
    assert attrs["identity"] == name and attrs["event"] == "leave" and attrs["camera"] == "garden"
    other = f"home/mocha/garden/{topic_slug('Rex+the 1 dog')}/presence"
    assert other != f"{base}/presence" and sub.on(other) == [b"ON", b"OFF"]
    assert sub.on("home/mocha/garden/bowl/presence") == [b"OFF"]
    report = sink.close()
    assert (report.kind, report.count, report.dropped, report.buffered) == ("mqtt", 6, 0, 0)
    assert report.line().startswith(f"wrote mqtt://127.0.0.1:{broker.port}/home/mocha (6 events")
    assert sub.wait_topic("home/mocha/status", b"offline")
    assert sub.on("home/mocha/status") == [b"online", b"offline"]
    assert logs == [f"mqtt://127.0.0.1:{broker.port}/home/mocha: connected"]
    sub.close()
    # a subscriber that comes later gets the retained state: status, presence, attributes, discovery
    late = Sub(broker.port)
    assert late.wait_topic("home/mocha/status", b"offline")
    assert late.wait(lambda ms: sum(t.startswith("homeassistant/") for t, *_ in ms) == 3)
    retained = {t: (p, r) for t, p, r in late.messages}
    assert retained[f"{base}/presence"] == (b"OFF", True)
    assert not any(t.endswith("/events") for t in retained)  # events are not retained
    configs = {t: json.loads(p) for t, (p, r) in retained.items() if t.startswith("homeassistant/") and r}
    assert len(configs) == 3 and all(check_discovery(t, c) == "binary_sensor" for t, c in configs.items())
    cfg = configs[f"homeassistant/binary_sensor/mocha_home_mocha_garden_{ident}/config"]
    assert cfg["name"] == name and cfg["state_topic"] == f"{base}/presence"
    assert cfg["device_class"] == "presence" and (cfg["payload_on"], cfg["payload_off"]) == ("ON", "OFF")
    assert (cfg["availability_topic"], cfg["payload_available"], cfg["payload_not_available"]) == (
        "home/mocha/status", "online", "offline",
    )  # fmt: skip
    assert cfg["device"]["identifiers"] == ["mocha_home_mocha_garden"]
    late.close()


@needs_broker
def test_snapshot_image_and_cameras(broker: Broker) -> None:
    sub = Sub(broker.port)
    shot = np.zeros((40, 30, 3), np.uint8)
    shot[:, :, 2] = 200
    sink = open_sink(f"mqtt://127.0.0.1:{broker.port}?snapshot=1&discovery_prefix=ha")
    for evs in life("rex", camera="rtsp://admin:***@10.0.0.5:554/stream1", snapshot=shot) + life(
        "rex", camera="yard"
    ):
        sink.write_events(frame(), evs)
    assert sink.close().count == 6
    cam = "10_0_0_5_554_stream1"  # the source's name as a topic level
    assert sub.wait_topic(f"mocha/{cam}/rex/snapshot") and sub.wait_topic("mocha/yard/rex/presence", b"OFF")
    jpg = cv2.imdecode(np.frombuffer(sub.on(f"mocha/{cam}/rex/snapshot")[0], np.uint8), cv2.IMREAD_COLOR)
    assert jpg.shape == shot.shape and abs(float(jpg[..., 2].mean()) - 200) < 5
    assert not sub.on("mocha/yard/rex/snapshot")  # no best shot came with that camera's events
    configs = {t: json.loads(p) for t, p, _ in sub.messages if t.startswith("ha/")}
    assert {check_discovery(t, c) for t, c in configs.items()} == {"binary_sensor", "image"} and len(
        configs
    ) == 4
    img = configs[f"ha/image/mocha_mocha_{cam}_rex_snapshot/config"]
    assert img["image_topic"] == f"mocha/{cam}/rex/snapshot" and img["content_type"] == "image/jpeg"
    assert img["device"]["name"] == f"mocha-edge {cam}"
    assert json.loads(sub.on(f"mocha/{cam}/events")[0])["camera"] == "rtsp://admin:***@10.0.0.5:554/stream1"
    sub.close()


@needs_broker
def test_credentials_never_shown(tmp_path: Path) -> None:
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed")
    b = Broker(tmp_path, users={"cam": PASSWORD}).start()
    try:
        sub = Sub(b.port, username="cam", password=PASSWORD)
        logs: list[str] = []
        good = open_sink(f"mqtt://cam:{PASSWORD}@127.0.0.1:{b.port}/m", log=logs.append)
        bad = open_sink(f"mqtt://cam:wrong-{PASSWORD}@127.0.0.1:{b.port}/m2", log=logs.append)
        for evs in life("rex"):
            good.write_events(frame(), evs)
            bad.write_events(frame(), evs)
        assert sub.wait_topic("m/garden/rex/presence", b"OFF")
        deadline = time.monotonic() + 10
        while not any("refused" in line for line in logs) and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [*logs, good.close().line(), bad.close().line()]
        assert any("m2: the broker refused the connection (Not authorized); retrying" in x for x in lines), (
            lines
        )
        assert "wrote mqtt://cam:***@127.0.0.1" in lines[-2] and "the broker was never reached" in lines[-1]
        assert "3 events NOT written" in lines[-1]
        assert not any(PASSWORD in x for x in lines), lines
        assert not any(PASSWORD.encode() in p for _, p, _ in sub.messages)
        sub.close()
    finally:
        b.stop()


@needs_broker
def test_last_will_says_offline_when_the_process_dies(broker: Broker) -> None:
    sub = Sub(broker.port)
    code = textwrap.dedent(f"""
        import time
        from mocha_edge.deploy.sinks import open_sink
        s = open_sink("mqtt://127.0.0.1:{broker.port}/lwt?keepalive=5")
        while not s.connected:
            time.sleep(0.02)
        print("up", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == "up"
        assert sub.wait_topic("lwt/status", b"online")
        p.kill()  # no clean disconnect: the broker sends the will
        p.wait(10)
        assert sub.wait_topic("lwt/status", b"offline", timeout=10)
    finally:
        p.kill()
    sub.close()
    late = Sub(broker.port)  # retained: Home Assistant, starting later, sees it unavailable too
    assert late.wait(lambda ms: ("lwt/status", b"offline", True) in ms)
    late.close()


@needs_broker
def test_broker_down_at_start_then_up(tmp_path: Path) -> None:
    b = Broker(tmp_path)
    logs: list[str] = []
    sink = open_sink(f"mqtt://127.0.0.1:{b.port}/m", log=logs.append)  # nothing listens there: no exit
    evs = [e for step in life("rex") for e in step]
    t0 = time.perf_counter()
    sink.write_events(frame(), evs)
    assert time.perf_counter() - t0 < 0.25  # not waiting on a connection (a block would be seconds)
    deadline = time.monotonic() + 10
    while not logs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (
        logs and "cannot reach the broker; retrying with backoff" in logs[0] and "the run goes on" in logs[0]
    )
    b.start()
    try:
        sub = Sub(b.port)
        assert sub.wait_topic("m/garden/events", n=3, timeout=15)  # held events sent once connected
        assert sub.wait_topic("m/garden/rex/presence", b"OFF")
        assert sink.close().count == 3 and any(x.endswith("connected again") for x in logs), logs
        sub.close()
    finally:
        b.stop()


@needs_broker
def test_broker_that_stops_answering_never_blocks_the_loop(broker: Broker) -> None:
    """SIGSTOP: the TCP peer is there but answers nothing. ``write_events`` stays fast, the queue stays
    bounded (the oldest dropped, counted, one log line), and after SIGCONT the rest is delivered."""
    sub = Sub(broker.port)
    logs: list[str] = []
    sink = open_sink(f"mqtt://127.0.0.1:{broker.port}/m?queue=300", log=logs.append)
    sink.write_events(frame(), [event("identified", "rex", 1)])
    assert sub.wait_topic("m/garden/events")
    broker.pause()
    worst, n = 0.0, 1
    try:
        for i in range(1500):
            t0 = time.perf_counter()
            sink.write_events(frame(i), [event("enter", None, 100 + i, i)])
            worst = max(worst, time.perf_counter() - t0)
            n += 1
            if i % 100 == 0:
                time.sleep(0.01)  # the worker and paho's thread run meanwhile
        # never blocks: a call that waited on the stopped broker would take seconds, not a scheduling hiccup
        assert worst < 0.1, f"write_events took {worst * 1e3:.1f} ms with the broker stopped"
        assert sink.pending() <= 300 + 100 + 1  # the queue plus what paho holds in flight
        assert sink.drops.count >= 1500 - 401
        assert sum("dropping events" in x for x in logs) == 1, logs
    finally:
        broker.resume()
    assert sub.wait(lambda ms: sum(t == "m/garden/events" for t, *_ in ms) >= n - sink.drops.count, 15)
    rep = sink.close()
    assert rep.count + rep.dropped + rep.buffered == n and rep.buffered == 0
    assert f"{rep.dropped} events dropped" in rep.line()
    sub.close()


@needs_broker
def test_close_with_a_stopped_broker_keeps_its_deadline(broker: Broker) -> None:
    sink = open_sink(f"mqtt://127.0.0.1:{broker.port}/m?flush=1")
    sink.write_events(frame(), [event("identified", "rex")])
    deadline = time.monotonic() + 10
    while sink.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    broker.pause()
    try:
        sink.write_events(frame(1), [event("leave", "rex", first_seen=0.0)])
        t0 = time.monotonic()
        rep = sink.close()
        assert time.monotonic() - t0 < 3.5
        assert (rep.count, rep.buffered) == (1, 1) and "1 events NOT written" in rep.line()
    finally:
        broker.resume()


# ------------------------------------------------------------------------------------------ webhooks
class Hook:
    """A local HTTP server answering POSTs from a script of statuses (then 200); records every request."""

    def __init__(self, script: list[int | tuple[int, dict]] | None = None, delay: float = 0.0) -> None:
        self.script, self.delay = list(script or []), delay
        self.requests: list[tuple[str, dict, bytes, float]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.requests.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                )
                if hook.delay:
                    time.sleep(hook.delay)
                step = hook.script.pop(0) if hook.script else 200
                status, headers = step if isinstance(step, tuple) else (step, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, status_ok: bool = False) -> list:
        return [json.loads(b) for _, _, b, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook(url: str, logs: list[str], **kw) -> WebhookSink:
    return WebhookSink(parse_sink(url), log=logs.append, backoff=kw.pop("backoff", (0.05, 0.4)), **kw)


def test_webhook_retries_500_then_delivers() -> None:
    hook = Hook([500, 502])
    logs: list[str] = []
    sink = webhook(f"http://user:{PASSWORD}@{hook.url[7:]}/in?token=tok-{PASSWORD}", logs)
    sink.write_events(frame(), [event("identified", "Rex/the #1 dog")])
    assert _wait(lambda: sink.sent == 1)
    rep = sink.close()
    assert (rep.kind, rep.count, rep.dropped, rep.buffered) == (
        "webhook",
        1,
        0,
        0,
    ) and "2 retries" in rep.line()
    assert len(hook.requests) == 3 and all(p == f"/in?token=tok-{PASSWORD}" for p, *_ in hook.requests)
    _, headers, body, _ = hook.requests[-1]
    assert json.loads(body)["identity"] == "Rex/the #1 dog" and headers["content-type"] == "application/json"
    assert headers["authorization"].startswith("Basic ")
    assert any("HTTP 500" in x and "retrying with backoff" in x for x in logs) and logs[-1].endswith(
        "delivering again"
    )
    assert not any(PASSWORD in x for x in [*logs, rep.line()]), logs
    hook.close()


def _wait(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_webhook_429_honours_retry_after_and_batches() -> None:
    hook = Hook([(429, {"Retry-After": "0.3"})])
    logs: list[str] = []
    sink = webhook(f"{hook.url}/in#batch=1", logs)
    sink.write_events(frame(), [e for step in life("rex") for e in step])
    assert _wait(lambda: sink.sent == 3)
    (t1, t2) = [t for *_, t in hook.requests]
    assert t2 - t1 >= 0.28  # Retry-After, not the 0.05 s backoff
    assert [e["event"] for e in hook.bodies()[-1]] == ["enter", "identified", "leave"]
    assert sink.close().count == 3 and "HTTP 429" in logs[0]
    hook.close()


def test_webhook_gives_up_after_tries_and_counts() -> None:
    hook = Hook([503] * 100)
    logs: list[str] = []
    sink = webhook(f"{hook.url}/in#tries=3", logs)
    sink.write_events(frame(), [event("identified", "rex"), event("leave", "rex", first_seen=0.0)])
    assert _wait(lambda: sink.drops.count == 2)
    assert len(hook.requests) == 6  # 3 tries each
    hook.script = []  # the server works again
    sink.write_events(frame(1), [event("enter", None, 2)])
    rep = sink.close()
    assert (rep.count, rep.dropped, rep.buffered) == (1, 2, 0) and "2 events dropped" in rep.line()
    assert sum("dropping events" in x for x in logs) == 1 and "HTTP 503" in logs[0]
    four = Hook([404])  # another 4xx: not retried
    sink = webhook(f"{four.url}/missing", logs)
    sink.write_events(frame(), [event("enter", None)])
    assert _wait(lambda: sink.drops.count == 1) and len(four.requests) == 1
    assert sink.close().dropped == 1 and any("HTTP 404" in x and "not retried" in x for x in logs)
    hook.close()
    four.close()


def test_webhook_never_blocks_the_loop() -> None:
    """A server that hangs (and one that does not exist): write_events stays fast, the queue bounded, close()
    keeps its deadline and reports what was pending."""
    hook = Hook(delay=3.0)
    logs: list[str] = []
    sink = webhook(f"{hook.url}/slow#timeout=0.5&queue=50&flush=0.5", logs)
    worst = 0.0
    for i in range(400):
        t0 = time.perf_counter()
        sink.write_events(frame(i), [event("enter", None, i, i)])
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.1, f"write_events took {worst * 1e3:.1f} ms (the server hangs 3 s: a blocked call)"
    assert sink.pending() <= 51
    t0 = time.monotonic()
    rep = sink.close()
    assert time.monotonic() - t0 < 2.5
    assert rep.count == 0 and rep.dropped + rep.buffered == 400 and rep.dropped >= 349
    hook.close()
    dead = webhook(f"http://127.0.0.1:{free_port()}/x#tries=2", logs)
    dead.write_events(frame(), [event("enter", None)])
    assert _wait(lambda: dead.drops.count == 1)
    assert any("ConnectionError" in x or "Connection refused" in x or "NewConnectionError" in x for x in logs)
    dead.close()


# ------------------------------------------------------------------------------------------ end to end
@needs_broker
def test_identified_events_of_a_generated_sequence_reach_the_broker(broker: Broker, tmp_path: Path) -> None:
    """The live loop (tracking on, the test suite's fake pipeline) on a generated image sequence, with
    ``--sink mqtt://127.0.0.1:PORT/mocha``: the identified events and the presence states arrive."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_run import FakePipe, Quiet

    from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.prototypes import PrototypeBank

    seq = tmp_path / "seq"
    seq.mkdir()
    for i in range(30):
        cv2.imwrite(str(seq / f"{i:03d}.png"), np.full((48, 64, 3), 100, np.uint8))
    m = 100 / 255  # FakePipe's vectors follow the frame's brightness
    bank = PrototypeBank(4, "fake-model", ["mug", "toy"])
    bank.add("my mug", 0, np.array([[1.0, m, 0, 0]], np.float32))
    bank.add("Rex the #1+ toy", 1, np.array([[0, 0, 1.0, m]], np.float32))
    pipe = FakePipe()
    pipe.set_bank(bank)
    sub = Sub(broker.port)
    console = Quiet()
    opts = RunOptions(sinks=[f"mqtt://127.0.0.1:{broker.port}/mocha"], handle_signals=False, fps_every=0)
    src = open_source(str(seq))
    summary = run_loop(src, pipe, opts, LiveEnroller(pipe, bank, None, console.log), console=console)
    assert summary.events.get("identified") == 2 and not summary.faults
    out = summary.outputs[0]
    made = sum(summary.events.values())
    assert out.kind == "mqtt" and out.count == made and out.dropped == out.buffered == 0
    assert sub.wait_topic("mocha/seq/events", n=made)
    got = [json.loads(p) for p in sub.on("mocha/seq/events")]
    assert sorted(e["identity"] for e in got if e["event"] == "identified") == ["Rex the #1+ toy", "my mug"]
    for name in ("my mug", "Rex the #1+ toy"):
        assert sub.on(f"mocha/seq/{topic_slug(name)}/presence") == [b"ON", b"OFF"]
    sub.close()
    src.close()


def test_open_sinks_rejects_network_duplicates_before_connecting() -> None:
    with pytest.raises(SinkError, match="an output given twice"):
        open_sinks([parse_sink("mqtt://127.0.0.1:1/m"), parse_sink("mqtt://127.0.0.1:1/m?qos=0")])


@needs_broker
def test_identified_events_of_a_generated_video_with_the_real_pipeline_reach_the_broker(
    broker: Broker, student_ckpt: Path, tmp_path: Path
) -> None:
    """`data synth --video`'s sequence through the deployed Pipeline (the test student exported to ONNX),
    ByteTrack and the track identities, to ``mqtt://``: the identified events the run counts arrive, with
    their identities. (The briefly trained test student's similarities are low, so every identity is accepted
    at any cosine, ``threshold=-1``, and at any confidence: the chain is under test, not the student.)"""
    from mocha_edge.data.synth_video import synthesize_video
    from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.eval_video import enrol_supports
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student
    from mocha_edge.prototypes import PrototypeBank

    sys.path.insert(0, str(Path(__file__).parent))
    from test_run import Quiet

    gt_path = synthesize_video(tmp_path / "d", seed=2, frames=30, model_imgsz=128)
    gt = json.loads(gt_path.read_text())
    gt["supports"] = dict(sorted(gt["supports"].items())[:3])  # three identities: a fast enrolment
    bank = enrol_supports(student_ckpt, gt_path, gt, tmp_path / "v.bank")
    onnx = export_onnx(Student.load(student_ckpt), tmp_path / "student.onnx")
    pipe = Pipeline(onnx, threshold=-1.0, name_conf=0.0, conf=0.05)
    pipe.set_bank(PrototypeBank.load(bank))
    sub = Sub(broker.port)
    console = Quiet()
    opts = RunOptions(sinks=[f"mqtt://127.0.0.1:{broker.port}/mocha", f"{tmp_path}/ev.jsonl?kind=events"],
                      handle_signals=False, fps_every=0)  # fmt: skip
    video = gt_path.with_suffix(".mp4")
    with open_source(str(video)) as src:
        summary = run_loop(src, pipe, opts, LiveEnroller(pipe, None, None, console.log), console=console)
    assert not summary.faults and summary.frames == 30
    made = summary.events.get("identified", 0)
    assert made >= 1, summary.line()
    lines = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    want = sorted(e["identity"] for e in lines if e["event"] == "identified")
    assert len(want) == made and set(want) <= set(gt["supports"])
    assert sub.wait_topic(f"mocha/{video.stem}/events", n=sum(summary.events.values()))
    got = [json.loads(p) for p in sub.on(f"mocha/{video.stem}/events")]
    assert sorted(e["identity"] for e in got if e["event"] == "identified") == want
    sub.close()
