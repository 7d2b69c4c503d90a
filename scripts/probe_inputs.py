"""Run every case of the bad-input table (tests/bad_inputs.py) against the installed `ftk`, each in a fresh
process, as a user would, and print one row per case:

    command | exit code | first line of output | traceback? | files changed outside the run dir?

ending with `probes: N run, T tracebacks, U unexpected changes` (and exit code 1 unless every case gave
its one line with exit code 2, no traceback and no change outside its run folder).

    python scripts/probe_inputs.py                  # all cases; the tiny world is built first (~1 minute)
    python scripts/probe_inputs.py -k read-only     # cases whose name contains the text
    python scripts/probe_inputs.py --keep /tmp/p    # keep the probe folder to look at

The world (a tiny GPT pretrained for a few steps, a LoRA adapter, a corpus, a labelled task) is built with the
same installed `ftk`, in a temporary folder; FTK_CACHE points inside it, so nothing outside is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import bad_inputs  # noqa: E402  (the one table, shared with the test suite)
from tests.conftest import make_corpus, make_labelled, write_jsonl  # noqa: E402


def ftk_command() -> list:
    found = shutil.which("ftk") or str(Path(sys.executable).with_name("ftk"))
    if not Path(found).exists():
        sys.exit("probe_inputs: no installed `ftk` on PATH or next to this Python; pip install the package first")
    return [found]


def build_world(root: Path, env: dict) -> dict:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i, doc in enumerate(make_corpus()):
        (corpus / f"doc{i:03d}.txt").write_text(doc + "\n")
    labelled = write_jsonl(root / "labelled.jsonl", make_labelled(60))
    steps = [["pretrain", *bad_inputs.TINY, "train.max_steps=4", f"data.path={corpus}", f"hydra.run.dir={root / 'pt'}"],
             ["finetune", *bad_inputs.TINY_FT, f"model.name_or_path={root / 'pt' / 'final'}", "regime=lora",
              f"data.path={labelled}", f"hydra.run.dir={root / 'lora'}"]]
    for step in steps:
        done = subprocess.run([*ftk_command(), *step], capture_output=True, text=True, env=env, cwd=root)
        if done.returncode != 0:
            sys.exit(f"probe_inputs: building the world failed: ftk {' '.join(step)}\n{done.stderr[-3000:]}")
    return {"model": root / "pt" / "final", "adapter": root / "lora" / "final", "corpus": corpus,
            "labelled": labelled}


def first_line(output: str, command: str) -> str:
    errors = bad_inputs.error_lines(command, output)
    if errors:
        return errors[0]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains this text")
    ap.add_argument("--keep", type=Path, help="build the probe folder here and keep it")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="ftk-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FTK_CACHE": str(root / "cache"), "HF_DATASETS_CACHE": str(root / "hf-datasets"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for noisy in ("HYDRA_FULL_ERROR", "PYTHONPATH"):
        env.pop(noisy, None)
    started = time.time()
    world = build_world(root / "world", env)
    cases = [c for c in bad_inputs.CASES if args.k in c.name]
    tracebacks = unexpected = failures = 0
    print(f"{'case':<46} {'exit':>4}  {'traceback':<9} {'outside':<7}  first line")
    for n, case in enumerate(cases):
        tmp = root / "cases" / f"{n:03d}"
        tmp.mkdir(parents=True)
        if case.prepare:
            case.prepare(tmp, world)
        # Everything in the probe folder but this case's run folder and the cache must stay as it was.
        skip = (tmp / "run", root / "cache", root / "hf-datasets")
        before = bad_inputs.snapshot(root, skip=skip)
        bad_inputs.make_read_only(case, tmp)
        try:
            prefix = bad_inputs.drop_privileges() if case.read_only else []
            done = subprocess.run([*prefix, *ftk_command(), case.command, *case.argv(world, tmp)],
                                  capture_output=True, text=True, timeout=900, cwd=case.workdir(world, tmp),
                                  env={**env, **case.environment(world, tmp)})
        finally:
            bad_inputs.restore_permissions(case, tmp)
        output = done.stdout + done.stderr
        traceback = "Traceback" in output
        outside = bad_inputs.changed(before, bad_inputs.snapshot(root, skip=skip))
        lines = bad_inputs.error_lines(case.command, output)
        ok = done.returncode == 2 and len(lines) == 1 and case.expect in lines[0] and not traceback and not outside
        tracebacks += traceback
        unexpected += bool(outside)
        failures += not ok
        print(f"{case.name[:46]:<46} {done.returncode:>4}  {'yes' if traceback else 'no':<9} "
              f"{'yes' if outside else 'no':<7}  {first_line(output, case.command)[:160]}"
              + ("" if ok else f"   <-- expected exit 2 and one line with: {case.expect}"
                 + (f"; changed: {', '.join(outside[:3])}" if outside else "")))
    print(f"probes: {len(cases)} run, {tracebacks} tracebacks, {unexpected} unexpected changes"
          + (f", {failures} not as expected" if failures else "") + f" ({time.time() - started:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
