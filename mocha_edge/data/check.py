"""``mocha-edge data check``: decode every image, collect problems, summarise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mocha_edge.data.dataset import Dataset, Problem
from mocha_edge.data.images import ImageReadError, read_rgb


@dataclass
class CheckReport:
    """What ``data check`` found. ``usable`` counts images that decode; broken ones were removed."""

    dataset: Dataset
    usable: dict[str, int] = field(default_factory=dict)
    broken: dict[str, int] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        return self.dataset.problems

    @property
    def ok(self) -> bool:
        """A dataset is usable when at least one image decodes."""
        return sum(self.usable.values()) > 0

    def summary_lines(self) -> list[str]:
        ds = self.dataset
        lines = [f"dataset: {ds.source} ({ds.format})", f"classes: {len(ds.names)}"]
        if ds.fine_names is not None:
            lines.append(
                f"instances: {len(ds.fine_names)} ({len(ds.novel_instances)} novel, reserved for episodes)"
            )
        counts = ds.box_counts()
        for s, items in ds.splits.items():
            n_boxes = sum(len(it.cls) for it in items)
            lines.append(
                f"{s}: {self.usable.get(s, 0)} images usable, {self.broken.get(s, 0)} broken, {n_boxes} boxes"
            )
            per = ", ".join(f"{ds.names[c]}={n}" for c, n in counts[s].items() if n)
            if per:
                lines.append(f"  boxes per class: {per}")
        for k, eps in sorted(ds.episodes.items()):
            lines.append(f"episodes: {len(eps)} x {k}-shot")
        lines.append(f"problems: {len(ds.problems)}")
        return lines


def check_dataset(ds: Dataset, workers: int = 4) -> CheckReport:
    """Decode every image once; broken images become fatal problems and are dropped from ``ds``."""
    report = CheckReport(ds)

    def probe(path: Path) -> str | None:
        try:
            read_rgb(path)
        except ImageReadError as e:
            return str(e)
        return None

    for split, items in ds.splits.items():
        with ThreadPoolExecutor(workers) as pool:
            errors = list(pool.map(probe, [it.path for it in items]))
        keep = []
        for it, err in zip(items, errors):
            if err is None:
                keep.append(it)
            else:
                ds.problems.append(Problem(str(it.path), err, fatal=True))
        ds.splits[split] = keep
        report.usable[split] = len(keep)
        report.broken[split] = len(items) - len(keep)
    return report
