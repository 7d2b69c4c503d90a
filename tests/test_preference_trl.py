"""ftk's preference losses against an independent implementation: TRL 1.16 (a test extra).

On one fixed batch built by TRL's own trainers (its tokenization, padding and completion mask) and one tiny model,
ftk's DPO, IPO and reward-model losses equal TRL's within 1e-5, and so do the logged rewards, accuracy, margin
and log-probabilities. The policy's weights are moved away from the reference first, so the rewards are not
trivially zero.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")

from omegaconf import OmegaConf  # noqa: E402

from ftk.objectives.preference import DirectPreference, FrozenCopy, RewardModel, SimplePreference  # noqa: E402
from ftk.objectives.table import settings_of  # noqa: E402

PAIRS = [{"prompt": "Say as twice.", "chosen": " as as", "rejected": " any as any"},
         {"prompt": "Repeat the old man.", "chosen": " the old man", "rejected": " man"},
         {"prompt": "Name a colour.", "chosen": " blue", "rejected": " the sea was very wet today"},
         {"prompt": "Count to three.", "chosen": " one two three", "rejected": " three"}]
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(pretrained):
    from transformers import AutoTokenizer

    return pretrained["gpt"], AutoTokenizer.from_pretrained(pretrained["gpt"])


def _nudged(model, seed=0, scale=0.05):
    """The same model with every weight moved a little: a policy some way from its reference."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 else 1.0))
    return model


def _settings(name, **values):
    s = settings_of(name)
    for k, v in values.items():
        OmegaConf.update(s, k, v)
    return s


def _trl_dpo(path, tok, tmp_path, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path)
    policy = _nudged(copy.deepcopy(reference))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                         use_cpu=True, max_steps=1, save_strategy="no", bf16=False, **config)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    return policy, reference, loss.item(), metrics, ours


def _ftk_pairs(objective, model, inputs):
    loss_sum, count, sums = objective.loss_with_metrics(model, inputs)
    return loss_sum.item() / count.item(), {k: v.item() / count.item() for k, v in sums.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(tiny, tmp_path, loss_type):
    path, tok = tiny
    policy, reference, trl_loss, trl_metrics, inputs = _trl_dpo(path, tok, tmp_path, beta=0.2, loss_type=[loss_type])
    objective = DirectPreference(_settings("dpo", beta=0.2, loss=loss_type), tok)
    objective.reference = FrozenCopy(reference)
    loss, figures = _ftk_pairs(objective, policy, inputs)
    assert trl_metrics["rewards/margins"] != 0.0  # the policy is not the reference: a real comparison
    assert math.isclose(loss, trl_loss, abs_tol=TOL), (loss, trl_loss)
    for ours, theirs in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("accuracy", "rewards/accuracies"), ("margin", "rewards/margins"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        assert math.isclose(figures[ours], trl_metrics[theirs], abs_tol=TOL * max(1.0, abs(trl_metrics[theirs]))), \
            (ours, figures[ours], trl_metrics[theirs])


def test_ftk_pairs_tokenize_as_trl(tiny, tmp_path):
    """The same records through ftk's loader give TRL's token ids and completion mask."""
    import json

    from ftk.data.preferences import collate_pairs, load_pairs

    path, tok = tiny
    _, _, _, _, inputs = _trl_dpo(path, tok, tmp_path, beta=0.1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    pairs, _ = load_pairs(str(data), tok, 128)
    ours = collate_pairs(pairs, tok.pad_token_id)

    def rows(batch):  # (real tokens, response tokens) of each sequence; TRL's loader shuffles the pairs
        return sorted((tuple(ids[mask.bool()].tolist()), tuple(labels[labels != -100].tolist()))
                      for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]))

    assert rows(ours) == rows(inputs)


def test_conservative_dpo_is_the_smoothed_sigmoid(tiny, tmp_path):
    """cDPO (label_smoothing) is no longer a TRL loss type: checked against its formula on TRL's log-ratios."""
    path, tok = tiny
    policy, reference, _, trl_metrics, inputs = _trl_dpo(path, tok, tmp_path, beta=0.2)
    objective = DirectPreference(_settings("dpo", beta=0.2, label_smoothing=0.1), tok)
    objective.reference = FrozenCopy(reference)
    loss, figures = _ftk_pairs(objective, policy, inputs)
    chosen_r, rejected_r = trl_metrics["rewards/chosen"], trl_metrics["rewards/rejected"]
    assert math.isclose(figures["margin"], chosen_r - rejected_r, abs_tol=TOL)
    # per pair: -(0.9) log σ(m) - 0.1 log σ(-m); recomputed from ftk's own per-pair margins
    with torch.no_grad():
        from ftk.objectives.preference import sequence_logps

        logps = sequence_logps(policy, inputs)[0] - sequence_logps(reference, inputs)[0]
        n = logps.shape[0] // 2
        m = 0.2 * (logps[:n] - logps[n:])
        expected = (-0.9 * torch.nn.functional.logsigmoid(m) - 0.1 * torch.nn.functional.logsigmoid(-m)).mean()
    assert math.isclose(loss, expected.item(), abs_tol=TOL)


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_model_equals_trl(tiny, tmp_path, with_margin):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    path, tok = tiny
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=tok.pad_token_id)
    records = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS]
    if with_margin:
        for i, r in enumerate(records):
            r["margin"] = 0.25 * i
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                            use_cpu=True, max_steps=1, save_strategy="no", bf16=False)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                                processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, figures = _ftk_pairs(RewardModel(_settings("reward"), tok), model, dict(batch))
    assert math.isclose(loss, trl_loss, abs_tol=TOL), (loss, trl_loss)
    assert math.isclose(figures["accuracy"], trl_metrics["accuracy"], abs_tol=TOL)
    assert math.isclose(figures["margin"], trl_metrics["margin"], abs_tol=TOL)
    assert ("margin" in batch) == with_margin


def test_simpo_formula(tiny):
    """SimPO: -log σ(β (avg log π(c) - avg log π(r)) - γ), by hand from the per-token log-probabilities."""
    import json  # noqa: F401
    from transformers import AutoModelForCausalLM

    from ftk.data.preferences import Pair, collate_pairs

    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [Pair(enc(p["prompt"]), enc(p["chosen"]) + [tok.eos_token_id], enc(p["rejected"]) + [tok.eos_token_id])
             for p in PAIRS]
    inputs = collate_pairs(pairs, tok.pad_token_id)
    loss, figures = _ftk_pairs(SimplePreference(_settings("simpo", beta=2.0, gamma=0.5), tok), model, inputs)
    with torch.no_grad():
        expected, margins = [], []
        for p in pairs:
            avg = []
            for response in (p.chosen, p.rejected):
                ids = torch.tensor([p.prompt + response])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                picked = logp[torch.arange(len(p.prompt) - 1, ids.shape[1] - 1), torch.tensor(response)]
                avg.append(picked.mean())
            margins.append(2.0 * (avg[0] - avg[1]))
            expected.append(-torch.nn.functional.logsigmoid(2.0 * (avg[0] - avg[1]) - 0.5))
    assert math.isclose(loss, torch.stack(expected).mean().item(), abs_tol=TOL)
    assert math.isclose(figures["margin"], torch.stack(margins).mean().item(), abs_tol=TOL)
