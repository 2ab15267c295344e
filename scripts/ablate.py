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

# one setting changed per variant, against the demo's distill stage (joint, 5 epochs, student lr 1e-3,
# edge recipe, targets whitened); "cache" picks the teacher cache
DEMO = {"schedule": "joint", "epochs": 5, "lr_student": 1e-3}
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {**DEMO, "distill": False},
    "demo": dict(DEMO),
    "no-whiten": {**DEMO, "cache": "none"},
    "no-aug": {**DEMO, "augment": False},
    # the recipes at their own length (published schedule: the student trains every 4th of 20 epochs)
    "edge-published": {"recipe": "edge"},
    "edge-published-per-group": {"recipe": "edge", "warmup_mode": "per-group"},
    "paper": {"recipe": "paper"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a finished full-size demo's --out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the variants already trained")
    ap.add_argument(
        "--paper-scoring",
        default="demo,demo+translator",
        help="models also scored the paper's way (comma list)",
    )
    ap.add_argument("--train-only", action="store_true", help="train the variants; evaluate in a later call")
    args = ap.parse_args()

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
                              imgsz=recipe["imgsz"], batch=recipe["batch"], seed=seed, workers=2, **kw)  # fmt: skip
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
        if name in ("demo", "paper"):  # the translator kept: the paper's comparison
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
    (args.out / "table.md").write_text(table + "\n")
    log(table)


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
