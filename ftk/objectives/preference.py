"""Preference objectives on pairs of responses to one prompt: DPO (and IPO, conservative DPO), SimPO, ORPO, and
a Bradley-Terry reward model.

Batches come from `ftk.data.preferences.collate_pairs`: 2B sequences, the B chosen ones first, with `labels` on
the response tokens only. The target of each is the pair (`targets` = B), so every pair weighs the same across
micro-batches and ranks, and the logged figures (`metric_names`) are exact means over the pairs of a step.

The formulas follow the papers and TRL 1.16 (trl/trainer/dpo_trainer.py, cpo_trainer.py, reward_trainer.py),
against which tests/test_preference_trl.py checks them on a fixed batch:

* DPO: with Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)) over response tokens,
  loss = -(1-ε) log σ(βΔ) - ε log σ(-βΔ); ε = objective.label_smoothing is conservative DPO (cDPO; TRL 1.16 no
  longer has it as such). IPO: (Δ_c/|c| - Δ_r/|r| - 1/(2β))², log-ratios averaged per token as TRL does.
  Rewards are β times the log-ratios.
* SimPO (reference-free): loss = -log σ(β (avg log π(c) - avg log π(r)) - γ), averages per token; rewards are
  β times the averages.
* ORPO (reference-free): the SFT loss on the chosen response (mean per token, per pair) minus β log σ of the log
  odds ratio of chosen over rejected (per-token average log-probs).
* Reward model: a one-output sequence-classification head; loss = -log σ(r(c) - r(r) - margin).

The "KL" logged for DPO is the mean of the two responses' log-ratios log π/π_ref: a sampled estimate of
KL(π || π_ref) per sequence were the responses drawn from π; here they are the data's, so it is a measure of
how far the policy moved on them (it can be negative).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ftk.objectives.base import Objective

Sums = Dict[str, torch.Tensor]


def sequence_logps(model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' log-probabilities, number of response tokens) of each sequence, float32.

    Only the positions from the earliest response on get logits (transformers' `logits_to_keep`): prompts are
    often most of the tokens (HH: ~70%), and the output head over the vocabulary is the largest matmul of a
    small model; of those, only the response positions are upcast and normalised."""
    labels = inputs["labels"]
    if "attention_mask" in inputs:
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    has = labels != -100
    # the position that predicts the first response token of any row (responses start after their prompt)
    start = max(int(torch.where(has.any(0))[0][0]) - 1, 0) if bool(has.any()) else 0
    logits = _last_logits(model, inputs, labels.shape[1] - start)
    targets = labels[:, start + 1:]
    keep = targets != -100
    rows = keep.nonzero()[:, 0]
    token_logps = -F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
    sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), keep.sum(1).to(token_logps.dtype)


def _last_logits(model: Any, inputs: Dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """The logits of the last `keep` input positions (a soft prompt's virtual tokens come first, so they are
    never among them); a model that does not take `logits_to_keep` computes all and is sliced."""
    args = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
    try:
        logits = model(**args, logits_to_keep=keep).logits
    except TypeError:
        logits = model(**args).logits
    return logits[:, -keep:]


class Reference:
    """The reference policy's log-probabilities of a batch's responses (no gradient)."""

    def logps(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class AdapterOff(Reference):
    """The policy itself with its adapter switched off (peft's `disable_adapter()`): LoRA, QLoRA, prompt tuning.
    No second copy; read in eval mode (no dropout), as a reference must be."""

    def __init__(self, peft_model: Any):
        self.model = peft_model

    def logps(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return sequence_logps(self.model, inputs)[0]
        finally:
            self.model.train(was_training)


class FrozenCopy(Reference):
    """A frozen copy of the policy before training (full and partial-freezing regimes), held in 16 bits."""

    def __init__(self, model: Any):
        self.model = model.eval().requires_grad_(False)

    def logps(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(self.model, inputs)[0]


class PairObjective(Objective):
    """What every preference objective shares: pairs as targets, accuracy as `correct`, figures as sums."""

    metric_names: Tuple[str, ...] = ("accuracy", "margin", "rewards_chosen", "rewards_rejected")

    def inputs(self, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None
               ) -> Dict[str, torch.Tensor]:
        return batch  # padded already; nothing is drawn at random

    def targets(self, inputs: Dict[str, torch.Tensor]) -> int:
        return int(inputs["input_ids"].shape[0] // 2)

    def loss(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        loss_sum, count, _ = self.loss_with_metrics(model, inputs)
        return loss_sum, count

    def pair_losses(self, model: Any, inputs: Dict[str, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sums]:
        """(loss per pair, reward of chosen, reward of rejected, other figures per pair)."""
        raise NotImplementedError

    def loss_with_metrics(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Sums]:
        losses, chosen, rejected, extra = self.pair_losses(model, inputs)
        chosen, rejected = chosen.detach(), rejected.detach()
        figures = {"accuracy": (chosen > rejected).to(chosen.dtype), "margin": chosen - rejected,
                   "rewards_chosen": chosen, "rewards_rejected": rejected, **extra}
        sums = {name: figures[name].detach().sum() for name in self.metric_names}
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device), sums

    def eval_sums(self, model: Any, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        loss_sum, count, sums = self.loss_with_metrics(model, inputs)
        return {"loss_sum": loss_sum, "count": count.to(loss_sum.device, torch.float64),
                "correct": sums["accuracy"], **sums}


def _halves(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _smoothed(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1-ε) log σ(x) - ε log σ(-x): the preference label flipped with probability ε (cDPO)."""
    loss = -F.logsigmoid(logits)
    return loss if not smoothing else (1 - smoothing) * loss - smoothing * F.logsigmoid(-logits)


class DirectPreference(PairObjective):
    """DPO against a reference policy: `reference` is attached by the recipe (ftk.preference_setup), or the batch
    carries precomputed `reference_logps`."""

    name = "dpo"
    metric_names = PairObjective.metric_names + ("logps_chosen", "logps_rejected", "kl")

    def __init__(self, settings: Any = None, tokenizer: Any = None):
        super().__init__(settings, tokenizer)
        self.reference: Optional[Reference] = None

    def reference_logps(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_logps" in inputs:
            return inputs["reference_logps"].float()
        if self.reference is None:
            raise RuntimeError("objective=dpo has no reference: attach one (ftk.preference_setup.attach_reference)")
        return self.reference.logps(inputs).float()

    def pair_losses(self, model: Any, inputs: Dict[str, torch.Tensor]):
        s = self.settings
        logps, lengths = sequence_logps(model, inputs)
        ratios = logps - self.reference_logps(inputs).to(logps.device)
        chosen, rejected = _halves(ratios)
        if str(getattr(s.loss, "value", s.loss)) == "ipo":
            n_chosen, n_rejected = _halves(lengths.clamp(min=1))
            losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * s.beta)) ** 2
        else:
            losses = _smoothed(s.beta * (chosen - rejected), s.label_smoothing)
        logps_chosen, logps_rejected = _halves(logps.detach())
        extra = {"logps_chosen": logps_chosen, "logps_rejected": logps_rejected,
                 "kl": (chosen.detach() + rejected.detach()) / 2}
        return losses, s.beta * chosen, s.beta * rejected, extra


class SimplePreference(PairObjective):
    """SimPO: reference-free, length-normalised, with a target reward margin gamma."""

    name = "simpo"

    def pair_losses(self, model: Any, inputs: Dict[str, torch.Tensor]):
        s = self.settings
        logps, lengths = sequence_logps(model, inputs)
        chosen, rejected = _halves(logps / lengths.clamp(min=1))
        losses = _smoothed(s.beta * (chosen - rejected) - s.gamma, s.label_smoothing)
        return losses, s.beta * chosen, s.beta * rejected, {}


class OddsRatioPreference(PairObjective):
    """ORPO: the SFT loss on the chosen response plus an odds-ratio term; reference-free."""

    name = "orpo"
    metric_names = PairObjective.metric_names + ("nll", "log_odds")

    def pair_losses(self, model: Any, inputs: Dict[str, torch.Tensor]):
        s = self.settings
        logps, lengths = sequence_logps(model, inputs)
        chosen, rejected = _halves(logps / lengths.clamp(min=1))
        # log(p / (1 - p)) with p the per-token average probability; log1p(-exp(x)) for x < 0 is stable
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        nll = -chosen
        losses = nll - s.beta * F.logsigmoid(log_odds)
        return losses, s.beta * chosen, s.beta * rejected, {"nll": nll.detach(), "log_odds": log_odds.detach()}


class RewardModel(PairObjective):
    """A Bradley-Terry reward model: one score per sequence from a sequence-classification head."""

    name = "reward"

    def pair_losses(self, model: Any, inputs: Dict[str, torch.Tensor]):
        scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0].float()
        chosen, rejected = _halves(scores)
        margin = inputs["margin"].to(chosen.device) if "margin" in inputs else torch.zeros_like(chosen)
        losses = -F.logsigmoid(chosen - rejected - margin)
        return losses, chosen, rejected, {}
