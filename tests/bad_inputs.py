"""The table of bad inputs: each case is a real `ftk` command that must stop with exit code 2 and ONE line
naming the problem (the `expect` text is in it), no traceback, and nothing touched outside its run folder.

Used by tests/test_bad_input.py (in-process, fast) and by scripts/probe_inputs.py (the installed `ftk` in
fresh processes). Arguments may name the shared tiny world: {model} (a pretrained GPT final/), {adapter}
(a LoRA classification adapter on it), {corpus} (a folder of text), {labelled} (a labelled .jsonl), and
{tmp}: the case's own folder, where `prepare` makes what the case needs (a damaged model, a read-only
folder). Unless a case passes its own, the run folder is {tmp}/run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

World = Dict[str, Path]

TINY = ("model=gpt-tiny", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.vocab_size=512",
        "model.max_position_embeddings=128", "hardware=cpu", "hardware.precision=fp32", "train.seq_len=64",
        "train.batch_size=8", "train.warmup_steps=1", "train.max_steps=2", "train.eval_batches=2")
TINY_FT = ("hardware=cpu", "hardware.precision=fp32", "train.seq_len=32", "train.batch_size=8", "train.max_steps=2",
           "train.eval_batches=2")


@dataclass(frozen=True)
class Case:
    name: str
    command: str                # pretrain | finetune | evaluate | merge-adapter | estimate | prepare | generate
    args: Tuple[str, ...]
    expect: str                 # text of the one error line
    prepare: Optional[Callable[[Path, World], None]] = None
    env: Tuple[Tuple[str, str], ...] = ()
    cwd: Optional[str] = None   # run from here (default: {tmp})
    read_only: Tuple[str, ...] = ()  # folders under {tmp} made read-only after prepare (needs an unprivileged process)
    run_dir: bool = True        # add hydra.run.dir={tmp}/run

    def fill(self, text: str, world: World, tmp: Path) -> str:
        for key, value in {**world, "tmp": tmp}.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    def argv(self, world: World, tmp: Path) -> List[str]:
        args = [self.fill(a, world, tmp) for a in self.args]
        return args + ([f"hydra.run.dir={tmp / 'run'}"] if self.run_dir else [])

    def environment(self, world: World, tmp: Path) -> Dict[str, str]:
        return {k: self.fill(v, world, tmp) for k, v in self.env}

    def workdir(self, world: World, tmp: Path) -> Path:
        return Path(self.fill(self.cwd, world, tmp)) if self.cwd else tmp


# ------------------------------------------------------------------------------------------- preparations


def _broken_prompts(tmp: Path, w: World) -> None:
    (tmp / "p.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (tmp / "fields.jsonl").write_text('{"question": "what"}\n')
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "fake.txt.gz").write_text("not gzip at all")


def _damaged_model(tmp: Path, w: World) -> None:
    shutil.copytree(w["model"], tmp / "damaged")
    weights = tmp / "damaged" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)


def _damaged_adapter(tmp: Path, w: World) -> None:
    shutil.copytree(w["adapter"], tmp / "damaged-adapter")
    weights = tmp / "damaged-adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(100)


def _malformed_config(tmp: Path, w: World) -> None:
    shutil.copytree(w["model"], tmp / "bad-config")
    (tmp / "bad-config" / "config.json").write_text('{"model_type": "gpt2",')


def _a_file(tmp: Path, w: World) -> None:
    (tmp / "a-file").write_text("not a folder\n")


def _read_only_folder(tmp: Path, w: World) -> None:
    (tmp / "ro").mkdir()


def _foreign_folder(tmp: Path, w: World) -> None:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("unrelated work\n")


def _left_by_a_refused_run(tmp: Path, w: World) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / ".lock").write_text("")  # what a command refused in {tmp}/run leaves behind


def _accented_corpus(tmp: Path, w: World) -> None:
    (tmp / "données").mkdir()
    shutil.copy(next(iter(sorted(Path(w["corpus"]).glob("*.txt")))), tmp / "données" / "a.txt")


def _empty(tmp: Path, w: World) -> None:
    (tmp / "empty.txt").write_text("")


def _good_shard(tmp: Path, w: World) -> Path:
    (tmp / "shards").mkdir()
    docs = [p.read_text() for p in sorted(Path(w["corpus"]).glob("*.txt"))]
    (tmp / "shards" / "shard-0.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp / "shards"


def _fake_gzip_shard(tmp: Path, w: World) -> None:
    (_good_shard(tmp, w) / "shard-1.jsonl.gz").write_text('{"text": "plain text, not gzip"}\n')


def _fake_zstd_shard(tmp: Path, w: World) -> None:
    (_good_shard(tmp, w) / "shard-1.jsonl.zst").write_text('{"text": "plain text, not zstd"}\n')


def _empty_shards(tmp: Path, w: World) -> None:
    import gzip

    (tmp / "empties").mkdir()
    (tmp / "empties" / "a.jsonl").write_text("")
    (tmp / "empties" / "b.jsonl").write_text("\n\n")
    with gzip.open(tmp / "empties" / "c.jsonl.gz", "wt") as f:
        f.write("")


def _malformed_jsonl(tmp: Path, w: World) -> None:
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')


def _malformed_csv(tmp: Path, w: World) -> None:
    (tmp / "bad.csv").write_text("text,source\nfine,a\nnot,fine,at all\n")


def _missing_column(tmp: Path, w: World) -> None:
    docs = [p.read_text() for p in sorted(Path(w["corpus"]).glob("*.txt"))[:30]]
    (tmp / "body.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))


def _foreign_tokenizer(tmp: Path, w: World) -> None:
    from ftk.data.tokenizer import train_tokenizer
    from ftk.schemas import Family

    docs = [p.read_text() for p in sorted(Path(w["corpus"]).glob("*.txt"))]
    train_tokenizer(docs * 2, Family.gpt2, 2000, 128).save_pretrained(tmp / "big-tokenizer")


def _notes_folder(tmp: Path, w: World) -> None:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "README.md").write_text("# What this data is\n")


def _not_a_model(tmp: Path, w: World) -> None:
    (tmp / "not-a-model").mkdir()


def _pairs(records):
    def write(tmp: Path, w: World) -> None:
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return write


def _tiny_bert(tmp: Path, w: World) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(tmp / "bert")


PREF = ("objective=dpo", "regime=lora", "model.name_or_path={model}", "data.path={tmp}/pairs.jsonl", *TINY_FT)
HH_APART = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "something else entirely"}] * 3

PRETRAINED = ("model=pretrained", "model.name_or_path={model}", "data.path={corpus}", "hardware=cpu",
              "train.max_steps=2", "train.seq_len=64")
EVAL = ("model.name_or_path={model}", "data.path={corpus}", "hardware=cpu")
RO = "hydra.run.dir={tmp}/ro/run"

CASES: List[Case] = [
    # --- data and models (the table as it was) -------------------------------------------------------
    Case("empty dataset", "pretrain", (*TINY, "data.path={tmp}/empty.txt"), "the dataset is empty", _empty),
    Case("malformed jsonl row", "pretrain", (*TINY, "data.path={tmp}/bad.jsonl"), "bad.jsonl:3: malformed JSON",
         _malformed_jsonl),
    Case("malformed csv row", "pretrain", (*TINY, "data.path={tmp}/bad.csv"),
         "bad.csv:3: 3 fields where the header has 2", _malformed_csv),
    Case("missing column", "pretrain", (*TINY, "data.path={tmp}/body.jsonl"),
         "has no column 'text'; its columns are body", _missing_column),
    Case("folder of .md files only", "pretrain", (*TINY, "data.path={tmp}/notes"),
         "a folder's .md files describe the data and are skipped", _notes_folder),
    Case("missing folder", "pretrain", (*TINY, "data.path={tmp}/no-such-folder/"), "does not exist"),
    Case("sequence longer than the model's positions", "pretrain", (*PRETRAINED, "train.seq_len=4096"),
         "larger than the model's 128 positions"),
    Case("tokenizer of another vocabulary", "pretrain", (*PRETRAINED, "model.tokenizer={tmp}/big-tokenizer"),
         "they do not belong together", _foreign_tokenizer),
    Case("model dir that is not a model", "pretrain",
         ("model=pretrained", "model.name_or_path={tmp}/not-a-model", "data.path={corpus}"),
         "is not a model directory", _not_a_model),
    # --- composition (moved from test_cli.py) -------------------------------------------------------------
    Case("unknown key", "pretrain", (*TINY, "train.foo=1"),
         "unknown config key 'train.foo'; valid keys here: max_steps"),
    Case("unknown top-level key", "pretrain", (*TINY, "bogus=1"), "unknown config key 'bogus'; valid keys here: model"),
    Case("wrong type", "pretrain", (*TINY, "train.max_steps=abc"), "train.max_steps: Value 'abc'"),
    Case("value outside an enum", "pretrain", (*TINY, "train.schedule=sideways"), "expected one of [cosine, linear"),
    Case("unknown group option", "pretrain", ("model=gpt-tni",), "unknown option 'gpt-tni' for model; choose one of"),
    Case("unknown preset", "pretrain", ("+recipe=nope",), "unknown option 'nope' for recipe; choose one of"),
    Case("tracker not installed", "pretrain", (*TINY, "logger=trackio"),
         "logger=trackio needs the trackio package, which is not installed: pip install 'ftk[trackio]'"),
    Case("model=pretrained without a path", "pretrain", ("model=pretrained",), "model.name_or_path is required"),
    Case("data=text without a path", "pretrain", ("data=text",), "data.path is required"),
    Case("seq_len over max_position_embeddings", "pretrain", ("train.seq_len=4096",),
         "train.seq_len=4096 is larger than model.max_position_embeddings=512"),
    Case("encoder with clm", "pretrain", ("model=bert-tiny",), "cannot be trained with objective=clm"),
    Case("missing data file", "pretrain", ("data.path=/no/such/corpus.txt",),
         "data path /no/such/corpus.txt does not exist"),
    # --- issue 15 item 10: every numeric field has its range ----------------------------------------------
    Case("num_heads=0", "pretrain", (*TINY, "model.num_heads=0"), "model.num_heads=0 is out of range: must be >= 1"),
    Case("hidden_size=0", "pretrain", (*TINY, "model.hidden_size=0"), "model.hidden_size=0 is out of range"),
    Case("hidden_size not divisible by heads", "pretrain", (*TINY, "model.hidden_size=65"),
         "model.hidden_size=65 is not divisible by model.num_heads=2"),
    Case("num_layers=0", "pretrain", (*TINY, "model.num_layers=0"), "model.num_layers=0 is out of range"),
    Case("seed=-1", "pretrain", (*TINY, "train.seed=-1"), "train.seed=-1 is out of range: must be >= 0"),
    Case("seed=2**32", "pretrain", (*TINY, "train.seed=4294967296"), "must be <= 4294967295"),
    Case("seed=-1 in a sweep", "pretrain", ("-m", *TINY, "train.seed=-1", "hydra.sweep.dir={tmp}/run"),
         "train.seed=-1 is out of range", run_dir=False),
    Case("beta2=1.5", "pretrain", (*TINY, "train.beta2=1.5"), "train.beta2=1.5 is out of range: must be < 1"),
    Case("eps=0", "pretrain", (*TINY, "train.eps=0"), "train.eps=0.0 is out of range: must be > 0"),
    Case("lr=inf", "pretrain", (*TINY, "train.lr=inf"), "train.lr=inf is not a finite number"),
    Case("lr=nan", "pretrain", (*TINY, "train.lr=nan"), "train.lr=nan is not a finite number"),
    Case("weight_decay=-1", "pretrain", (*TINY, "train.weight_decay=-1"), "train.weight_decay=-1.0 is out of range"),
    Case("max_minutes=-1", "pretrain", (*TINY, "train.max_minutes=-1"), "train.max_minutes=-1.0 is out of range"),
    Case("max_documents=-1", "pretrain", (*TINY, "data.max_documents=-1"), "data.max_documents=-1 is out of range"),
    Case("max_steps=0", "pretrain", (*TINY, "train.max_steps=0"), "train.max_steps=0 is out of range: must be >= 1"),
    Case("batch_size=0", "pretrain", (*TINY, "train.batch_size=0"), "train.batch_size=0 is out of range"),
    Case("micro_batch_size=0", "pretrain", (*TINY, "hardware.micro_batch_size=0"),
         "hardware.micro_batch_size=0 is out of range"),
    Case("dropout=1", "pretrain", (*TINY, "model.dropout=1"), "model.dropout=1.0 is out of range: must be < 1"),
    Case("validation_fraction=1", "pretrain", (*TINY, "data.validation_fraction=1"),
         "data.validation_fraction=1.0 is out of range"),
    Case("mlm_probability=0", "pretrain", (*TINY, "model=bert-tiny", "objective=mlm", "objective.mlm_probability=0"),
         "objective.mlm_probability=0.0 is out of range"),
    Case("llama head_dim odd", "pretrain", (*TINY, "model=llama-tiny", "model.hidden_size=6", "model.num_heads=2"),
         "must be even for llama"),
    Case("llama kv heads do not divide heads", "pretrain", (*TINY, "model=llama-tiny", "model.num_heads=4",
                                                            "model.num_kv_heads=3"),
         "model.num_heads=4 is not a multiple of model.num_kv_heads=3"),
    Case("lora_r=0", "finetune", (*TINY_FT, "model.name_or_path={model}", "data.path={labelled}", "regime.lora_r=0"),
         "regime.lora_r=0 is out of range"),
    Case("packing for an objective that does not pack", "finetune",
         (*TINY_FT, "model.name_or_path={model}", "data.path={labelled}", "data.packing=true"),
         "data.packing=true: objective=classification does not train on packed sequences"),
    Case("evaluate batch_size=0", "evaluate", (*EVAL, "eval.batch_size=0"), "eval.batch_size=0 is out of range"),
    Case("evaluate stride=0", "evaluate", (*EVAL, "eval.stride=0"), "eval.stride=0 is out of range"),
    Case("harness without tasks", "evaluate", (*EVAL, "eval=harness"), "eval=harness needs the tasks to run"),
    Case("harness task that does not exist", "evaluate", (*EVAL, "eval=harness", "eval.tasks=no_such_task_xyz"),
         "unknown lm-eval task no_such_task_xyz; a local task needs eval.include_path"),
    Case("harness include_path that is not a folder", "evaluate",
         (*EVAL, "eval=harness", "eval.tasks=x", "eval.include_path={tmp}/missing"), "is not a folder"),
    Case("evaluate context=1", "evaluate", (*EVAL, "eval.context=1"), "eval.context=1 is out of range"),
    Case("evaluate seed=-1", "evaluate", (*EVAL, "eval.seed=-1"), "eval.seed=-1 is out of range"),
    Case("evaluate negative shots", "evaluate", (*EVAL, "eval.shots=[0,-1]"), "eval.shots=-1 is out of range"),
    Case("merge seed=-1", "merge-adapter", ("adapter_path={adapter}", "output_dir={tmp}/run/merged", "seed=-1"),
         "seed=-1 is out of range"),
    Case("merge probe_len=1", "merge-adapter", ("adapter_path={adapter}", "output_dir={tmp}/run/merged",
                                                "probe_len=1"), "probe_len=1 is out of range"),
    Case("merge tolerance=inf", "merge-adapter", ("adapter_path={adapter}", "output_dir={tmp}/run/merged",
                                                  "tolerance=inf"), "tolerance=inf is not a finite number"),
    Case("unknown attention implementation", "pretrain",
         (*TINY, "data.path={corpus}", "model.attn_implementation=bogus"),
         "model.attn_implementation=bogus is not supported"),
    Case("cache_dir is a file", "pretrain", (*TINY, "data.cache_dir={tmp}/a-file"), "data.cache_dir=", _a_file),
    Case("empty data.path (would read the working folder)", "pretrain", (*TINY, "data.path="),
         "data.path is empty"),
    Case("empty adapter_path", "merge-adapter", ("adapter_path=", "output_dir={tmp}/run/merged"),
         "adapter_path is empty"),
    # --- item 11: damaged weights ---------------------------------------------------------------------------
    Case("truncated model.safetensors (pretrain)", "pretrain",
         ("model=pretrained", "model.name_or_path={tmp}/damaged", "data.path={corpus}", "train.seq_len=64"),
         "model.safetensors is damaged", _damaged_model),
    Case("truncated model.safetensors (finetune)", "finetune",
         (*TINY_FT, "model.name_or_path={tmp}/damaged", "data.path={labelled}"), "model.safetensors is damaged",
         _damaged_model),
    Case("truncated model.safetensors (evaluate)", "evaluate",
         ("model.name_or_path={tmp}/damaged", "data.path={corpus}"), "model.safetensors is damaged", _damaged_model),
    Case("truncated model.safetensors (merge base)", "merge-adapter",
         ("adapter_path={adapter}", "model.name_or_path={tmp}/damaged", "output_dir={tmp}/run/merged"),
         "model.safetensors is damaged", _damaged_model),
    Case("truncated adapter_model.safetensors (merge)", "merge-adapter",
         ("adapter_path={tmp}/damaged-adapter", "output_dir={tmp}/run/merged"), "adapter_model.safetensors is damaged",
         _damaged_adapter),
    Case("truncated adapter_model.safetensors (evaluate)", "evaluate",
         ("adapter_path={tmp}/damaged-adapter", "data.path={labelled}"), "adapter_model.safetensors is damaged",
         _damaged_adapter),
    Case("truncated compare_to model", "evaluate", (*EVAL, "compare_to={tmp}/damaged"),
         "model.safetensors is damaged", _damaged_model),
    Case("malformed config.json (evaluate)", "evaluate", ("model.name_or_path={tmp}/bad-config", "data.path={corpus}"),
         "config.json is damaged", _malformed_config),
    # --- item 14: where ftk writes, checked before work -----------------------------------------------------
    Case("run dir is a file", "pretrain", (*TINY, "hydra.run.dir={tmp}/a-file"), "is a file, not a folder",
         _a_file, run_dir=False),
    Case("run dir under a file", "pretrain", (*TINY, "hydra.run.dir={tmp}/a-file/run"),
         "cannot be created: ", _a_file, run_dir=False),
    Case("run dir read-only", "pretrain", (*TINY, RO), "is read-only", _read_only_folder, read_only=("ro",),
         run_dir=False),
    Case("sweep dir read-only", "pretrain", ("-m", *TINY, "hydra.sweep.dir={tmp}/ro/sweep"), "is read-only",
         _read_only_folder, read_only=("ro",), run_dir=False),
    Case("FTK_CACHE read-only", "pretrain", TINY, "FTK_CACHE=", _read_only_folder, env=(("FTK_CACHE", "{tmp}/ro"),),
         read_only=("ro",)),
    Case("merge output_dir read-only", "merge-adapter", ("adapter_path={adapter}", "output_dir={tmp}/ro/merged"),
         "output_dir=", _read_only_folder, read_only=("ro",)),
    Case("evaluate from a read-only working folder", "evaluate", EVAL, "the run folder runs/ cannot be created",
         _read_only_folder, cwd="{tmp}/ro", read_only=("ro",), run_dir=False),
    Case("empty run dir", "pretrain", (*TINY, "hydra.run.dir="), "hydra.run.dir is empty", run_dir=False),
    Case("run dir full of other files", "pretrain", (*TINY, "hydra.run.dir={tmp}/mine"),
         "already holds files that are not an ftk run", _foreign_folder, run_dir=False),
    Case("again in the folder of a refused run", "pretrain", (*TINY, "train.seed=-1"), "train.seed=-1 is out of range",
         _left_by_a_refused_run),
    # --- item 15: paths ---------------------------------------------------------------------------------------
    Case("non-ASCII unquoted path", "pretrain", (*TINY, "data.path={tmp}/données/a.txt"),
         "cannot parse the value of data.path: quote it", _accented_corpus),
    Case("brackets in an unquoted path", "pretrain", (*TINY, "data.path={tmp}/x[1].txt"),
         "cannot parse the value of data.path: quote it"),
    # --- issue 18 item 9: preference pairs ------------------------------------------------------------------
    Case("preference file without chosen/rejected", "finetune",
         ("objective=dpo", "regime=lora", "model.name_or_path={model}", "data.path={labelled}", *TINY_FT),
         "has no 'chosen' column, so it holds no preference pairs"),
    Case("chosen identical to rejected in every pair", "finetune", PREF, "identical chosen and rejected",
         _pairs([{"prompt": "p", "chosen": " same", "rejected": " same"}] * 3)),
    Case("HH dialogues sharing no prompt", "finetune", PREF, "share a prompt", _pairs(HH_APART)),
    Case("prompt longer than the sequence", "finetune", PREF, "longer than train.seq_len=32",
         _pairs([{"prompt": "the " * 60, "chosen": " a", "rejected": " b"}] * 3)),
    Case("empty response", "finetune", PREF, "has an empty response",
         _pairs([{"prompt": "p", "chosen": "", "rejected": " b"}] * 3)),
    Case("reward model on data without pairs", "finetune",
         ("objective=reward", "regime=lora", "model.name_or_path={model}", "data.path={corpus}", *TINY_FT),
         "objective=reward needs them"),
    Case("dpo on an encoder-only model", "finetune",
         ("objective=dpo", "regime=lora", "model.name_or_path={tmp}/bert", "data.path={labelled}", *TINY_FT),
         "is an encoder (bert) and cannot be trained with objective=dpo", _tiny_bert),
    Case("sweep value with ../ (job folder stays inside)", "pretrain",
         ("-m", *TINY, "data.text_column=../../../../escaped", "train.seed=-1", "hydra.sweep.dir={tmp}/run/sweep"),
         "train.seed=-1 is out of range", run_dir=False),
    # --- ftk generate -------------------------------------------------------------------------------------------
    Case("generate without prompts", "generate", ("model.name_or_path={model}", "hardware=cpu"), "no prompts: pass"),
    Case("generate prompts file missing", "generate", ("model.name_or_path={model}", "prompts={tmp}/nope.jsonl"),
         "no such file"),
    Case("generate prompts not JSONL", "generate", ("model.name_or_path={model}", "prompts={tmp}/p.jsonl"),
         "line 2 is not JSON", _broken_prompts),
    Case("generate prompts without the field", "generate", ("model.name_or_path={model}",
                                                             "prompts={tmp}/fields.jsonl"),
         "has no 'prompt' text (fields: question)", _broken_prompts),
    Case("generate blank prompts file", "generate", ("model.name_or_path={model}", "prompts={tmp}/blank.txt"),
         "no prompts in it", _broken_prompts),
    Case("generate prompts fake gzip", "generate", ("model.name_or_path={model}", "prompts={tmp}/fake.txt.gz"),
         "cannot be read", _broken_prompts),
    Case("generate greedy with several samples", "generate", ("model.name_or_path={model}", "prompts=the old man",
                                                              "sampling.do_sample=false",
                                                              "sampling.samples_per_prompt=3"),
         "gives the same greedy text every time"),
    Case("generate past the positions", "generate", ("model.name_or_path={model}", "prompts=the old man",
                                                     "sampling.max_new_tokens=500"),
         "exceed the model's 128 positions"),
    Case("generate temperature=-1", "generate", ("model.name_or_path={model}", "prompts=a", "sampling.temperature=-1"),
         "sampling.temperature=-1.0 is out of range"),
    Case("generate temperature=0 with several samples", "generate", ("model.name_or_path={model}", "prompts=a",
                                                                     "sampling.temperature=0",
                                                                     "sampling.samples_per_prompt=2"),
         "with sampling.temperature=0 gives the same greedy text"),
    Case("generate score_with a language model", "generate", ("model.name_or_path={model}", "prompts=a",
                                                              "score_with={model}", "sampling.max_new_tokens=2"),
         "is not a classifier or reward model"),
    Case("generate score_label unknown", "generate", ("model.name_or_path={model}", "prompts=a",
                                                      "score_with={adapter}", "score_label=banana",
                                                      "sampling.max_new_tokens=2"),
         "score_label=banana is not a label of"),
    # --- issue 20: sharded and compressed corpora ----------------------------------------------------------
    Case("shard not the compression it claims", "pretrain", (*TINY, "data.path={tmp}/shards"),
         "shard-1.jsonl.gz is not gzip data", _fake_gzip_shard),
    Case("shard not zstd (prepare)", "prepare", (*TINY, "data.path={tmp}/shards"), "shard-1.jsonl.zst is not zstd data",
         _fake_zstd_shard),
    Case("glob matching nothing", "prepare", (*TINY, "data.path={tmp}/shards/*.parquet"), "no files match",
         _fake_gzip_shard),
    Case("only empty shards", "prepare", (*TINY, "data.path={tmp}/empties"), "the dataset is empty", _empty_shards),
]


def snapshot(root: Path, skip: Tuple[Path, ...] = ()) -> Dict[str, Tuple[int, int]]:
    """Every file and folder under root (but those under `skip`) with its size and modification time."""
    out: Dict[str, Tuple[int, int]] = {}
    skip = tuple(Path(os.path.abspath(s)) for s in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not any((here / d) == s for s in skip)]
        for name in dirnames + filenames:
            path = here / name
            try:
                st = path.lstat()
            except OSError:
                continue
            # a folder only by its presence: its mtime moves whenever the run folder is made inside it
            out[str(path.relative_to(root))] = (0, 0) if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def changed(before: Dict[str, Tuple[int, int]], after: Dict[str, Tuple[int, int]]) -> List[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def drop_privileges() -> List[str]:
    """A command prefix under which file permissions hold: root ignores a read-only folder unless it gives up
    CAP_DAC_OVERRIDE (setpriv keeps the same user, so the files it made stay readable)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("running as root without setpriv: read-only folders cannot be tested")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def make_read_only(case: Case, tmp: Path) -> None:
    for rel in case.read_only:
        os.chmod(tmp / rel, 0o555)


def restore_permissions(case: Case, tmp: Path) -> None:
    for rel in case.read_only:
        if (tmp / rel).exists():
            os.chmod(tmp / rel, 0o755)


def error_lines(command: str, output: str) -> List[str]:
    return [line for line in output.splitlines() if line.startswith(f"ftk {command}:")]
