"""Decision rules for naming, tried on a finished demo's student (the README's "Against the open-set targets").

Runs ``evaluate``'s open-set episodes (same episodes, same enrolled halves, same banks and calibrated
thresholds as ``eval``), but records every detection ``run`` would consider naming — its similarities to the
class's prototypes, the bank's threshold, its confidence and what it really is (the right enrolled object,
another enrolled one, an unenrolled object, background) — then scores rules on those records:
the calibrated thresholds (``eval``'s numbers), calibrated at other false-accept targets, stricter or looser by
an offset, with a margin between the
two nearest identities, with a higher naming confidence, and one fixed cosine for all; then who the default
rule names wrongly (boxes covered by others, and on the built-in benchmark the colour scheme / texture /
marking the wrongly named object shares with the identity it was given).

    python scripts/id_rules.py --demo /tmp/d6262 [--episodes 30] [--model distill]

Prints one line per rule and shot count: id precision / id recall (points), names given, and the wrong
names by kind.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NAME_CONF = 0.5
FARS = (0.01, 0.02, 0.05)  # other false-accept targets of the per-class calibration (the default: 0.5 %)


def record(demo: Path, model: str, shots: int, episodes: int, seed: int) -> list[list[dict[str, Any]]]:
    """Per episode, one dict per detection at ``run``'s confidence and one ``{"enrolled_detected": n}`` per image."""
    import mocha_edge.evaluate as ev
    from mocha_edge import prototypes
    from mocha_edge.data import load_dataset
    from mocha_edge.infer import Student
    from mocha_edge.openset import match_detections

    out: list[list[dict[str, Any]]] = []
    default_far = prototypes.FAR_TARGET

    def episode(ds, ep, views, mode, gt_px, items, ep_seed, run_conf=ev.RUN_CONF, threshold=None,
                name_conf=ev.NAME_CONF, unique=True):  # fmt: skip
        bank, enrolled = ev.episode_bank(ds, ep, views, items, ep_seed)  # as eval builds it
        protos, names, proto_cls = bank.prototypes()
        thr = bank.thresholds()
        by_far = {}  # the same calibration at other false-accept targets
        for far in FARS:
            prototypes.FAR_TARGET = far
            bank.calibrate()
            by_far[far] = bank.thresholds()
        prototypes.FAR_TARGET = default_far
        rows: list[dict[str, Any]] = []
        for p in ep.query:
            boxes, scores, cls, _ = views.query[p]
            scores = np.asarray(scores)
            keep = scores >= run_conf
            b, s, c = np.asarray(boxes)[keep], scores[keep], np.asarray(cls)[keep]
            u = ev._query_centred(views, p, views.query[p])[keep].astype(np.float32)
            u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
            sims = u @ protos.T if len(u) else np.zeros((0, len(names)), np.float32)
            gt = gt_px[p]
            gid = [ds.fine_names[i] if i in enrolled else None for i in items[p].instance.tolist()]
            det_gt = match_detections(b, s, gt)  # as openset.score_image matches
            det_cov, gt_cov = covered(b), covered(gt)  # share of each box inside another one
            real = [ds.fine_names[i] for i in items[p].instance.tolist()]
            rows.append(
                {"enrolled_detected": sum(g is not None and (det_gt == j).any() for j, g in enumerate(gid))}
            )
            for i in range(len(s)):
                j = int(det_gt[i])
                ok = np.flatnonzero(proto_cls == c[i])
                truth = None if j < 0 else gid[j]
                rows.append({"image": str(p), "score": float(s[i]), "sims": sims[i, ok], "protos": ok, "thr": thr[ok], "thr_far": {f: t[ok] for f, t in by_far.items()},
                             "kind": "bg" if j < 0 else ("enrolled" if truth is not None else "unenrolled"),
                             "truth": names.index(truth) if truth is not None else -1, "names": names,
                             "object": None if j < 0 else real[j], "det_cov": float(det_cov[i]),
                             "gt_cov": float(gt_cov[j]) if j >= 0 else -1.0})  # fmt: skip
        out.append(rows)
        return ev.IdCounts()

    ev._episode_openset = episode
    ds = load_dataset(demo / "data")
    ev.evaluate(ds, {model: Student.load(str(demo / model / "last.ckpt"))}, [shots], episodes, ("conditional",),
                seed=seed, log=lambda m: None)  # fmt: skip
    return out


def covered(boxes: np.ndarray) -> np.ndarray:
    """For each xyxy box, the largest share of its area that one other box of the list covers."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) < 2:
        return np.zeros(len(b))
    wh = np.clip(
        np.minimum(b[:, None, 2:], b[None, :, 2:]) - np.maximum(b[:, None, :2], b[None, :, :2]), 0, None
    )
    share = wh.prod(-1) / np.maximum(((b[:, 2:] - b[:, :2]).clip(0)).prod(-1), 1e-12)[:, None]
    np.fill_diagonal(share, 0.0)
    return share.max(1)


Rule = Callable[..., bool]  # (best cosine, second best, its threshold, its thresholds by FAR) -> name it?
CALIBRATED: Rule = lambda s1, s2, t, tf: s1 >= t  # noqa: E731  (eval's rule: the bank's own threshold)


def score(
    recs: list[list[dict[str, Any]]],
    rule: Rule,
    name_conf: float = NAME_CONF,
    gate: Callable[[dict[str, Any]], bool] | None = None,
    wrong_rows: list[tuple[dict[str, Any], int]] | None = None,
) -> tuple[float, float, int, dict]:
    """(id precision, id recall, names, wrong names by kind) of ``rule``, one name per identity and image;
    ``gate(detection)`` False: never named; ``wrong_rows`` collects (detection, identity given) of each wrong
    name."""
    from mocha_edge.prototypes import one_per_identity

    right = named = det = 0
    wrong = {"other enrolled": 0, "unenrolled": 0, "background": 0}
    for rows in recs:
        images: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if "enrolled_detected" in r:
                det += r["enrolled_detected"]
            else:
                images.setdefault(r["image"], []).append(r)
        for dets in images.values():
            ident, sim = np.full(len(dets), -1), np.zeros(len(dets))
            for i, r in enumerate(dets):
                if r["score"] < name_conf or not len(r["sims"]) or (gate is not None and not gate(r)):
                    continue
                order = np.argsort(-r["sims"])
                s1 = float(r["sims"][order[0]])
                s2 = float(r["sims"][order[1]]) if len(order) > 1 else -1.0
                if rule(
                    s1,
                    s2,
                    float(r["thr"][order[0]]),
                    {f: float(t[order[0]]) for f, t in r["thr_far"].items()},
                ):
                    ident[i], sim[i] = r["protos"][order[0]], s1
            ident = one_per_identity(ident, sim)
            for i, r in enumerate(dets):
                if ident[i] < 0:
                    continue
                named += 1
                if r["kind"] == "enrolled" and r["truth"] == ident[i]:
                    right += 1
                else:
                    if wrong_rows is not None:
                        wrong_rows.append((r, int(ident[i])))
                    wrong[
                        {"enrolled": "other enrolled", "unenrolled": "unenrolled", "bg": "background"}[
                            r["kind"]
                        ]
                    ] += 1
    return 100 * right / max(named, 1), 100 * right / max(det, 1), named, wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished full-size demo's --out")
    ap.add_argument("--model", default="distill", help="the demo's stage folder whose student is tried")
    ap.add_argument("--episodes", type=int, default=30)
    args = ap.parse_args()
    seed = json.loads((args.demo / "stages.json").read_text())["config"]["seed"]
    rules: list[tuple[str, Rule, float]] = [("calibrated (eval's)", CALIBRATED, NAME_CONF)]
    for off in (0.05, 0.1, 0.15):
        rules.append((f"calibrated +{off:.2f}", lambda s1, s2, t, tf, o=off: s1 >= t + o, NAME_CONF))
    for off in (-0.05, -0.1, -0.15):
        rules.append((f"calibrated {off:.2f}", lambda s1, s2, t, tf, o=off: s1 >= t + o, NAME_CONF))
    for far in FARS:
        rules.append(
            (f"calibrated at {far:.0%} false accepts", lambda s1, s2, t, tf, f=far: s1 >= tf[f], NAME_CONF)
        )
    for m in (0.1, 0.2):
        rules.append(
            (f"calibrated, margin {m:.1f}", lambda s1, s2, t, tf, m=m: s1 >= t and s1 - s2 >= m, NAME_CONF)
        )
        rules.append(
            (
                f"calibrated -0.10, margin {m:.1f}",
                lambda s1, s2, t, tf, m=m: s1 >= t - 0.1 and s1 - s2 >= m,
                NAME_CONF,
            )
        )
    rules.append(("calibrated, naming confidence 0.7", CALIBRATED, 0.7))
    for fixed in (0.4, 0.5, 0.6):
        rules.append((f"fixed cosine {fixed}", lambda s1, s2, t, tf, f=fixed: s1 >= f, NAME_CONF))
    for shots in (1, 5):
        recs = record(args.demo, args.model, shots, args.episodes, seed)
        for name, rule, conf in rules:
            p, r, n, wrong = score(recs, rule, conf)
            kinds = ", ".join(f"{k} {v}" for k, v in wrong.items())
            print(
                f"{shots}-shot  {name:36s} precision {p:5.1f}  recall {r:5.1f}  names {n:5d}  wrong: {kinds}"
            )
        why(recs, seed, shots)


def why(recs: list[list[dict[str, Any]]], seed: int, shots: int) -> None:
    """Who the default rule names wrongly: overlap (refusing covered detections) and, on the built-in
    benchmark, which appearance attributes the wrongly named object shares with the identity it was given."""
    from mocha_edge.data.synth import instance_table

    for cut in (0.15, 0.3, 0.5):
        p, r, n, _ = score(recs, CALIBRATED, gate=lambda d, c=cut: d["det_cov"] <= c)
        print(
            f"{shots}-shot  calibrated, no name on a box covered > {cut:.0%} precision {p:5.1f}  recall {r:5.1f}  names {n:5d}"
        )
    rows: list[tuple[dict[str, Any], int]] = []
    score(recs, CALIBRATED, wrong_rows=rows)
    on_objects = [(d, k) for d, k in rows if d["object"] is not None]
    hidden = np.mean([d["gt_cov"] > 0.3 for d, _ in on_objects]) if on_objects else float("nan")
    base = [d["gt_cov"] > 0.3 for recs_ep in recs for d in recs_ep if d.get("kind") == "enrolled"]
    print(f"{shots}-shot  wrong names on objects > 30 % covered by another: {hidden:.1%} "
          f"(all detected enrolled objects: {np.mean(base):.1%})")  # fmt: skip
    table = {i.name: i for i in instance_table(seed)}
    shared: dict[str, int] = {}
    for d, k in on_objects:
        a, b = table.get(d["object"]), table.get(d["names"][k])
        if a is None or b is None:
            continue
        key = "/".join(
            n for n, x, y in zip(("scheme", "texture", "marking"), a.attributes, b.attributes) if x == y
        )
        shared[key or "nothing"] = shared.get(key or "nothing", 0) + 1
    print(f"{shots}-shot  wrong names on objects, by what object and named identity share: {shared}")


if __name__ == "__main__":
    main()
