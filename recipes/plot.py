"""`ftk plot RUN [RUN ...]`: overlay the curves of several runs (a sweep's regimes, two seeds, a resumed run and
its reference) in one picture: training loss, validation loss/accuracy, learning rate and tokens/s against steps.

Not a Hydra command: its arguments are run folders. A sweep folder stands for every run in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ftk.errors import UsageError


def runs_in(path: Path) -> List[Path]:
    """The run itself (it has metrics.jsonl), or the runs one level below it (a sweep folder)."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file())
    return []


def label_of(run: Path, runs: List[Path]) -> str:
    """The folder name; the parent's too when two runs share a name (two sweeps' `0_regime=lora`)."""
    same = [r for r in runs if r.name == run.name]
    return f"{run.parent.name}/{run.name}" if len(same) > 1 else run.name


def plan(paths: List[str], out: Optional[str]) -> Tuple[List[Path], Path]:
    runs: List[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        found = runs_in(path)
        if not found:
            what = "does not exist" if not path.exists() else "has no metrics.jsonl (nor runs with one below it)"
            raise UsageError(f"{given} {what}; pass ftk run folders (runs/pretrain/<time>) or a sweep folder")
        runs += [r for r in found if r not in runs]
    if out is None:
        single = len(paths) == 1 and not (Path(paths[0]) / "metrics.jsonl").is_file()
        out_path = Path(paths[0]) / "curves.png" if single else Path("curves-compare.png")
    else:
        out_path = Path(out).expanduser()
    if out_path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"--out {out_path}: pick a .png, .pdf or .svg file name")
    if not out_path.parent.is_dir():
        raise UsageError(f"--out {out_path}: folder {out_path.parent} does not exist")
    return runs, out_path


def cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftk plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or sweep folders (every run in them)")
    parser.add_argument("-o", "--out", help="the picture (.png/.pdf/.svg); default: <sweep>/curves.png for one "
                                            "sweep folder, else ./curves-compare.png")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage line and code 2 for a bad command line
        return int(exc.code or 0)
    try:
        runs, out = plan(args.runs, args.out)
    except UsageError as exc:
        print(f"ftk plot: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    from ftk import curves

    drawn = curves.draw([(label_of(r, runs), curves.read_metrics(r)) for r in runs], out,
                        title=f"{len(runs)} run{'s' if len(runs) > 1 else ''}")
    print(f"wrote {drawn} ({len(runs)} runs: {', '.join(label_of(r, runs) for r in runs)})", file=sys.stderr)
    return 0
