"""The method ablations of the README ("Recipes: what each setting is worth"), on a finished full-size demo.

Starts from a demo's own data, builtin teacher and base detector (``mocha-edge demo --seed S --out DEMO``), so
every variant below differs from the demo's distilled student in one setting only, then evaluates them all on
the same episodes (``evaluate``: 100 episodes, 1 and 5 shots, conditional matching, both scorings, the
operating-point metrics) with the teacher's ceiling row.

    python scripts/ablate.py --demo /tmp/d11 --out /tmp/abl11 [--variants demo,no-whiten,...] [--episodes 100]

Variants (``VARIANTS``): each trains once into OUT/NAME (resumable: a finished one is skipped, an
interrupted one resumes from its last checkpoint); the eval report is OUT/eval.json and the table OUT/table.md.
The teacher caches (whitened as ``teach`` does by default, and not whitened) are written to OUT with the
demo's trained teacher, so the teacher itself is the same in every variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# one setting changed per variant against the demo's distill stage (train's defaults: the edge recipe);
# "cache" picks the teacher cache ("measured": teach's default, whitened per component; "none": not whitened)
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"distill": False},
    # the baseline of a recipe without augmentation (the same settings as no-aug, without the teacher)
    "baseline-no-aug": {"distill": False, "augment": False},
    "demo": {},
    "whiten": {"whitened_targets": True},  # distil the whitened targets as they are
    "no-whiten": {
        "cache": "none"
    },  # a cache never whitened (edge un-whitens a whitened one: the same targets)
    "no-aug": {"augment": False},
    # augmentation kept but no colour jitter: the jitter teaches invariance to colour, which may be what tells
    # two objects of a class apart
    "no-hsv": {"hyp": {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}},
    # the schedule the edge recipe had before the ablation (student every 4th of 20 epochs at lr 1e-4), with the
    # shared warm-up and with each group's own (under the joint schedule the two are the same run)
    "published": {"schedule": "published", "epochs": 20, "lr_student": 1e-4},
    "published-per-group": {
        "schedule": "published",
        "epochs": 20,
        "lr_student": 1e-4,
        "warmup_mode": "per-group",
    },
    "paper": {"recipe": "paper"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="a finished full-size demo's --out")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the variants already trained")
    ap.add_argument(
        "--paper-scoring",
        default="demo,demo+translator",
        help="models also scored the paper's way (comma list)",
    )
    ap.add_argument("--train-only", action="store_true", help="train the variants; evaluate in a later call")
    ap.add_argument("--summary", nargs="+", type=Path, metavar="EVAL_JSON",
                    help="only print the one-line-per-model table of these reports (rows merged)")  # fmt: skip
    args = ap.parse_args()
    if args.summary:
        reps = [json.loads(p.read_text()) for p in args.summary]
        merged = {"results": [r for rep in reps for r in rep["results"]],
                  "ablation": {"val": {k: v for rep in reps for k, v in rep.get("ablation", {}).get("val", {}).items()}}}  # fmt: skip
        print(summary_table(merged))
        return
    if args.demo is None or args.out is None:
        ap.error("--demo and --out are required (unless --summary)")

    from mocha_edge.cache import TeacherCache
    from mocha_edge.data import load_dataset
    from mocha_edge.evaluate import evaluate, format_table
    from mocha_edge.infer import Student
    from mocha_edge.teach import teach
    from mocha_edge.teachers import get_teacher
    from mocha_edge.train import TrainConfig, train
    from mocha_edge.utils import offline_env, write_json_atomic

    offline_env()
    stages = json.loads((args.demo / "stages.json").read_text())
    seed = int(stages["config"]["seed"])
    recipe = stages["config"]["recipe"]
    base = stages["stages"]["base"]["result"]
    data = args.demo / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; have {list(VARIANTS)}")
    log_file = (args.out / "ablate.log").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    ds = load_dataset(data)
    teacher_pt = data / "teacher.teacher" / "builtin_teacher.pt"
    caches = {}
    demo_cache = data / "teacher.safetensors"
    if TeacherCache.load(demo_cache).whiten == "measured":  # the demo's own (teach's default)
        caches["measured"] = demo_cache
    for whiten in ("measured", "none"):
        path = args.out / f"teacher-{whiten}.safetensors"
        if whiten in caches:
            continue
        if not path.is_file():
            t0 = time.perf_counter()
            teach(ds, get_teacher("builtin", model=str(teacher_pt), seed=seed), path, whiten=whiten,
                  progress=False, log=log)  # fmt: skip
            log(f"teach --whiten {whiten}: {time.perf_counter() - t0:.0f} s")
        caches[whiten] = path

    ckpts = {}
    for name in names:
        kw = dict(VARIANTS[name])
        cache = caches[kw.pop("cache", "measured")]
        out = args.out / name
        done = out / "done.json"
        if not done.is_file():
            if args.eval_only:
                log(f"{name}: not trained; skipped")
                continue
            cfg = TrainConfig(data=str(data), out=str(out), model=base, teacher_cache=str(cache),
                              imgsz=recipe["imgsz"], batch=recipe["batch"], seed=seed, **kw)  # fmt: skip
            same = same_run(args.demo, cfg)
            if same is not None:  # the demo trained exactly this run: its checkpoint is the variant's
                log(f"{name}: the demo's {same} (same settings)")
                write_json_atomic(done, {"checkpoint": str(same), "seconds": None, "config": cfg.settings()})
                ckpts[name] = str(same)
                continue
            resume = (out / "last.ckpt").is_file()
            t0 = time.perf_counter()
            res = train(cfg, resume=resume, progress=False, log=lambda m, n=name: log(f"[{n}] {m}"))
            write_json_atomic(done, {"checkpoint": str(res.checkpoint), "seconds": time.perf_counter() - t0,
                                     "config": cfg.settings()})  # fmt: skip
        ckpts[name] = json.loads(done.read_text())["checkpoint"]

    if args.train_only:
        return
    models: dict[str, Any] = {}
    for name, ck in ckpts.items():
        models[name] = Student.load(ck)
        if name in ("demo", "whiten", "paper"):  # the translator kept: the paper's comparison
            models[f"{name}+translator"] = Student.load(ck, translator=True)
    t0 = time.perf_counter()
    rep = evaluate(ds, models, [1, 5], args.episodes, ("conditional",), seed=seed, log=log,
                   teacher_cache=TeacherCache.load(caches["measured"]))  # fmt: skip
    # the paper's scoring (its cost is its L1 and squared distances) on the models named; same episodes (seed)
    paper = {n: m for n, m in models.items() if n in args.paper_scoring.split(",")}
    if paper:
        extra = evaluate(ds, paper, [1, 5], args.episodes, ("conditional",), seed=seed, log=log,
                         scorings=("paper",), openset=False)  # fmt: skip
        rep["results"] += extra["results"]
    rep["ablation"] = {"demo": str(args.demo), "seed": seed, "variants": {n: VARIANTS[n] for n in ckpts},
                       "val": {n: val_metrics(Path(c).parent) for n, c in ckpts.items()}}  # fmt: skip
    write_json_atomic(args.out / "eval.json", rep)
    log(f"eval: {time.perf_counter() - t0:.0f} s")
    table = format_table(rep)
    (args.out / "table.md").write_text(table + "\n\n" + summary_table(rep) + "\n")
    log(table)
    log(summary_table(rep))


def summary_table(rep: dict[str, Any]) -> str:
    """One line per model of an ablation report (conditional matching): mAP50 (± 95 %) at 1 and 5 shots under
    each scoring, mAP50-95 at 1 shot, the operating point at 5 shots and the coarse detector on val."""
    rows: dict[str, dict[str, Any]] = {}
    for r in rep["results"]:
        if r["match"] != "conditional":
            continue
        d = rows.setdefault(r["model"], {})
        sc = r.get("scoring", "conf-cosine")
        d[(sc, r["shots"])] = r
    val = rep.get("ablation", {}).get("val", {})
    out = ["| model | 1-shot mAP50 | 5-shot mAP50 | 1-shot mAP50-95 | paper scoring 1-shot mAP50 | "
           "5-shot id precision / recall | val mAP50 / mAP50-95 |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(r: dict[str, Any] | None, k: str) -> str:
        return "—" if r is None else f"{r[k]:.1f} ± {r['ci95_' + k]:.1f}"

    for name, d in rows.items():
        one, five, paper = d.get(("conf-cosine", 1)), d.get(("conf-cosine", 5)), d.get(("paper", 1))
        ops = "—"
        if five is not None and "id_precision" in five:
            ops = f"{five['id_precision']:.1f} / {five['id_recall']:.1f}"
        base = name.removesuffix("+translator")
        v = val.get(base)
        vs = "—" if v is None or name != base else f"{v['val_map50']:.1f} / {v['val_map50_95']:.1f}"
        out.append(f"| {name} | {cell(one, 'map50')} | {cell(five, 'map50')} | {cell(one, 'map50_95')} | "
                   f"{cell(paper, 'map50')} | {ops} | {vs} |")  # fmt: skip
    return "\n".join(out)


def same_run(demo: Path, cfg: Any) -> Path | None:
    """The demo's checkpoint trained with exactly ``cfg``'s settings (its ``distill`` or ``baseline`` stage
    with the same data, base, cache and resolved config, output folder aside), else None."""
    from dataclasses import asdict

    ours = json.loads(json.dumps(asdict(cfg)))
    ours.pop("out")
    for stage in ("distill", "baseline"):
        run = demo / stage
        if (run / "config.json").is_file() and (run / "last.ckpt").is_file():
            theirs = json.loads((run / "config.json").read_text())
            theirs.pop("out", None)
            if theirs == ours:
                return run / "last.ckpt"
    return None


def val_metrics(run: Path) -> dict[str, float]:
    """The run's last validation row (val mAP50 / mAP50-95 of the coarse detector) from metrics.csv."""
    import csv

    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_map50_95")]
    last = rows[-1]
    return {"val_map50": float(last["val_map50"]), "val_map50_95": float(last["val_map50_95"])}


if __name__ == "__main__":
    main()
