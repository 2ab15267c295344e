"""The ``mocha-edge`` command line. Commands are thin: parse options, call one library function.

Heavy libraries (torch, ultralytics, transformers) are imported inside the commands that need them.
Library errors (:class:`~mocha_edge.errors.MochaError`) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from mocha_edge import __version__
from mocha_edge.deploy.config import DEFAULT_WORKSPACE_GB
from mocha_edge.errors import MochaError


class _Group(click.Group):
    """Turns library errors into ``error: <one line>`` and exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MochaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="mocha-edge")
def cli() -> None:
    """Personalised object detection on the edge: distil a vision-language teacher into a YOLO student,
    enrol your own objects from a few photos, deploy with TensorRT on a Jetson."""
    from mocha_edge.utils import offline_env

    offline_env()


# ------------------------------------------------------------------------------------------------ info
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info(as_json: bool) -> None:
    """Print versions and capabilities: Python, torch, ultralytics, ONNX Runtime providers, TensorRT,
    CUDA device, native runtime, and every engine with whether it runs here (and why not).

    \b
    Example:
      mocha-edge info
    """
    from mocha_edge.info import gather

    facts = gather()
    if as_json:
        import json

        click.echo(json.dumps(facts, indent=2))
        return
    engines = facts.pop("engines")
    width = max(map(len, facts))
    for k, v in facts.items():
        click.echo(f"{k:<{width}}  {v}")
    click.echo("engines (run --backend NAME):")
    for e in engines:
        click.echo(f"  {e['name']:<11} {'yes' if e['available'] else 'no ':<4}{e['reason']}")


# ------------------------------------------------------------------------------------------------ data
@cli.group(cls=_Group)
def data() -> None:
    """Validate datasets and generate the built-in personalised benchmark."""


@data.command("check")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--max-problems", default=50, show_default=True, help="Problem lines to print (0 = all).")
def data_check(dataset: Path, max_problems: int) -> None:
    """Validate DATASET (a YOLO/MOCHA data YAML, a COCO JSON, or a folder) and print a summary.

    Every image is decoded; each problem is one line naming the file. Broken images are skipped and
    counted. Exit code 1 when no image is usable.

    \b
    Example:
      mocha-edge data check data/synth/dataset.yaml
      mocha-edge data check path/to/coco/annotations/instances_val2017.json
    """
    from mocha_edge.data import load_dataset
    from mocha_edge.data.check import check_dataset
    from mocha_edge.errors import DataError

    report = check_dataset(load_dataset(dataset))
    probs = report.problems
    shown = probs if max_problems <= 0 else probs[:max_problems]
    for p in shown:
        click.echo(f"{'error' if p.fatal else 'warning'}: {p}")
    if len(shown) < len(probs):
        click.echo(f"... {len(probs) - len(shown)} more problems (use --max-problems 0 to list all)")
    for line in report.summary_lines():
        click.echo(line)
    if not report.ok:
        raise DataError(f"{dataset}: no usable image")


@data.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", default=0, show_default=True, help="Random seed: same seed, same bytes.")
@click.option("--imgsz", default=256, show_default=True, help="Image side in pixels.")
@click.option("--train", "n_train", default=1200, show_default=True, help="Training images (base instances).")
@click.option("--val", "n_val", default=200, show_default=True, help="Validation images (base instances).")
@click.option("--query", "n_query", default=200, show_default=True, help="Query images (novel instances).")
@click.option("--support", default=8, show_default=True, help="Support images per novel instance.")
@click.option("--video", is_flag=True, help="Also write a camera-like video with per-frame ground truth.")
@click.option("--video-frames", default=450, show_default=True, help="Frames per --video sequence (15 fps).")
@click.option("--video-sequences", default=1, show_default=True, help="--video sequences (seq_000 ...).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(
    out: Path, seed: int, imgsz: int, n_train: int, n_val: int, n_query: int, support: int, video: bool,
    video_frames: int, video_sequences: int, quiet: bool,
) -> None:  # fmt: skip
    """Generate the built-in personalised benchmark (MOCHA layout) into --out.

    Coarse classes share a silhouette; their instances differ only in fine appearance (colour scheme,
    texture, marking). Base instances fill train/val; novel instances appear only in few-shot episodes
    (episodes_1shot.json, episodes_5shot.json). With --video, also video/seq_000.mp4 (640x480, 15 fps)
    and its ground truth video/seq_000.json: enrolled and unenrolled novel instances and base instances
    moving through one scene, occluding each other, leaving and coming back, with an object id per
    appearance, boxes and visible fractions per frame; and video/supports/: enrolment photos of every
    enrolled instance (`enroll --boxes-json video/supports/NAME.json`).

    \b
    Example:
      mocha-edge data synth --out data/synth --seed 0
      mocha-edge data synth --out data/synth --seed 0 --video --video-frames 450
    """
    import time

    from mocha_edge.data.synth import synthesize

    t0 = time.perf_counter()
    yaml_path = synthesize(
        out, seed, imgsz=imgsz, n_train=n_train, n_val=n_val, n_query=n_query,
        support_per_instance=support, progress=not quiet,
    )  # fmt: skip
    click.echo(f"wrote {yaml_path} in {time.perf_counter() - t0:.1f} s")
    if video:
        from mocha_edge.data.synth_video import load_video_gt, synthesize_video

        t0 = time.perf_counter()
        gt_path = synthesize_video(out, seed, frames=video_frames, model_imgsz=imgsz, sequences=video_sequences,
                                   progress=not quiet)  # fmt: skip
        mp4 = gt_path.parent / load_video_gt(gt_path)["video"]
        click.echo(f"wrote video {mp4} and ground truth {gt_path} in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------ teach
@cli.command()
@click.option("--teacher", "teacher_name", default="builtin", show_default=True,
              help="builtin | clip | llava | llava+clip")  # fmt: skip
@click.option(
    "--data", "dataset", required=True, type=click.Path(path_type=Path), help="Dataset (YAML/JSON/folder)."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache file (.safetensors).")
@click.option("--model", default=None, help="Teacher weights: local folder or hub id (llava/clip teachers; "
              "builtin: a trained builtin_teacher.pt).")  # fmt: skip
@click.option("--clip-model", default=None, help="CLIP weights for llava+clip (folder or hub id).")
@click.option(
    "--dim", "d_t", default=512, show_default=True, help="PCA size d_t (capped by samples and teacher dim)."
)
@click.option("--whiten", type=click.Choice(["measured", "paper-fit", "none"]), default=None,
              help="Divide each PCA component of the targets by its std on the PCA's fit rows (measured), "
              "by MOCHA's public fixed fit 18/(k+1)^0.47-0.26 (paper-fit) or not at all (none).  "
              "[default: measured]")  # fmt: skip
@click.option("--pca-decay", is_flag=True, hidden=True, help="Deprecated: same as --whiten paper-fit.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Crops per teacher call, in total: under torchrun each of the N ranks uses batch // N.")  # fmt: skip
@click.option("--chunk", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per resumable shard (under torchrun, shard i is rank i % N's).")  # fmt: skip
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Run as N torchrun ranks on this machine (with --device cuda: one GPU each), i.e. "
              "`torchrun --standalone --nproc_per_node N -m mocha_edge teach ...`.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:1 ... (under torchrun, cuda is each rank's cuda:LOCAL_RANK)")  # fmt: skip
@click.option(
    "--fp16/--fp32", "fp16", default=None, help="Teacher precision (default: fp16 on CUDA, fp32 on CPU)."
)
@click.option(
    "--max-new-tokens", type=int, default=None, help="LLaVA: tokens generated per crop [default: 300]."
)
@click.option("--decoding", type=click.Choice(["paper", "greedy"]), default=None,
              help="LLaVA: paper = MOCHA's public code (question before the image, 3 beams, no repeated 3-grams, "
              "one crop per call); greedy = the fast option (chat format, batched).  [default: paper]")  # fmt: skip
@click.option("--focus", is_flag=True, help="Align-KD: also store each box's share of LLaVA's text-to-image "
              "attention focus (for train --focus-weighting).")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def teach(
    ctx: click.Context, teacher_name: str, dataset: Path, out: Path, model: str | None, clip_model: str | None,
    d_t: int, whiten: str | None, pca_decay: bool, batch: int, chunk: int, nproc: int | None, device: str,
    fp16: bool | None, max_new_tokens: int | None, decoding: str | None, focus: bool, quiet: bool,
) -> None:  # fmt: skip
    """Compute a frozen teacher's target for every ground-truth box of --data and cache it in --out.

    Resumable: kill it, run the same command again, it continues from the last finished shard.
    Reuses an up-to-date cache. PCA to d_t is fitted on the training split's base instances only.

    \b
    Examples:
      mocha-edge teach --teacher builtin --data data/synth/dataset.yaml --out data/synth/teacher.safetensors
      mocha-edge teach --teacher llava+clip --model llava-hf/llava-1.5-7b-hf \\
          --clip-model openai/clip-vit-base-patch32 --data my.yaml --out cache.safetensors --device cuda
      mocha-edge teach --teacher llava --focus --data my.yaml --out cache.safetensors --device cuda
      mocha-edge teach --teacher clip --data my.yaml --out cache.safetensors --device cuda --nproc 4
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
          -m mocha_edge teach --teacher clip --data my.yaml --out /shared/cache.safetensors --device cuda
    """
    if pca_decay:  # it used to multiply by the decay (the inverse of whitening); now it divides
        if whiten not in (None, "paper-fit"):
            raise click.UsageError(f"--pca-decay means --whiten paper-fit, not --whiten {whiten}; drop one")
        click.echo("warning: --pca-decay is deprecated and now means --whiten paper-fit (divide, as MOCHA's "
                   "public code does; it used to multiply)", err=True)  # fmt: skip
        whiten = "paper-fit"
    from mocha_edge import distributed
    from mocha_edge.data import load_dataset
    from mocha_edge.teach import teach as run_teach
    from mocha_edge.teachers import check_teacher_options, get_teacher, teacher_options

    given = {"model": model, "clip_model": clip_model, "fp16": fp16, "max_new_tokens": max_new_tokens,
             "decoding": decoding}  # fmt: skip
    opts = {"device": device, **{k: v for k, v in given.items() if v is not None}}
    if "progress" in teacher_options(teacher_name):
        opts["progress"] = not quiet
    if nproc is not None and nproc > 1:  # bad input fails here, in one line, before torchrun starts
        if distributed.is_distributed():
            raise click.UsageError("--nproc launches torchrun itself; drop it when running under torchrun")
        if batch < nproc:
            raise click.BadParameter(f"{batch} is the global batch: fewer than one crop per rank with --nproc "
                                     f"{nproc}", param_hint="--batch")  # fmt: skip
        if device == "cuda":
            import torch

            if torch.cuda.device_count() < nproc:
                raise click.BadParameter(f"--nproc {nproc} with --device cuda needs {nproc} GPUs, "
                                         f"{torch.cuda.device_count()} visible", param_hint="--nproc")  # fmt: skip
        check_teacher_options(teacher_name, opts)
        load_dataset(dataset)
        sys.exit(distributed.launch_torchrun(nproc, ["teach", *_argv_of(ctx, drop=("nproc",))]))
    env = distributed.init(device)
    try:
        if env.distributed:
            opts["device"] = env.device
            if "progress" in opts:
                opts["progress"] = opts["progress"] and env.is_main
        ds = load_dataset(dataset)
        teacher = get_teacher(teacher_name, **opts)
        res = run_teach(ds, teacher, out, d_t=d_t, batch=batch, chunk_images=chunk, whiten=whiten or "measured",
                        focus=focus, progress=not quiet, log=click.echo, dist=env)  # fmt: skip
    except MochaError as e:
        if env.distributed and not str(e).startswith(env.tag):
            e.args = (f"{env.tag}: {e}",)
        partial = out.with_name(out.name + ".partial")
        if isinstance(e, distributed.DistributedError) and partial.is_dir():
            e.args = (f"{e}; finished shards stay in {partial}: rerun the same command to resume",)
        raise
    finally:
        distributed.shutdown(env)
    c = res.cache
    if c is None:  # a rank other than 0 under torchrun
        done = (
            "nothing to do"
            if res.up_to_date
            else f"{res.computed_chunks} chunks computed, {res.resumed_chunks} resumed"
        )
        click.echo(f"{env.tag}: {done}; rank 0 wrote {out}")
        return
    for p in res.skipped_images:
        click.echo(f"warning: {p} (skipped)")
    click.echo(
        f"cache: {out} — {len(c)} boxes, teacher={c.meta['teacher']} (dim {c.meta['teacher_dim']}), "
        f"d_t={c.d_t}, {res.computed_chunks} chunks computed, {res.resumed_chunks} resumed, {res.seconds:.1f} s"
        + (", with focus masses" if "focus" in c.extras else "")
        + (f", {env.world} ranks" if env.distributed else "")
    )


def _argv_of(ctx: click.Context, drop: tuple[str, ...] = ()) -> list[str]:
    """Options that give ``ctx``'s command the parameters it was given (not defaults), less those in ``drop``."""
    from click.core import ParameterSource

    argv: list[str] = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in drop:
            continue
        if ctx.get_parameter_source(p.name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None):
            continue
        value = ctx.params[p.name]
        if p.is_flag and p.secondary_opts:
            argv.append(p.opts[0] if value else p.secondary_opts[0])
        elif p.is_flag:
            argv += [p.opts[0]] if value else []
        elif value is not None:
            argv += [x for v in (value if p.multiple else [value]) for x in (p.opts[0], str(v))]
    return argv


# ------------------------------------------------------------------------------------------------ train
def _saved_train_config(out: Path) -> dict:
    """The config.json of the run in ``out`` ({} when there is none or it is unreadable)."""
    import json

    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _parse_hyp(values: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(
                f"{v!r}: expected key=value (an ultralytics hyperparameter, e.g. mosaic=0.5)"
            )
        k, val = v.split("=", 1)
        out[k.strip()] = yaml.safe_load(val)
    return out


@cli.command()
@click.option("--data", "dataset", type=click.Path(path_type=Path), help="Dataset (YAML/JSON/folder).")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Run folder (checkpoints, metrics)."
)
@click.option(
    "--model",
    default="yolov8n.yaml",
    show_default=True,
    help="Student: ultralytics .yaml or .pt, or a mocha-edge .ckpt (e.g. the base stage's last.ckpt).",
)
@click.option(
    "--stage",
    type=click.Choice(["base", "distill"]),
    default="distill",
    show_default=True,
    help="base: coarse detector; distill: MOCHA distillation (default).",
)
@click.option(
    "--teacher-cache", type=click.Path(path_type=Path), help="Targets from `mocha-edge teach` (distill)."
)
@click.option(
    "--distill/--no-distill",
    default=True,
    show_default=True,
    help="--no-distill trains the baseline: same run without the teacher terms.",
)
@click.option(
    "--recipe",
    type=click.Choice(["edge", "paper"]),
    default=None,
    help="Named defaults (README: Recipes): edge, the deployed translator-stripped student; paper, the "
    "public MOCHA code's distillation settings. Each option below overrides its recipe's value; "
    "--resume keeps the saved run's recipe.  [default: edge]",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="[paper: 20; edge: 5; --stage base: 20; with --resume: the saved run's]",
)
@click.option("--imgsz", default=640, show_default=True)
@click.option("--batch", default=16, show_default=True,
              help="Images per optimiser step, in total: under torchrun each of the N ranks takes batch / N.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Data-loading processes per rank [none on a CPU with <= 4 cores, else min(8, cores / 2)].")  # fmt: skip
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:1 ... (under torchrun, cuda is each rank's cuda:LOCAL_RANK)")  # fmt: skip
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Run as N torchrun ranks on this machine (DDP; with --device cuda: one GPU each), i.e. "
              "`torchrun --standalone --nproc_per_node N -m mocha_edge train ...`.")  # fmt: skip
@click.option("--sync-bn", is_flag=True, help="Under torchrun on GPUs: the student's BatchNorm normalises over "
              "the global batch (SyncBatchNorm) instead of each rank's images.")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--schedule",
    type=click.Choice(["published", "joint"]),
    default=None,
    help="published: translator every epoch, student every --student-every-th; joint: both every epoch "
    "[paper: published; edge: joint].",
)
@click.option("--student-every", type=int, default=None, help="[recipe: 4]")
@click.option("--lr-student", type=float, default=None, help="[paper: 1e-4; edge: 1e-3; --stage base: 1e-3]")
@click.option("--lr-translator", type=float, default=None, help="[recipe: 1e-3]")
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "adamw"]),
    default=None,
    help="adam: weight decay added to the gradient (coupled, paper); adamw: decoupled (edge).",
)
@click.option("--betas", default=None, help="Adam betas B1,B2 [paper: 0.937,0.999; edge: 0.9,0.999]")
@click.option("--weight-decay", type=float, default=None, help="Translator weights [paper: 1e-4; edge: 5e-4]")
@click.option(
    "--weight-decay-student",
    type=float,
    default=None,
    help="Student backbone+neck weights [paper: 1e-5 (head 0); edge: 5e-4 (head too)]",
)
@click.option(
    "--warmup-iters",
    type=int,
    default=None,
    help="Linear warm-up shared by all parameter groups, in iterations [paper: 1000; 0: none]",
)
@click.option("--warmup-epochs", type=float, default=None, help="... or in epochs of iterations [edge: 1]")
@click.option(
    "--warmup-mode",
    type=click.Choice(["shared", "per-group"]),
    default="shared",
    show_default=True,
    help="per-group: each group warms over its own first trained iterations (the README's ablation)",
)
@click.option("--lrf", type=float, default=None, help="The cosine ends at lrf x lr [paper: 0; edge: 0.01]")
@click.option(
    "--augment/--no-augment",
    default=None,
    help="ultralytics' augmentation while distilling [both recipes: off, letterbox only; the base stage: on]",
)
@click.option("--ema/--no-ema", default=None, help="Save an EMA of the student [paper: off; edge: on]")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0: none [paper: 0; edge: 10]")
@click.option(
    "--whitened-targets/--no-whitened-targets",
    default=None,
    help="Distil targets whitened per PCA component (the cache must be whitened: teach's default) or the "
    "PCA projection itself (a whitened cache's targets are multiplied back by its divisors) "
    "[paper: on; edge: off]",
)
@click.option("--lambda-dist", default=1.0, show_default=True, help="Weight of L_dist (local alignment).")
@click.option("--lambda-emb", default=1.0, show_default=True, help="Weight of L_emb (relational).")
@click.option(
    "--tau", type=float, default=None, help="Temperature of L_emb (on distances / dim) [paper: 1; edge: 0.01]"
)
@click.option(
    "--emb-on",
    type=click.Choice(["student", "translated"]),
    default=None,
    help="Which student vectors L_emb compares with the teacher's [paper: translated; edge: student]",
)
@click.option("--focus-weighting", is_flag=True, help="Align-KD: weight L_dist by each box's LLaVA focus.")
@click.option("--close-mosaic", default=0, show_default=True, help="Turn mosaic off for the last N epochs.")
@click.option("--hyp", multiple=True, help="ultralytics augmentation override, key=value (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def train(ctx: click.Context, dataset: Path | None, out: Path, model: str, stage: str, teacher_cache: Path | None,
          distill: bool, recipe: str | None, epochs: int | None, imgsz: int, batch: int, workers: int | None, device: str,
          nproc: int | None, sync_bn: bool, seed: int,
          schedule: str | None, student_every: int | None, lr_student: float | None, lr_translator: float | None,
          optimizer: str | None, betas: str | None, weight_decay: float | None,
          weight_decay_student: float | None, warmup_iters: int | None, warmup_epochs: float | None,
          warmup_mode: str,
          lrf: float | None, augment: bool | None, ema: bool | None, grad_clip: float | None,
          whitened_targets: bool | None, lambda_dist: float, lambda_emb: float, tau: float | None,
          emb_on: str | None, focus_weighting: bool, close_mosaic: int, hyp: tuple[str, ...], resume: bool,
          quiet: bool) -> None:  # fmt: skip
    """Train the coarse base detector, the MOCHA-distilled student, or its plain baseline.

    Writes DIR/last.ckpt (student + translator + PCA + config, every epoch, atomically), DIR/student.pt
    (a plain ultralytics checkpoint), DIR/metrics.csv and DIR/metrics.png.

    \b
    Examples:
      mocha-edge train --stage base --data data/synth --out runs/base --epochs 30 --imgsz 256
      mocha-edge train --data data/synth --model runs/base/last.ckpt \\
          --teacher-cache data/synth/teacher.safetensors --out runs/distill --imgsz 256
      mocha-edge train --data data/synth --model runs/base/last.ckpt --no-distill --out runs/baseline --imgsz 256
      mocha-edge train --data data/synth --model runs/base/last.ckpt --recipe paper \\
          --teacher-cache data/synth/teacher.safetensors --out runs/paper --imgsz 256
      mocha-edge train --out runs/distill --resume
      mocha-edge train --data my.yaml --model runs/base/last.ckpt --teacher-cache cache.safetensors \\
          --out runs/distill --device cuda --batch 64 --nproc 4
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
          -m mocha_edge train --data my.yaml ... --out /shared/runs/distill --device cuda --batch 128
    """
    from click.core import ParameterSource

    from mocha_edge import distributed
    from mocha_edge.train import DEFAULT_RECIPE, TrainConfig
    from mocha_edge.train import train as run_train

    if dataset is None and not resume:
        raise click.UsageError("--data is required (except with --resume)")
    saved = _saved_train_config(out) if resume else {}
    if resume and ctx.get_parameter_source("device") is ParameterSource.DEFAULT and "device" in saved:
        device = str(saved["device"])  # a resumed run keeps its device, as its config does
    beta_pair = None
    if betas is not None:
        try:
            b1, b2 = (float(v) for v in betas.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{betas!r}: expected B1,B2 (e.g. 0.937,0.999)", param_hint="--betas"
            ) from None
        beta_pair = (b1, b2)
    cfg = TrainConfig(
        data=str(dataset) if dataset else "", out=str(out), model=model, stage=stage,
        distill=distill, teacher_cache=str(teacher_cache) if teacher_cache else None,
        recipe=recipe or DEFAULT_RECIPE, epochs=epochs,
        imgsz=imgsz, batch=batch, workers=workers, device=device, seed=seed, schedule=schedule,
        student_every=student_every, lr_student=lr_student, lr_translator=lr_translator,
        optimizer=optimizer, betas=beta_pair, weight_decay=weight_decay,
        weight_decay_student=weight_decay_student, warmup_iters=warmup_iters, warmup_epochs=warmup_epochs,
        warmup_mode=warmup_mode,
        lrf=lrf, augment=augment, ema=ema, grad_clip=grad_clip, whitened_targets=whitened_targets,
        lambda_dist=lambda_dist, lambda_emb=lambda_emb, tau=tau, emb_on=emb_on,
        focus_weighting=focus_weighting, close_mosaic=close_mosaic, hyp=_parse_hyp(hyp),
    )  # fmt: skip
    if nproc is not None and nproc > 1:  # bad input fails here, in one line, before torchrun starts
        if distributed.is_distributed():
            raise click.UsageError("--nproc launches torchrun itself; drop it when running under torchrun")
        global_batch = int(saved.get("batch", batch))
        if global_batch % nproc:
            raise click.BadParameter(
                f"{global_batch} is the global batch{' (of the run to resume)' if 'batch' in saved else ''}: "
                f"it must divide by --nproc {nproc} (e.g. {max(global_batch // nproc, 1) * nproc})",
                param_hint="--batch",
            )
        if not device.startswith("cuda") and sync_bn:
            raise click.BadParameter("needs GPUs (--device cuda): torch's SyncBatchNorm has no CPU kernel",
                                     param_hint="--sync-bn")  # fmt: skip
        if device == "cuda":
            import torch

            if torch.cuda.device_count() < nproc:
                raise click.BadParameter(f"--nproc {nproc} with --device cuda needs {nproc} GPUs, "
                                         f"{torch.cuda.device_count()} visible", param_hint="--nproc")  # fmt: skip
        sys.exit(distributed.launch_torchrun(nproc, ["train", *_argv_of(ctx, drop=("nproc",))]))
    env = distributed.init(device)
    try:
        res = run_train(cfg, resume=resume, progress=not quiet, log=click.echo, epochs=epochs, recipe=recipe,
                        dist=env, sync_bn=sync_bn)  # fmt: skip
    except MochaError as e:
        if env.distributed and not str(e).startswith(env.tag):
            e.args = (f"{env.tag}: {e}",)
        raise
    finally:
        distributed.shutdown(env)
    if not env.is_main:
        click.echo(f"{env.tag}: done; rank 0 wrote {res.checkpoint}")
        return
    last = res.history[-1] if res.history else {}
    click.echo(f"checkpoint: {res.checkpoint}\nultralytics student: {res.student}")
    if "val_map50" in last:
        click.echo(f"val mAP50 {last['val_map50']:.1f}, mAP50-95 {last.get('val_map50_95', 0):.1f}")


# ------------------------------------------------------------------------------------------------ enroll
@cli.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--bank", required=True, type=click.Path(path_type=Path),
              help="Prototype bank file (.safetensors); created when missing.")  # fmt: skip
@click.option("--name", help="Identity to enrol (not with --episode: names come from the dataset).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Support image (repeatable); its box from --box, else its YOLO label file, else the "
                   "student's most confident --class detection.")  # fmt: skip
@click.option("--box", "boxes", multiple=True, help="x1,y1,x2,y2 in pixels, one per --image, in order.")
@click.option("--label-index", type=int, help="Row (0-based) of a label file with several boxes.")
@click.option("--boxes-json", type=click.Path(path_type=Path),
              help='JSON list of {"image": path, "box": [x1,y1,x2,y2], "class": name}.')  # fmt: skip
@click.option("--episode", type=click.Path(path_type=Path),
              help="MOCHA-layout dataset: enrol every identity of one episode's support images.")  # fmt: skip
@click.option("--episode-index", default=0, show_default=True, help="Which episode of --episode.")
@click.option("--shots", type=click.IntRange(min=1), default=None,
              help="With --episode: the K-shot episode file [default: 1]. With --source: shots taken along "
                   "the track [default: 5].")  # fmt: skip
@click.option("--class", "coarse", default=None,
              help="Coarse class name (default: from the label, else the student's detection); needed to "
                   "box images without --box or label file, and with --source.")  # fmt: skip
@click.option("--source", metavar="URI", help="Video file, folder, camera (/dev/video0, csi://0) or stream: "
              "track the dominant --class object and enrol --shots diverse shots of it.")  # fmt: skip
@click.option("--max-frames", type=click.IntRange(min=1), default=None,
              help="Read at most this many --source frames (a camera needs this or --seconds).")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Read --source for at most this many seconds.")  # fmt: skip
@click.option("--conf", type=float, default=0.25, show_default=True,
              help="Detection confidence for boxes the student finds (images without a box, --source).")  # fmt: skip
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Folder for preview JPEGs of the boxes taken [default: BANK.preview].")  # fmt: skip
@click.option("--add-shots", is_flag=True, help="Append shots to an already enrolled identity.")
@click.option("--replace", is_flag=True, help="Overwrite an already enrolled identity.")
@click.option("--remove", metavar="NAME", help="Delete identity NAME (no images; MODEL optional).")
@click.option("--identity", "only", multiple=True, metavar="NAME",
              help="With --episode: enrol only this identity (repeatable).")  # fmt: skip
@click.option("--set-threshold", "set_thresholds", multiple=True, metavar="NAME=T",
              help="Fix NAME's unknown threshold at cosine T, or NAME=auto to recalibrate (repeatable).")  # fmt: skip
@click.option("--list", "list_", is_flag=True, help="Print the bank (after any edit); MODEL optional.")
@click.option("--keep-translator", is_flag=True, help="Enrol in the translator's (teacher) space.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--max-shots", type=click.IntRange(min=1), default=None,
              help="Shots an identity keeps (default 20, as `run`'s live enrolment); past it the most "
                   "redundant shot is dropped.")  # fmt: skip
def enroll(model: Path | None, bank: Path, name: str | None, images: tuple[Path, ...], boxes: tuple[str, ...],
           label_index: int | None, boxes_json: Path | None, episode: Path | None, episode_index: int,
           shots: int, coarse: str | None, add_shots: bool, replace: bool, remove: str | None,
           only: tuple[str, ...], set_thresholds: tuple[str, ...], list_: bool, keep_translator: bool,
           device: str, max_shots: int | None, source: str | None, max_frames: int | None,
           seconds: float | None, conf: float, preview: Path | None) -> None:  # fmt: skip
    """Enrol personal objects into the prototype bank --bank, with vectors of the student MODEL (.ckpt/.pt).

    Support boxes come from --box, YOLO label files, --boxes-json or a MOCHA --episode, or without drawing
    any: an --image with neither --box nor label file takes the student's most confident --class
    detection (skipped with a warning asking for --box when there is none, or when another object of the
    class scores within 80 % of it), and --source tracks the --class objects of a clip or camera with
    ByteTrack and takes --shots shots along the track with the highest summed score: spread in time,
    near-duplicates, low-confidence and edge-cut boxes skipped. Previews of the boxes taken go to
    --preview (default BANK.preview/). A name already in the bank needs --add-shots or --replace. A bank made by another model, vector size or vector space is
    refused. Each identity gets its own "unknown" threshold, recalibrated on every edit: per class, the lowest
    cosine that accepts at most 0.5 % of the class's other objects (the model's shipped base vectors and the
    other identities' shots); --list shows them, --set-threshold overrides. The bank is written atomically,
    only after every support image was read.

    \b
    Examples:
      mocha-edge enroll runs/distill/last.ckpt --bank my.bank --name my_mug --class mug \\
          --image mug1.jpg --box 40,30,180,200 --image mug2.jpg --box 12,8,150,170
      mocha-edge enroll runs/distill/last.ckpt --bank my.bank --name my_mug --add-shots --image photos/images/m3.jpg
      mocha-edge enroll runs/distill/last.ckpt --bank pets.bank --name rex --class dog --image a.jpg --image b.jpg
      mocha-edge enroll runs/distill/last.ckpt --bank pets.bank --name rex --class dog --source clip.mp4 --shots 8
      mocha-edge enroll runs/distill/last.ckpt --bank pets.bank --name rex --class dog --add-shots \\
          --source /dev/video0 --seconds 20
      mocha-edge enroll runs/distill/last.ckpt --bank ep0.bank --episode data/synth --shots 5 --episode-index 0
      mocha-edge enroll --bank my.bank --remove my_mug --list
      mocha-edge enroll --bank my.bank --set-threshold my_mug=0.45 --list
    """
    from mocha_edge.enroll import enroll as run_enroll
    from mocha_edge.enroll import list_bank

    if remove is not None or set_thresholds or name or images or boxes or boxes_json or episode or source:
        summary = run_enroll(
            model, bank, name=name, images=images, boxes=boxes, label_index=label_index, boxes_json=boxes_json,
            episode=episode, episode_index=episode_index, shots=shots, cls=coarse, add_shots=add_shots,
            replace=replace, remove=remove, keep_translator=keep_translator, device=device,
            identities=list(only) if only else None, set_thresholds=set_thresholds, source=source,
            max_frames=max_frames, seconds=seconds, conf=conf, preview=preview,
            **({} if max_shots is None else {"max_shots": max_shots}),
        )  # fmt: skip
        for line in summary.lines():
            click.echo(line)
    elif not list_:
        raise click.UsageError(
            "nothing to do: give --image, --boxes-json, --episode, --source, --remove, --set-threshold or --list"
        )
    if list_:
        for line in list_bank(bank):
            click.echo(line)


# ------------------------------------------------------------------------------------------------ eval
@cli.command("eval")
@click.option(
    "--data", "dataset", required=True, type=click.Path(path_type=Path), help="MOCHA-layout dataset."
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME=PATH",
    help="A student to evaluate (repeatable): a run's last.ckpt or an ultralytics .pt. "
    "A NAME ending in +translator keeps the translator (e.g. distilled+translator=runs/d/last.ckpt).",
)
@click.option("--shots", default="1,5", show_default=True, help="Comma-separated shot counts.")
@click.option("--episodes", default=100, show_default=True, help="Episodes per shot count.")
@click.option(
    "--match",
    "matches",
    default="conditional,global",
    show_default=True,
    help="Matching modes: conditional (within the predicted class), global.",
)
@click.option("--score", "scorings", default="conf-cosine", show_default=True,
              help="mAP scorings (comma-separated): conf-cosine (cosine in the matching space, score conf x cos), "
                   "paper (MOCHA's public code: raw-mean prototypes, cosine/L1/MSE averaged, score conf).")  # fmt: skip
@click.option(
    "--teacher-cache", type=click.Path(path_type=Path), help="Adds the 'teacher' row (the ceiling)."
)
@click.option("--random-init", is_flag=True, help="Adds the 'random_init' row (the floor).")
@click.option("--conf", default=0.001, show_default=True, help="Detection confidence floor (as for mAP).")
@click.option("--space", "space_spec", default=None, metavar="SPEC",
              help="Matching space for every row instead of each model's own, refitted on the training split: "
                   "class-mean+wccn, class-mean, global-mean, none (ablations).")  # fmt: skip
@click.option("--threshold", type=float, default=None, metavar="T",
              help="Operating point: one cosine threshold for every identity instead of the banks' own.")  # fmt: skip
@click.option("--no-openset", is_flag=True, help="Skip the operating-point (open-set) metrics.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for sampled episodes (no episodes file).")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Write the report here (atomically)."
)
def eval_cmd(dataset: Path, models: tuple[str, ...], shots: str, episodes: int, matches: str, scorings: str,
             teacher_cache: Path | None, random_init: bool, conf: float, space_spec: str | None,
             threshold: float | None, no_openset: bool, device: str, seed: int,
             json_out: Path | None) -> None:  # fmt: skip
    """Episodic few-shot evaluation on instance labels: every model on the same episodes.

    The ranking: mAP50 and mAP50-95 (ultralytics' metrics) per episode, mean and 95% interval, for
    conditional and global matching, scored as --score says (the paper's headline is mAP50-95 under
    `--score paper`). The decision, at the operating point (open-set episodes): a seeded half
    of each class's identities is enrolled in a bank with its own calibrated thresholds, the other half stays
    in the queries as unenrolled objects; detections at `run`'s confidence (0.25), named from 0.5 up.
    id_precision, id_recall (over detected enrolled objects), false_id_rate (named unenrolled objects),
    det_recall_novel (objects detected at all).

    \b
    Example:
      mocha-edge eval --data data/synth --model baseline=runs/baseline/last.ckpt \\
          --model distilled=runs/distill/last.ckpt --model distilled+translator=runs/distill/last.ckpt \\
          --teacher-cache data/synth/teacher.safetensors --random-init --shots 1,5 --episodes 100 --json eval.json
    """
    from mocha_edge.cache import TeacherCache
    from mocha_edge.data import load_dataset
    from mocha_edge.evaluate import evaluate, format_table
    from mocha_edge.infer import Student
    from mocha_edge.utils import write_json_atomic

    loaded = {}
    for spec in models:
        if "=" not in spec:
            raise click.BadParameter(f"{spec!r}: expected NAME=PATH", param_hint="--model")
        name, path = spec.split("=", 1)
        loaded[name] = Student.load(path, device=device, translator=name.endswith("+translator"))
    ds = load_dataset(dataset)
    cache = TeacherCache.load(teacher_cache) if teacher_cache else None
    if cache is not None:
        cache.check(dataset_fingerprint=ds.fingerprint())
    report = evaluate(
        ds, loaded, [int(k) for k in shots.split(",")], episodes, tuple(m.strip() for m in matches.split(",")),
        teacher_cache=cache, random_init=random_init, conf=conf, seed=seed, log=click.echo,
        openset=not no_openset, centring=space_spec, threshold=threshold,
        scorings=tuple(x.strip() for x in scorings.split(",")),
    )  # fmt: skip
    click.echo(format_table(report))
    if json_out:
        write_json_atomic(json_out, report)
        click.echo(f"wrote {json_out}")


# ------------------------------------------------------------------------------------------------ export
@cli.command("export")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "engine"]),
    default="onnx",
    show_default=True,
    help="onnx: ONNX Runtime / any runtime; engine: TensorRT engines (needs TensorRT + a GPU).",
)
@click.option("--fp16", is_flag=True, help="Also an FP16 artefact (engine: the default precision).")
@click.option("--int8", is_flag=True, help="Also an INT8 artefact (symmetric Q/DQ; needs --calib or --data).")
@click.option(
    "--calib", type=click.Path(path_type=Path), help="Dataset whose images calibrate INT8 [default: --data]."
)
@click.option("--calib-images", default=500, show_default=True, help="Calibration images (fewer: warning).")
@click.option("--imgsz", type=int, default=None, help="Input side [default: the training size].")
@click.option("--out", type=click.Path(path_type=Path), help="Output .onnx [default: beside CKPT].")
@click.option("--batch", default=1, show_default=True)
@click.option("--dynamic", is_flag=True, help="Dynamic batch axis.")
@click.option(
    "--keep-translator", is_flag=True, help="Also write translator.onnx (vectors -> teacher space)."
)
@click.option("--workspace", default=DEFAULT_WORKSPACE_GB, show_default=True,
              help="TensorRT builder workspace limit (GiB).")  # fmt: skip
@click.option(
    "--data",
    "dataset",
    type=click.Path(path_type=Path),
    help="Dataset for the accuracy report (val mAP50, 1-shot episodes, vector cosine, parity).",
)
@click.option("--episodes", default=50, show_default=True, help="1-shot episodes in the report.")
@click.option("--parity-images", default=20, show_default=True, help="Images for the PyTorch-vs-ONNX parity.")
@click.option("--no-report", is_flag=True, help="Skip the accuracy/speed report.")
def export_cmd(ckpt: Path, fmt: str, fp16: bool, int8: bool, calib: Path | None, calib_images: int,
               imgsz: int | None, out: Path | None, batch: int, dynamic: bool, keep_translator: bool,
               workspace: float, dataset: Path | None, episodes: int, parity_images: int,
               no_report: bool) -> None:  # fmt: skip
    """Export a trained student (translator stripped) to ONNX (raw head outputs + the three head-input
    maps, names in mocha_edge.export.contract; opset 17, onnxslim, checker-clean) with a JSON of deployment
    facts beside it; optionally FP16 and symmetric INT8 Q/DQ ONNX, or TensorRT FP16/INT8 engines, and an
    accuracy report (NAME.report.json: mAP50, 1-shot mAP50, vector cosine vs FP32, ms per precision).

    \b
    Example:
      mocha-edge export runs/distill/last.ckpt --fp16 --int8 --data data/synth
      mocha-edge export runs/distill/last.ckpt --format engine --int8 --calib data/synth
    """
    from mocha_edge.export.exporter import ExportOptions, run_export

    opts = ExportOptions(
        fmt=fmt, fp16=fp16, int8=int8, calib=calib, calib_images=calib_images, imgsz=imgsz, batch=batch,
        dynamic=dynamic, keep_translator=keep_translator, workspace_gb=workspace, data=dataset,
        episodes=episodes, parity_images=parity_images, report=not no_report, out=out,
        command=" ".join(["mocha-edge", *map(shlex.quote, sys.argv[1:])]),
    )  # fmt: skip
    run_export(ckpt, opts, log=click.echo)


# ------------------------------------------------------------------------------------------------ bench
def _csv(value: str | None, cast=str) -> tuple:
    return tuple(cast(v.strip()) for v in value.split(",") if v.strip()) if value else ()


@cli.command("bench")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--backend", default="torch,torch-cuda,ort,trt", show_default=True,
              help="Registry engines to try, comma-separated (those that cannot run here are listed as skipped "
                   "with the reason; `mocha-edge info` lists them).")  # fmt: skip
@click.option("--precision", default="fp32,fp16,int8", show_default=True, help="Precisions to try.")
@click.option("--imgsz", default=None, help="Input sizes, e.g. 320,640 [default: the model's].")
@click.option("--frames", default=100, show_default=True, help="Timed frames per row (after warm-up).")
@click.option("--warmup", default=10, show_default=True)
@click.option(
    "--source",
    default=None,
    help="Any source `run` opens: image, folder, video, rtsp://, v4l2://, csi:// "
    "[default: ultralytics' bundled photos].",
)
@click.option(
    "--calib", type=click.Path(path_type=Path), help="Calibration data for INT8 rows of a checkpoint."
)
@click.option(
    "--prototypes", default=1000, show_default=True, help="Synthetic prototypes for the match stage."
)
@click.option(
    "--mode", type=click.Choice(["conditional", "global"]), default="conditional", show_default=True
)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: measured].")
@click.option("--no-reference", is_flag=True, help="Skip ultralytics' predictor rows.")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Write OUT.json + OUT.md + OUT.png."
)
@click.option(
    "--compare", nargs=2, type=click.Path(path_type=Path), help="Print B/A ratios of two bench JSONs."
)
def bench_cmd(model: Path | None, backend: str, precision: str, imgsz: str | None, frames: int, warmup: int,
              source: str | None, calib: Path | None, prototypes: int, mode: str, threads: int | None,
              no_reference: bool, json_out: Path | None, compare: tuple[Path, Path] | None) -> None:  # fmt: skip
    """Latency per stage (capture, pre, infer, post, pool, match; p50/p90/p99), FPS and peak memory for
    every backend and precision this machine has, with ultralytics' predictor on the same student and
    frames measured in the same run. MODEL: a checkpoint (.ckpt/.pt: exported as needed) or an .onnx from
    `mocha-edge export` (its INT8/engine siblings are picked up).

    \b
    Example:
      mocha-edge bench runs/distill/student.onnx --source demo.mp4 --json bench.json
      mocha-edge bench runs/distill/last.ckpt --imgsz 320,640 --calib data/synth --json bench.json
      mocha-edge bench --compare laptop.json jetson.json
    """
    from mocha_edge.bench import BenchOptions, load_result, markdown_table, run_bench, write_outputs
    from mocha_edge.bench import compare as compare_results

    if compare:
        click.echo(compare_results(load_result(compare[0]), load_result(compare[1])))
        return
    if model is None:
        raise click.UsageError("give MODEL (or --compare A.json B.json)")
    from mocha_edge.deploy.engines import list_engines

    unknown = [b for b in _csv(backend) if b not in list_engines()]
    if unknown:
        raise click.BadParameter(f"unknown engine {', '.join(unknown)}; engines: {', '.join(list_engines())}",
                                 param_hint="--backend")  # fmt: skip
    opts = BenchOptions(
        backends=_csv(backend), precisions=_csv(precision), imgsz=_csv(imgsz, int), frames=frames,
        warmup=warmup, source=source, calib=str(calib) if calib else None, prototypes=prototypes, mode=mode,
        threads=threads, reference=not no_reference, log=click.echo,
    )  # fmt: skip
    res = run_bench(model, opts)
    click.echo(markdown_table(res))
    if json_out:
        paths = write_outputs(res, json_out)
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


# ------------------------------------------------------------------------------------------------ eval-video
@cli.command("eval-video")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Folder of `data synth --video` (or its video/ folder, or one seq_NNN.json); repeatable: "
                   "each enrolled from its own supports, rows pooled.")  # fmt: skip
@click.option("--json", "json_out", required=True, type=click.Path(path_type=Path), help="Results (JSON).")
@click.option("--ckpt", type=click.Path(path_type=Path),
              help="Checkpoint to enrol with [default: MODEL's, or the one its export names].")  # fmt: skip
@click.option("--tracker", "trackers", multiple=True, type=click.Choice(["none", "bytetrack", "botsort"]),
              help="Rows to evaluate (repeatable) [default: none, bytetrack, botsort].")  # fmt: skip
@click.option("--corrections", is_flag=True,
              help="\"Not NAME\" protocol: a simulated user corrects wrongly named distractor tracks on the first "
                   "half of each sequence; the rest is scored with the enrolled and with the corrected bank.")  # fmt: skip
@click.option("--blocks", "block_s", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="With --corrections: alternate held-out and scored blocks of SECONDS instead of halves.")  # fmt: skip
def eval_video_cmd(
    model: Path,
    data: tuple[Path, ...],
    json_out: Path,
    ckpt: Path | None,
    trackers: tuple[str, ...],
    corrections: bool,
    block_s: float | None,
) -> None:
    """Identities over time on generated video: enrol every identity from the sequences' support photos,
    run the deployed pipeline over every frame, and score per-frame labels (--tracker none) and each
    tracker with one identity per track (IDF1, identity switches, MOTA on identity ids; per-frame identity
    accuracy; identified events within 1 s of full view; distractors identified).

    \b
    Example:
      mocha-edge data synth --out data/v7 --seed 7 --train 8 --val 2 --query 2 --video \\
          --video-frames 600 --video-sequences 2
      mocha-edge eval-video runs/export/student.onnx --data data/v7 --json eval_video.json
      mocha-edge eval-video runs/export/student.onnx --data data/v7 --data data/v11 --corrections \\
          --json corrections.json
    """
    from mocha_edge.eval_video import TRACKER_ROWS, format_table, run_eval_video
    from mocha_edge.utils import offline_env, write_json_atomic

    offline_env()
    if block_s is not None and not corrections:
        raise click.UsageError("--blocks goes with --corrections")
    res = run_eval_video(model, data, trackers=trackers or TRACKER_ROWS, ckpt=ckpt, corrections=corrections,
                         block_s=block_s, log=click.echo)  # fmt: skip
    write_json_atomic(json_out, res)
    click.echo(format_table(res))
    click.echo(f"wrote {json_out}")


# ------------------------------------------------------------------------------------------------ demo
@cli.command("demo")
@click.option("--out", default="mocha-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the data, models, reports and summary.json (re-running skips finished steps).")  # fmt: skip
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the generated benchmark and the training."
)
@click.option("--quick", is_flag=True, help="Tiny sizes, 1 epoch each (~3 min): a smoke test of the chain.")
def demo_cmd(out: Path, seed: int, quick: bool) -> None:
    """The whole chain on built-in data, on a CPU: generate the benchmark, teacher targets, base / distilled
    / baseline students, enrol, 1- and 5-shot evaluation, ONNX + INT8 export with its accuracy report, the
    live loop on a generated video, the benchmark; prints one summary table and writes OUT/summary.json.

    \b
    Example:
      mocha-edge demo --out mocha-demo
      mocha-edge demo --quick --out /tmp/demo-quick
    """
    from mocha_edge.demo import demo

    demo(out, seed=seed, quick=quick, log=click.echo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mocha-edge")


if __name__ == "__main__":
    main()


from mocha_edge.deploy.live import run_cmd  # noqa: E402 - registered last: `mocha-edge run`, the live loop

cli.add_command(run_cmd, "run")
