"""`ftk evaluate eval=preference`: how often a model prefers the chosen response of held-out pairs.

* A DPO-family policy (objective dpo, simpo, orpo, or any causal LM given with a reference): its implicit reward
  beta * (log π(y|x) - log π_ref(y|x)) over the response tokens, against its reference: the same model with its
  adapter switched off (an adapter run), `eval.reference` when given, or else the base it was fine-tuned from.
* A reward model (objective=reward: a one-output sequence-classification head): its score of each sequence.

Pair accuracy (chosen scored above rejected) and mean margin, printed beside two baselines on the same pairs:
"the longer response wins" (ties count a half) and the reference model's own log-likelihood preference
(log π_ref(chosen) > log π_ref(rejected)). Pairs are read and cut exactly as `ftk finetune` reads them
(ftk.data.preferences), with the run's sequence length.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch

from ftk.errors import UsageError

PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo", "reward")


def scores(score: Callable[[Dict[str, torch.Tensor]], torch.Tensor], pairs: List[Any], batch_size: int,
           pad_id: int, padding_side: str, device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(score of each chosen sequence, score of each rejected one), float64 on the CPU."""
    from ftk.data.preferences import collate_pairs

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size], pad_id, padding_side)
            batch = {k: v.to(device) for k, v in batch.items()}
            values = score(batch).double().cpu()
            n = values.shape[0] // 2
            chosen.append(values[:n])
            rejected.append(values[n:])
    return torch.cat(chosen), torch.cat(rejected)


def agreement(chosen: torch.Tensor, rejected: torch.Tensor) -> Dict[str, float]:
    """Pair accuracy and mean margin of scores; ties count a half (no preference either way)."""
    wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return {"accuracy": wins.mean().item(), "margin": (chosen - rejected).mean().item()}


def longer_wins(pairs: List[Any]) -> float:
    return agreement(torch.tensor([float(len(p.chosen)) for p in pairs]),
                     torch.tensor([float(len(p.rejected)) for p in pairs]))["accuracy"]


def evaluate(cfg: Any, target: Any, device: str, say: Callable[[str], None]) -> Dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftk.data.preferences import load_pairs
    from ftk.evaluation import loading
    from ftk.finetune_setup import is_encoder
    from ftk.objectives.preference import AdapterOff, sequence_logps

    d, e, record = cfg.data, cfg.eval, target.record
    path = d.validation_path or d.path
    if not path:
        raise UsageError("eval=preference needs held-out pairs: pass data.path=<.jsonl(.gz) of prompt/chosen/"
                         "rejected records or HH dialogues>")
    config = AutoConfig.from_pretrained(target.model_path, trust_remote_code=cfg.model.trust_remote_code)
    reward_model = record.get("objective") == "reward" or (
        not record and target.objective == "classification" and getattr(config, "num_labels", 0) == 1)
    tokenizer = loading._tokenizer(target.adapter_path or target.model_path, cfg)
    from ftk.models import usable_positions

    positions = usable_positions(config) or 1024
    seq_len = min(record.get("seq_len") or 512, positions)
    end_with_eos = bool(record.get("append_eos")) if reward_model else not is_encoder(config)
    pairs, stats = load_pairs(path, tokenizer, seq_len, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                              rejected_column=d.rejected_column, end_with_eos=end_with_eos,
                              hub_config=d.hub_config, split=d.validation_split or d.split,
                              purpose="eval=preference")
    if e.max_examples:
        pairs = pairs[: e.max_examples]
    pad, side = tokenizer.pad_token_id, record.get("padding_side", "right")
    batch = e.batch_size

    def run(score):
        return scores(score, pairs, batch, pad, side, device)

    out: Dict[str, Any] = {"data": path, "pairs": len(pairs), "seq_len": seq_len, "data_stats": stats,
                           "longer_wins": longer_wins(pairs)}
    reference_model = None
    if reward_model:
        model, _ = loading.classifier(target, cfg)
        model.to(device)
        c, r = run(lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0])
        out.update(kind="reward model", **agreement(c, r))
        reference_path = e.reference or (record.get("base_model") if not is_encoder(config) else None)
    else:
        if is_encoder(config):
            raise UsageError(f"{target.model_path} is an encoder ({config.model_type}): eval=preference scores a "
                             "causal LM policy or a reward model (objective=reward)")
        model, _ = loading.language_model(target, cfg)
        model.to(device)
        beta = e.beta if e.beta is not None else (record.get("objective_settings") or {}).get("beta", 0.1)
        policy = run(lambda b: sequence_logps(model, b)[0])
        if target.adapter_path and not e.reference:
            reference_logps = run(AdapterOff(model).logps)
            out["reference"] = f"{target.model_path} (the adapter switched off)"
        else:
            reference_path = e.reference or record.get("base_model")
            if not reference_path:
                raise UsageError(f"{target.model_path} does not say what it was tuned from: pass "
                                 "eval.reference=<the model before preference tuning> to score implicit rewards")
            reference_model = _causal_lm(reference_path, cfg, AutoModelForCausalLM, device)
            reference_logps = run(lambda b: sequence_logps(reference_model, b)[0])
            out["reference"] = reference_path
        c = beta * (policy[0] - reference_logps[0])
        r = beta * (policy[1] - reference_logps[1])
        out.update(kind="policy (implicit reward)", beta=beta, **agreement(c, r))
        out["reference_likelihood_wins"] = agreement(*reference_logps)["accuracy"]
        reference_path = None
    if reward_model and reference_path:
        reference_model = _causal_lm(reference_path, cfg, AutoModelForCausalLM, device)
        out["reference"] = reference_path
        out["reference_likelihood_wins"] = agreement(*run(lambda b: sequence_logps(reference_model, b)[0]))[
            "accuracy"]
    say(f"preference on {path}: {out['kind']}: pair accuracy {out['accuracy']:.2%}, mean margin {out['margin']:.4f} "
        f"({len(pairs):,} pairs); baselines: longer response wins {out['longer_wins']:.2%}"
        + (f", reference log-likelihood {out['reference_likelihood_wins']:.2%}" if "reference_likelihood_wins" in out
           else ""))
    return out


def _causal_lm(path: str, cfg: Any, cls: Any, device: str) -> Any:
    from ftk.errors import first_line
    from ftk.models import check_model_path

    check_model_path(path)
    try:
        return cls.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the reference model '{path}': {first_line(exc)}") from None
