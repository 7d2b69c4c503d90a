"""`ftk prepare`: the data preparation of `ftk pretrain`, alone: list the corpus, train (or load) the tokenizer,
tokenize and pack into the token cache, print what was made. A pretrain run with the same model/tokenizer, data
and train.seq_len then finds the cache and starts at once.

Lifecycle: compose (pretrain's groups) -> validate -> corpus -> tokenizer -> ftk.data.prepare -> summary table.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ftk import runs, schemas
from ftk.errors import reported

SCHEMA = schemas.PretrainConfig
schemas.register()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="prepare")
@reported
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    finally:
        runs.drop_empty_run_dir()


def prepare(cfg: DictConfig):
    schemas.validate(cfg)
    from ftk.paths import require_writable_cache

    require_writable_cache(cfg.data.cache_dir)
    from ftk import lm_setup

    lm_setup.check_pretrained(cfg)
    say = lm_setup.first_rank_say()
    corpus = lm_setup.load_text(cfg, say)
    tokenizer, tokenizer_fp = lm_setup.tokenizer_for(cfg, corpus, None, say)
    prepared = lm_setup.pack(cfg, corpus, tokenizer, tokenizer_fp, say)
    _print_summary(prepared, cfg.train.seq_len)
    return prepared


def _print_summary(prepared, seq_len: int) -> None:
    st = prepared.stats
    rows = [
        ("documents", f"{st.documents:,} ({st.train_documents:,} training, {st.validation_documents:,} validation, "
                      f"{st.validation})"),
        ("tokens", f"{st.tokens:,}"),
        ("blocks", f"{st.train_blocks:,} training + {st.validation_blocks:,} validation x {seq_len} tokens"),
        ("input bytes", f"{st.input_bytes:,}"),
        ("cache bytes", f"{st.cache_bytes:,}"),
        ("tokens/s", f"{st.tokens_per_s:,.0f} with {st.num_proc} process(es), {st.seconds:.1f}s"
                     + (" (when prepared; this time from cache)" if prepared.packed.cache_hit else "")),
        ("empty shards skipped", f"{len(st.empty_shards)}" + (f": {', '.join(st.empty_shards[:3])}"
                                                              + (", ..." if len(st.empty_shards) > 3 else "")
                                                              if st.empty_shards else "")),
        ("cache", str(prepared.folder)),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:  # plain lines: whole paths, greppable in a batch log
        print(f"{key:<{width}}  {value}")
