"""`ftk merge-adapter`: merge a LoRA (or QLoRA) adapter into its base; write a standalone Hugging Face model.

Lifecycle: compose + validate -> which adapter, base, output -> refusals (not an adapter, prompt tuning,
output not empty, wrong base) -> base + adapter (full precision) -> probe logits -> merge_and_unload ->
probe logits of the merged model in the requested dtype -> refuse if they differ by more than the
tolerance -> write to a temp dir next to output_dir, rename -> merge.json and the summary table.
The logic is in ftk/merge.py.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ftk import runs, schemas
from ftk.errors import reported

SCHEMA = schemas.MergeConfig
schemas.register_merge()


@hydra.main(version_base=None, config_path="pkg://ftk.configs", config_name="merge-adapter")
@reported
def main(cfg: DictConfig) -> None:
    from ftk import merge

    try:
        merge.merge_adapter(cfg)
    finally:
        runs.drop_empty_run_dir()
