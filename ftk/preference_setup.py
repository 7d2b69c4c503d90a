"""The steps of `ftk finetune` that preference objectives add: their pairs, and the reference policy.

The reference is the model before training, chosen by the regime's facts (ftk/regimes/table.py), not by its name:

* a regime that trains an adapter (LoRA, QLoRA, DoRA, IA3, prompt tuning): the policy itself with the adapter
  switched off (peft's `disable_adapter()`), no second copy;
* any other (full, freeze_layers, ...): a frozen copy held in 16 bits (fp16 under fp16 precision, else bf16);
* `objective.reference=precomputed`: the reference's log-probabilities of every pair, computed in one pass
  before training and cached beside the tokenized data, keyed by the base's weights (its fingerprint) and the
  pairs' token ids, so a different base or other data never reuses them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, List

import numpy as np

from ftk.errors import UsageError

Say = Callable[[str], None]


def preference_data(cfg: Any, objective: Any, tokenizer: Any, config: Any, say: Say, padding_side: str = "right"):
    from ftk.data.preferences import PairSource, dropped_note, load_pairs
    from ftk.finetune_setup import TaskData, is_encoder
    from ftk.objectives.table import facts

    d = cfg.data
    row = facts(objective)
    if d.path is None:
        raise UsageError(f"objective={row.name} needs preference pairs: pass data.path=<.jsonl(.gz) of prompt/chosen/"
                         "rejected records, or Anthropic-HH chosen/rejected dialogues>")
    scores = row.head == "sequence_classification"
    # A decoder ends each response with EOS (it learns to stop, and a reward head reads the score there), unless
    # EOS is also the padding, which a decoder classifier would skip looking for the last real token.
    end_with_eos = not is_encoder(config) and tokenizer.eos_token_id is not None and not (
        scores and tokenizer.pad_token_id == tokenizer.eos_token_id)
    columns = dict(prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                   rejected_column=d.rejected_column, margin_column=d.margin_column, end_with_eos=end_with_eos,
                   hub_config=d.hub_config, purpose=f"objective={row.name}")
    from ftk.finetune_setup import train_and_validation

    train, validation, stats = train_and_validation(
        lambda path, split: load_pairs(path, tokenizer, cfg.train.seq_len, split=split, **columns), d, cfg.train.seed)
    if not train:
        raise UsageError(f"{d.path}: {stats['pairs']} pair(s) leave none for training once "
                         f"{len(validation)} are held out for validation; give more pairs or data.validation_path")
    say(f"data: {d.path}: {len(train):,} training / {len(validation):,} validation preference pairs "
        f"({stats['template']} layout)" + dropped_note(stats))
    return TaskData(PairSource(train, validation, tokenizer.pad_token_id, padding_side), d.path,
                    labels=["reward"] if scores else [], n_train=len(train), n_validation=len(validation),
                    append_eos=end_with_eos and scores, stats=stats)


def reference_strategy(objective_settings: Any, regime: Any) -> str:
    """"none" (reference-free objectives), "precomputed", "adapter_off" or "frozen_copy" (16-bit)."""
    from ftk.objectives.table import facts

    if not facts(objective_settings.name).reference:
        return "none"
    if str(getattr(objective_settings.reference, "value", objective_settings.reference)) == "precomputed":
        return "precomputed"
    return "adapter_off" if regime.adapter is not None else "frozen_copy"


def attach_reference(objective: Any, cfg: Any, regime: Any, model: Any, base: str, base_config: Any,
                     data: Any, session: Any, base_fingerprint: Any, say: Say) -> str:
    """Give `objective` its reference (or the pairs their precomputed log-probabilities); returns the strategy."""
    import torch

    from ftk.objectives.preference import AdapterOff, FrozenCopy

    strategy = reference_strategy(cfg.objective, regime)
    device = session.accelerator.device
    if strategy == "adapter_off":
        objective.reference = AdapterOff(model)
        say("reference: the policy with its adapter switched off (no second copy)")
    elif strategy == "frozen_copy":
        dtype = torch.float16 if session.plan.precision == "fp16" else torch.bfloat16
        if cfg.model.random_init:  # the randomly initialised weights, not the checkpoint's
            import copy

            copy_ = copy.deepcopy(model).to(dtype)
        else:
            from ftk.finetune_setup import load_base_lm

            copy_ = load_base_lm(base, base_config, cfg.model.trust_remote_code, dtype)
        from ftk.hardware import use_fused_kernels

        use_fused_kernels(copy_)  # the same kernels as the policy (ftk.train.run applies them to it)
        if session.plan.matmul_attention:
            from ftk.cpu_attention import use_matmul_attention

            use_matmul_attention(copy_)
        objective.reference = FrozenCopy(copy_.to(device))
        say(f"reference: a frozen copy of the base in {str(dtype).replace('torch.', '')}")
    elif strategy == "precomputed":
        _precompute(cfg, regime, model, data, session, base_fingerprint, say)
    return strategy


def _pairs_key(pairs: List[Any], base_fingerprint: Any, seq_len: int, what: str) -> str:
    digest = hashlib.sha256(f"{base_fingerprint}|{seq_len}|{what}".encode())
    for p in pairs:
        digest.update(np.asarray(p.prompt + [-1] + p.chosen + [-2] + p.rejected + [-3], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def _precompute(cfg: Any, regime: Any, model: Any, data: Any, session: Any, base_fingerprint: Any, say: Say) -> None:
    """Reference log-probabilities of every training and validation pair, computed once and cached."""
    import torch

    from ftk.data import lm
    from ftk.data.preferences import collate_pairs
    from ftk.objectives.preference import AdapterOff, sequence_logps

    if base_fingerprint is None:
        raise UsageError("objective.reference=precomputed caches by the base's weights, and model.random_init=true "
                         "has no checkpoint to name them by; use objective.reference=auto")
    source = data.source
    accelerator = session.accelerator
    key = _pairs_key(source.train + source.validation, base_fingerprint, cfg.train.seq_len,
                     f"{regime.name}|{session.plan.precision}")
    path = lm.cache_root(cfg.data.cache_dir) / "reference-logps" / f"{key}.pt"
    with accelerator.main_process_first():  # the first process computes and writes, the others read
        if path.exists():
            values = torch.load(path, weights_only=True)
            say(f"reference: precomputed log-probabilities read from {path}")
        else:
            model.to(accelerator.device)
            if regime.adapter is not None:
                reference = AdapterOff(model)
            else:
                reference = None  # the policy before its first step is the reference: read it without dropout
            pairs = source.train + source.validation
            out = []
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), accelerator.autocast():
                    size = session.plan.micro_batch_size
                    for start in range(0, len(pairs), size):
                        batch = collate_pairs(pairs[start:start + size], source.pad_id, source.padding_side)
                        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                        logps = reference.logps(batch) if reference else sequence_logps(model, batch)[0]
                        out.append(logps.double().view(2, -1).T.cpu())
            finally:
                model.train(was_training)
            values = torch.cat(out)
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(values, tmp)
                tmp.replace(path)
            say(f"reference: log-probabilities of {len(pairs):,} pairs precomputed and cached in {path}")
    for pair, (chosen, rejected) in zip(source.train + source.validation, values.tolist()):
        pair.reference = (chosen, rejected)
