// mocha-edge's web page: live views (each frame with the boxes of that same frame), enrolment from a box,
// the identities, live events, per-camera stats and a banner for problems. Plain JS, no build, no network
// beyond this server; every call is same-origin (the auth cookie rides along).
"use strict";

const LIVE_MS = 100; // a live view asks at most ~10 times a second
const CAMERAS_MS = 1000;
const HEALTH_MS = 5000;
const IDENTITIES_MS = 5000;
const HIDDEN_MS = 5000; // periodic calls while the tab is hidden (the live view pauses)
const ERROR_MS = 1000; // a live view's wait after a failed call
const EVENTS_MAX = 50;
const EVENT_KINDS = ["enter", "identified", "changed", "leave"];

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const enc = encodeURIComponent;
const fmt = (v, digits = 1) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–");

/** An element with attributes (``text``: its text, ``on<event>``: a listener) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function setData(node, key, value) {
  if (value === null || value === undefined) delete node.dataset[key];
  else node.dataset[key] = String(value);
}

// ------------------------------------------------------------------------------------ problems banner
const problems = { net: null, auth: null, bank: null };

function renderBanner() {
  const lines = Object.values(problems).filter(Boolean);
  const banner = $("banner");
  banner.hidden = lines.length === 0;
  banner.replaceChildren(...lines.map((t) => el("div", { text: t })));
}

function setProblem(kind, text) {
  if (problems[kind] === text) return;
  problems[kind] = text;
  renderBanner();
}

// ------------------------------------------------------------------------------------------- the API
/** One same-origin call: ``{ok, status, data, error}``; ``error`` is the server's ``detail`` or a reason. */
async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  let text = "";
  try {
    res = await fetch(path, init);
    text = await res.text();
  } catch {
    setProblem("net", "Server unreachable: retrying…");
    return { ok: false, status: 0, data: null, error: "server unreachable" };
  }
  setProblem("net", null);
  if (res.status === 401) setProblem("auth", "Not authorised: open the page once with the link that has ?token=…");
  else if (res.ok) setProblem("auth", null);
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  return { ok: res.ok, status: res.status, data, error: res.ok ? null : errorText(res.status, data) };
}

function errorText(status, data) {
  if (status === 401) return "not authorised (open the link with ?token=… once)";
  const detail = data && data.detail;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  return `HTTP ${status}`;
}

/** Run ``fn`` now and then every ``ms`` (slower while the tab is hidden), one call at a time. */
async function every(ms, fn) {
  for (;;) {
    try {
      await fn();
    } catch (err) {
      console.error(err);
    }
    await sleep(document.hidden ? Math.max(ms, HIDDEN_MS) : ms);
  }
}

function whenVisible() {
  if (!document.hidden) return Promise.resolve();
  return new Promise((resolve) => {
    const on = () => {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", on);
      resolve();
    };
    document.addEventListener("visibilitychange", on);
  });
}

// ---------------------------------------------------------------------------------------- status line
function setStatus(text, kind = "info") {
  const s = $("status");
  s.textContent = text;
  s.dataset.kind = kind;
}

// ---------------------------------------------------------------------------------------- live views
const views = new Map(); // camera name -> View
let activeCamera = null;
let selected = null; // {camera, key, clicked: detection when clicked, det: its latest detection, gone: bool,
//                   named: the name the track last showed while selected (what "not NAME" corrects)}

function boxKey(det) {
  return det.track_id === null || det.track_id === undefined ? `d${det.id}` : `t${det.track_id}`;
}

function boxLabel(det) {
  const who = det.identity ? `${det.identity}${typeof det.similarity === "number" ? ` ${det.similarity.toFixed(2)}` : ""}` : det.cls;
  return det.track_id === null || det.track_id === undefined ? who : `#${det.track_id} ${who}`;
}

/** One camera: its frame, the boxes of that frame, its stats; polls while it is the active view. */
class View {
  constructor(name) {
    this.name = name;
    this.frame = -1; // the frame shown
    this.url = null; // the shown frame's object URL
    this.boxes = new Map(); // box key -> element
    this.dets = new Map(); // box key -> detection shown
    this.running = false;
    this.img = el("img", { class: "frame", "data-testid": "frame", alt: `camera ${name}`, draggable: "false" });
    this.overlay = el("div", { class: "overlay", "data-testid": "overlay" });
    this.waiting = el("div", { class: "waiting", text: "Waiting for a frame…" });
    this.stage = el("div", { class: "stage" }, this.img, this.overlay, this.waiting);
    this.stats = el("div", { class: "stats", "data-testid": `stats-${name}` });
    this.root = el("article", { class: "view", "data-testid": `view-${name}`, "data-camera": name },
      el("h2", { class: "view-title", text: name }), this.stage, this.stats);
    this.tab = el("button", { type: "button", role: "tab", class: "tab", "data-testid": `tab-${name}`, text: name,
      onclick: () => setActive(name) });
  }

  setActive(on) {
    this.root.hidden = !on;
    this.tab.setAttribute("aria-selected", on ? "true" : "false");
    if (on && !this.running) this.loop();
  }

  async loop() {
    this.running = true;
    while (activeCamera === this.name && views.get(this.name) === this) {
      await whenVisible();
      const t0 = performance.now();
      let ok = false;
      try {
        ok = await this.tick();
      } catch (err) {
        console.error(err);
      }
      await sleep(Math.max(0, (ok ? LIVE_MS : ERROR_MS) - (performance.now() - t0)));
    }
    this.running = false;
  }

  /** One step of the sync protocol: the detections, then the image of their frame, then both at once. */
  async tick() {
    const cam = enc(this.name);
    // after=N: the server answers as soon as a view newer than N exists (a long poll; ignored if unknown)
    const after = this.frame >= 0 ? `?after=${this.frame}` : "";
    const r = await api("GET", `api/cameras/${cam}/detections${after}`);
    if (!r.ok || !r.data) return false;
    const d = r.data;
    if (typeof d.frame !== "number" || d.frame < 0 || d.frame === this.frame) return true;
    let res;
    try {
      res = await fetch(`api/cameras/${cam}/frame.jpg?boxes=0&frame=${d.frame}`, { cache: "no-store", credentials: "same-origin" });
    } catch {
      setProblem("net", "Server unreachable: retrying…");
      return false;
    }
    if (!res.ok) return false;
    const header = res.headers.get("X-Frame");
    const got = header === null ? d.frame : Number(header);
    const url = URL.createObjectURL(await res.blob());
    const off = new Image();
    off.src = url;
    try {
      await off.decode();
    } catch {
      URL.revokeObjectURL(url);
      return false;
    }
    // A frame no longer held comes back as the latest one: d's boxes do not belong to it, show none.
    this.show(url, got, got === d.frame ? d : { width: d.width, height: d.height, detections: [] });
    return true;
  }

  show(url, frame, d) {
    const old = this.url;
    this.img.src = url;
    this.url = url;
    this.frame = frame;
    this.img.dataset.frame = String(frame);
    this.waiting.hidden = true;
    if (old) URL.revokeObjectURL(old);
    this.draw(d);
  }

  draw(d) {
    const W = d.width || this.img.naturalWidth || 1;
    const H = d.height || this.img.naturalHeight || 1;
    const seen = new Set();
    for (const det of d.detections || []) {
      const key = boxKey(det);
      if (seen.has(key)) continue;
      seen.add(key);
      let box = this.boxes.get(key);
      if (!box) {
        box = el("div", { class: "box", "data-testid": "box", role: "button", tabindex: "0" }, el("span", { class: "label" }));
        box.addEventListener("click", (ev) => {
          ev.stopPropagation();
          select(this.name, key);
        });
        box.addEventListener("keydown", (ev) => {
          if (ev.key === "Enter" || ev.key === " ") {
            ev.preventDefault();
            select(this.name, key);
          }
        });
        this.overlay.append(box);
        this.boxes.set(key, box);
      }
      const [x0, y0, x1, y1] = det.box_xyxy;
      const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
      const left = clamp(x0, W), top = clamp(y0, H);
      box.style.left = `${(100 * left) / W}%`;
      box.style.top = `${(100 * top) / H}%`;
      box.style.width = `${(100 * (clamp(x1, W) - left)) / W}%`;
      box.style.height = `${(100 * (clamp(y1, H) - top)) / H}%`;
      // the smaller of two overlapping boxes on top: every box keeps a spot that can be tapped
      box.style.zIndex = String(1 + Math.round(10000 * (1 - ((clamp(x1, W) - left) * (clamp(y1, H) - top)) / (W * H))));
      box.dataset.detId = String(det.id);
      box.dataset.cls = det.cls;
      setData(box, "trackId", det.track_id);
      setData(box, "identity", det.identity || null);
      box.classList.toggle("named", Boolean(det.identity));
      box.classList.toggle("label-inside", top / H < 0.06);
      box.classList.toggle("selected", Boolean(selected && selected.camera === this.name && selected.key === key));
      box.firstChild.textContent = boxLabel(det);
      box.title = `${boxLabel(det)} (score ${fmt(det.score, 2)})`;
      this.dets.set(key, det);
    }
    for (const [key, box] of this.boxes) {
      if (seen.has(key)) continue;
      box.remove();
      this.boxes.delete(key);
      this.dets.delete(key);
    }
    if (selected && selected.camera === this.name) {
      const det = this.dets.get(selected.key);
      selected.gone = !det;
      if (det) selected.det = det;
      if (det?.identity) selected.named = det.identity;
      renderPanel();
    }
  }

  setStats(c) {
    const stages = Object.entries(c.stages_ms || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
    this.stats.dataset.fps = String(c.fps);
    this.stats.replaceChildren(
      el("span", { class: "stat", "data-testid": "fps", text: `${fmt(c.fps)} FPS` }),
      el("span", { class: "stat", "data-testid": "latency", text: `${fmt(c.latency_ms, 0)} ms` }),
      el("span", { class: "stat dim", text: `${c.width || "?"}×${c.height || "?"} · frame ${c.frame}` }),
      stages ? el("span", { class: "stat dim", "data-testid": "stages", text: `stages (ms): ${stages}` }) : null,
    );
  }

  remove() {
    this.root.remove();
    this.tab.remove();
    if (this.url) URL.revokeObjectURL(this.url);
  }
}

function setActive(name) {
  activeCamera = name;
  for (const [n, v] of views) v.setActive(n === name);
}

async function refreshCameras() {
  const r = await api("GET", "api/cameras");
  if (!r.ok || !r.data) return;
  const cams = r.data.cameras || [];
  const names = new Set(cams.map((c) => c.name));
  for (const [name, view] of views) {
    if (names.has(name)) continue;
    view.remove();
    views.delete(name);
  }
  for (const c of cams) {
    if (!views.has(c.name)) {
      const view = new View(c.name);
      views.set(c.name, view);
      $("views").append(view.root);
      $("tabs").append(view.tab);
      view.setActive(false);
    }
    views.get(c.name).setStats(c);
  }
  $("no-cameras").hidden = views.size > 0;
  $("tabs").hidden = views.size < 2;
  if (!views.has(activeCamera) && views.size) setActive(views.keys().next().value);
}

// -------------------------------------------------------------------------------------- the box panel
function select(camera, key) {
  const det = views.get(camera)?.dets.get(key);
  if (!det) return;
  const same = selected && selected.camera === camera && selected.key === key;
  selected = { camera, key, clicked: det, det, gone: false, named: det.identity || (same ? selected.named : null) };
  for (const v of views.values()) for (const [k, b] of v.boxes) b.classList.toggle("selected", v.name === camera && k === key);
  if (!same || !$("name-input").value) $("name-input").value = det.identity || "";
  $("panel").hidden = false;
  renderPanel();
  if (!same) $("name-input").focus({ preventScroll: true });
}

function closePanel() {
  selected = null;
  $("panel").hidden = true;
  for (const v of views.values()) for (const b of v.boxes.values()) b.classList.remove("selected");
}

/** The name "not NAME" corrects: the one the selected box shows, or showed since it was clicked. */
function shownName(sel) {
  return sel.det.identity || sel.named;
}

function renderPanel() {
  if (!selected) return;
  if (selected.named && !identities.some((i) => i.name === selected.named)) selected.named = null; // removed, renamed
  const { det, camera, gone } = selected;
  const track = det.track_id === null || det.track_id === undefined ? "no track" : `track #${det.track_id}`;
  $("panel-title").textContent = `${det.cls} · ${track}`;
  const named = det.identity
    ? `named ${det.identity}${typeof det.similarity === "number" ? ` (${det.similarity.toFixed(2)})` : ""}`
    : selected.named ? `not named now (was ${selected.named})` : "not named";
  $("panel-sub").textContent = `camera ${camera} · detection ${det.id} · score ${fmt(det.score, 2)} · ${named}${gone ? " · out of view" : ""}`;
  // the name the track shows, or showed since it was clicked: a name that flickers off for a frame (or that
  // the tracker moved to another box) keeps its button under the person's finger
  const notName = $("not-name");
  const name = shownName(selected);
  notName.hidden = !name;
  if (name) {
    notName.textContent = `not ${name}`;
    notName.dataset.identity = name;
  }
  $("panel").dataset.trackId = det.track_id ?? "";
  $("panel").dataset.detId = String(det.id);
}

async function enrol(ev) {
  ev.preventDefault();
  if (!selected) return;
  const name = $("name-input").value.trim();
  if (!name) {
    setStatus("Type a name first.", "error");
    $("name-input").focus();
    return;
  }
  const { camera, clicked } = selected;
  const button = $("enrol");
  button.disabled = true;
  setStatus(`Enrolling ${name}…`, "busy");
  try {
    let r = await api("POST", "api/identities", { name, camera, detection_id: clicked.id });
    if (r.status === 409 && clicked.track_id !== null && clicked.track_id !== undefined) {
      r = await api("POST", "api/identities", { name, camera, track_id: clicked.track_id });
    }
    if (r.ok) setStatus(r.data?.message || `Enrolled ${name}.`, "ok");
    else setStatus(`Enrol ${name}: ${r.error}`, "error");
  } finally {
    button.disabled = false;
  }
  refreshAfterChange();
}

async function notName() {
  const name = selected && shownName(selected);
  if (!name) return;
  const { camera, det } = selected;
  const button = $("not-name");
  button.disabled = true;
  setStatus(`Marking as not ${name}…`, "busy");
  try {
    const r = await api("POST", `api/identities/${enc(name)}/negatives`, { camera, detection_id: det.id });
    if (r.ok && selected?.named === name) {
      selected.named = null; // corrected: the button stays only if the track shows a name again
      renderPanel();
    }
    if (r.ok) setStatus(r.data?.message || `Marked as not ${name}.`, "ok");
    else setStatus(`Not ${name}: ${r.error}`, "error");
  } finally {
    button.disabled = false;
  }
  refreshAfterChange();
}

// ---------------------------------------------------------------------------------------- identities
let identities = [];
let identitiesJson = "";
const idState = { editing: null, confirming: null };

async function refreshIdentities(force = false) {
  const r = await api("GET", "api/identities");
  if (!r.ok || !r.data) return;
  const list = r.data.identities || [];
  const json = JSON.stringify(list);
  if (!force && json === identitiesJson) return;
  identitiesJson = json;
  identities = list;
  const names = new Set(list.map((i) => i.name));
  if (!names.has(idState.editing)) idState.editing = null;
  if (!names.has(idState.confirming)) idState.confirming = null;
  $("identity-names").replaceChildren(...list.map((i) => el("option", { value: i.name, label: `${i.name} (${i.cls})` })));
  if (!idState.editing) renderIdentities(); // never under the user's fingers while renaming
}

/** After a change: the list and the health now, and again shortly (the server may answer a change a moment
 * before its identities list shows it). */
function refreshAfterChange() {
  for (const ms of [0, 300, 1500]) {
    setTimeout(() => {
      refreshIdentities(ms === 0);
      refreshHealth();
    }, ms);
  }
}

function thumbUrl(ident) {
  if (!ident.thumb) return null;
  const u = new URL(ident.thumb, location.href);
  u.searchParams.set("v", `${ident.shots}`); // a new shot may change the picture
  return u.href;
}

function renderIdentities() {
  $("identities-count").textContent = identities.length ? `(${identities.length})` : "";
  const rows = identities.map((ident) => {
    const name = ident.name;
    const thumbSrc = thumbUrl(ident);
    const thumb = thumbSrc
      ? el("img", { class: "thumb", src: thumbSrc, alt: "", loading: "lazy", "data-testid": "thumb" })
      : el("div", { class: "thumb none", "aria-hidden": "true", text: name.slice(0, 1).toUpperCase() });
    const info = el("div", { class: "info" },
      el("strong", { class: "name", "data-testid": "identity-name", text: name }),
      el("span", { class: "dim", text: `${ident.cls} · ${ident.shots} shot${ident.shots === 1 ? "" : "s"} · ${ident.negatives} negative${ident.negatives === 1 ? "" : "s"}` }));
    let actions;
    if (idState.editing === name) {
      const input = el("input", { class: "rename-input", "data-testid": "rename-input", value: name, "aria-label": `New name for ${name}`,
        autocapitalize: "off", spellcheck: "false" });
      actions = el("form", { class: "actions", onsubmit: (ev) => { ev.preventDefault(); rename(name, input.value.trim()); } },
        input,
        el("button", { type: "submit", "data-testid": "rename-save", text: "Save" }),
        el("button", { type: "button", class: "ghost", "data-testid": "rename-cancel", text: "Cancel",
          onclick: () => { idState.editing = null; renderIdentities(); } }));
      setTimeout(() => input.focus(), 0);
    } else if (idState.confirming === name) {
      actions = el("div", { class: "actions confirm" },
        el("span", { text: `Remove ${name} and its ${ident.shots} shot${ident.shots === 1 ? "" : "s"}?` }),
        el("button", { type: "button", class: "danger", "data-testid": "confirm-remove", text: "Remove", onclick: () => remove(name) }),
        el("button", { type: "button", class: "ghost", "data-testid": "cancel-remove", text: "Cancel",
          onclick: () => { idState.confirming = null; renderIdentities(); } }));
    } else {
      actions = el("div", { class: "actions" },
        el("button", { type: "button", class: "ghost", "data-testid": `rename-${name}`, text: "Rename",
          onclick: () => { idState.editing = name; idState.confirming = null; renderIdentities(); } }),
        el("button", { type: "button", class: "ghost danger", "data-testid": `remove-${name}`, text: "Remove",
          onclick: () => { idState.confirming = name; idState.editing = null; renderIdentities(); } }));
    }
    return el("li", { class: "identity", "data-testid": `identity-${name}`, "data-name": name, "data-cls": ident.cls,
      "data-shots": ident.shots, "data-negatives": ident.negatives }, thumb, info, actions);
  });
  if (!rows.length) rows.push(el("li", { class: "empty", text: "None yet: tap a box to enrol it." }));
  $("identities").replaceChildren(...rows);
}

async function rename(name, to) {
  if (!to || to === name) {
    idState.editing = null;
    renderIdentities();
    return;
  }
  const r = await api("PATCH", `api/identities/${enc(name)}`, { name: to });
  if (r.ok) {
    idState.editing = null;
    identities = identities.map((i) => (i.name === name ? { ...i, name: r.data?.name || to } : i));
    setStatus(r.data?.message || `Renamed ${name} to ${to}.`, "ok");
  } else {
    setStatus(`Rename ${name}: ${r.error}`, "error");
  }
  if (!idState.editing) renderIdentities();
  refreshAfterChange();
}

async function remove(name) {
  const r = await api("DELETE", `api/identities/${enc(name)}`);
  idState.confirming = null;
  if (r.ok) {
    identities = identities.filter((i) => i.name !== name);
    setStatus(r.data?.message || `Removed ${name}.`, "ok");
  } else {
    setStatus(`Remove ${name}: ${r.error}`, "error");
  }
  renderIdentities();
  refreshAfterChange();
}

// -------------------------------------------------------------------------------------------- events
const eventKeys = [];

function eventTime(t) {
  if (typeof t !== "number") return "";
  if (t > 1e9) return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  return `${t.toFixed(1)} s`;
}

function addEvent(rec) {
  if (!rec || typeof rec !== "object") return;
  const key = `${rec.event}|${rec.camera}|${rec.track_id}|${rec.frame}|${rec.t}`;
  if (eventKeys.includes(key)) return;
  eventKeys.unshift(key);
  eventKeys.length = Math.min(eventKeys.length, EVENTS_MAX * 2);
  const who = rec.identity
    ? `${rec.event === "changed" ? `${rec.previous ?? "unknown"} → ` : ""}${rec.identity}${typeof rec.similarity === "number" ? ` ${rec.similarity.toFixed(2)}` : ""}`
    : rec.event === "changed" ? `${rec.previous ?? "unknown"} → unknown` : "";
  const extra = rec.event === "leave" && typeof rec.duration === "number" ? ` after ${fmt(rec.duration)} s` : "";
  const row = el("li", { class: `event ev-${rec.event}`, "data-testid": "event", "data-event": rec.event },
    el("span", { class: "when dim", text: eventTime(rec.t) }),
    el("span", { class: "kind", text: rec.event }),
    el("span", { class: "what", text: `${views.size > 1 ? `${rec.camera} ` : ""}#${rec.track_id} ${rec.cls}${who ? ` ${who}` : ""}${extra}` }));
  const list = $("events");
  list.prepend(row);
  while (list.children.length > EVENTS_MAX) list.lastElementChild.remove();
}

async function seedEvents() {
  const r = await api("GET", "api/events/history");
  if (!r.ok || !r.data) return;
  const events = (r.data.events || []).slice().sort((a, b) => (a.t ?? 0) - (b.t ?? 0));
  for (const rec of events.slice(-EVENTS_MAX)) addEvent(rec);
}

function connectEvents() {
  const conn = $("events-conn");
  const es = new EventSource("api/events");
  const onEvent = (ev) => {
    try {
      addEvent(JSON.parse(ev.data));
    } catch (err) {
      console.error(err);
    }
  };
  for (const kind of EVENT_KINDS) es.addEventListener(kind, onEvent);
  es.onmessage = onEvent;
  es.onopen = () => {
    conn.textContent = "live";
    conn.dataset.state = "live";
  };
  es.onerror = () => {
    conn.textContent = "reconnecting…";
    conn.dataset.state = "down";
    if (es.readyState === EventSource.CLOSED) {
      // the server refused the stream (restarting, or not authorised): start over later, history first
      setTimeout(async () => {
        await seedEvents();
        connectEvents();
      }, HIDDEN_MS);
    }
  };
}

// -------------------------------------------------------------------------------------------- health
let bankCount = null;

function duration(s) {
  if (typeof s !== "number") return "";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min` : `${Math.floor(s)} s`;
}

async function refreshHealth() {
  const r = await api("GET", "api/health");
  if (!r.ok || !r.data) return;
  const h = r.data;
  const bank = h.bank || {};
  setProblem("bank", bank.problem ? `Prototype bank: ${bank.problem}` : null);
  $("meta").textContent = `v${h.version} · up ${duration(h.uptime_s)} · ${bank.identities ?? 0} ${bank.identities === 1 ? "identity" : "identities"}`;
  if (bankCount !== null && bank.identities !== bankCount) refreshIdentities();
  bankCount = bank.identities;
}

// ---------------------------------------------------------------------------------------------- start
function start() {
  $("enrol-form").addEventListener("submit", enrol);
  $("not-name").addEventListener("click", notName);
  $("panel-close").addEventListener("click", closePanel);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && selected) closePanel();
  });
  every(CAMERAS_MS, refreshCameras);
  every(HEALTH_MS, refreshHealth);
  every(IDENTITIES_MS, refreshIdentities);
  seedEvents().finally(connectEvents);
}

start();
