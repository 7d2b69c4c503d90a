"""scripts/experiment_preferences.py on made-up data (a user's clone has no ../shared/data): --smoke runs every
stage through the real CLI (pretrain, reward model and judge on disjoint halves, generate -> pairs -> DPO ->
merge, judged held-out samples with the KL from the start, perplexity, HH SFT -> DPO / reward -> eval=preference)
to a report and a plot. The smoke run's numbers are not a measurement; only the wiring is checked."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

from tests.conftest import WORDS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import experiment_preferences as prefs  # noqa: E402  (scripts/ is not a package)


def fake_data(root: Path) -> Path:
    rng = random.Random(0)
    books = root / "gutenberg"
    books.mkdir(parents=True)
    for name in ("alpha-one.txt", prefs.HELD_OUT_BOOK):
        books.joinpath(name).write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n in (("train", 80), ("dev", 16), ("test", 16)):
        rows = [f"{k % 2} {' '.join(rng.choice(WORDS) for _ in range(8))} {'good' if k % 2 else 'bad'}"
                for k in range(n)]
        (sst2 / f"stsa.binary.{split}").write_text("\n".join(rows) + "\n")
    hh = root / "hh-rlhf" / "helpful-base"
    hh.mkdir(parents=True)
    with gzip.open(hh / "test.jsonl.gz", "wt") as f:
        for k in range(60):
            prompt = f"\n\nHuman: {' '.join(rng.choice(WORDS) for _ in range(6))} ?\n\nAssistant:"
            f.write(json.dumps({"chosen": prompt + " good answer " + rng.choice(WORDS),
                                "rejected": prompt + " bad " + rng.choice(WORDS)}) + "\n")
    return root


def test_hh_split_is_by_prompt():
    records = [{"chosen": f"\n\nHuman: q{k % 7}\n\nAssistant: a{k}", "rejected": f"\n\nHuman: q{k % 7}\n\nAssistant: b"}
               for k in range(70)]
    keys = {}
    for r in records:
        keys.setdefault(prefs.hh_prompt(r["chosen"]), set()).add(
            prefs.hashlib.sha256(prefs.hh_prompt(r["chosen"]).encode()).digest()[0] % 10 == 0)
    assert all(len(sides) == 1 for sides in keys.values())  # a prompt's pairs are never on both sides


def test_pairs_are_best_against_worst_by_reward(tmp_path):
    rows = [{"prompt_index": 0, "prompt": "a", "completion": c, "score": s}
            for c, s in ((" x", 0.2), (" y", 0.9), (" z", 0.5))]
    rows += [{"prompt_index": 1, "prompt": "b", "completion": " same", "score": 0.5}] * 2  # a tie: no pair
    assert prefs.pairs_from(rows, tmp_path / "p.jsonl") == 1
    assert json.loads((tmp_path / "p.jsonl").read_text()) == {"prompt": "a", "chosen": " y", "rejected": " x"}


def test_smoke_runs_every_stage_to_a_report(tmp_path):
    data = fake_data(tmp_path / "data")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_preferences.py"), "--smoke",
                           "--data", str(data), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "report.md").read_text()
    for text in ("Reward model and judge", "starting policy", "best-of-2", "DPO lora", "DPO full",
                 "Human preferences", "DPO policy (LoRA)", "reward model"):
        assert text in report, text
    assert (out / "preferences.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert set(results["steering"]["variants"]) == {"lora", "full"}
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_preferences.py"), "--smoke",
                            "--data", str(data), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished runs reused" in again.stdout
    assert (out / "report.md").read_text().split("minutes on this machine")[1] == report.split("minutes on this machine")[1]
