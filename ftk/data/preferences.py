"""Preference pairs (DPO, SimPO, ORPO, reward models): a prompt, a chosen and a rejected response, as token ids.

Records come in the formats people have:

* `{prompt, chosen, rejected}` with strings: used as they are (a `chosen` that repeats the prompt is cut
  after it). With chat message lists (`[{"role": ..., "content": ...}]`): rendered with the tokenizer's chat
  template when it has one (the prompt with the generation prompt, each response as what the full rendering
  adds after it), else written as an Anthropic-HH dialogue.
* `{chosen, rejected}` only, each a whole dialogue sharing a prefix: Anthropic HH's text
  ("\\n\\nHuman: ...\\n\\nAssistant: ...") or message lists. The prompt is everything up to the last assistant
  turn the two dialogues share (text: up to and including the last "\\n\\nAssistant:" of their common prefix;
  messages: their common leading messages); the rest of each is its response. Records whose dialogues share
  no such prompt are dropped and counted (the real HH test split has 9 of 2,354), refused when all are.

Each pair becomes prompt ids + response ids (EOS ends a decoder's response, as in SFT; an encoder's closing
[SEP] ends it). When prompt and the longer response do not fit `seq_len`, the prompt is cut from the left
(keeping its end, the turn being answered) to at most half the sequence or what the longer response leaves,
and the responses from the right; a prompt longer than the whole sequence drops its pair. Pairs whose chosen
and rejected are identical (as text, or once cut) carry no preference, and pairs with an empty response none
to learn (the real HH test split has 2 and 4): both are dropped and counted, refused when all pairs are.
All of it is counted in the stats and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ftk.data.instructions import CHAT, _parts, encode_all, template_mode
from ftk.errors import UsageError

ASSISTANT = "\n\nAssistant:"  # Anthropic HH's turn markers
HUMAN = "\n\nHuman:"


@dataclass
class Pair:
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]
    margin: float = 0.0                       # reward models: how much better chosen is (data.margin_column)
    reference: Optional[Tuple[float, float]] = None  # precomputed reference log-probs (chosen, rejected)

    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


# ------------------------------------------------------------------------------------------ texts of a record


def _hh_text(messages: Sequence[Dict[str, str]]) -> str:
    """Messages written as an Anthropic-HH dialogue (the layout without a chat template)."""
    out = []
    for m in messages:
        role = m.get("role")
        if role == "system":
            out.append(m["content"])
        else:
            out.append(f"{HUMAN if role == 'user' else ASSISTANT} {m['content']}")
    return "".join(out)


def _render(tokenizer: Any, messages: List[Dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _messages_texts(tokenizer: Any, chat: bool, prompt: List[Dict[str, str]], response: List[Dict[str, str]]
                    ) -> Tuple[str, str]:
    """(prompt text, response text) of a conversation split into prompt messages and response messages."""
    if chat:
        head = _render(tokenizer, prompt, True)
        full = _render(tokenizer, prompt + response, False)
        if full.startswith(head):
            return head, full[len(head):]
        # A template that renders the generation prompt differently: cut at the response's first content.
        at = full.rfind(response[0]["content"])
        if at > 0:
            return full[:at], full[at:]
    return _hh_text(prompt) + ASSISTANT, _hh_text(response)[len(ASSISTANT):]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def _check_messages(value: Any, column: str, where: str) -> List[Dict[str, str]]:
    if not _is_messages(value):
        raise UsageError(f"{where}: '{column}' must be text or a list of chat messages "
                         f"({{\"role\": ..., \"content\": ...}}), not {json.dumps(value, default=str)[:60]}")
    return [{"role": str(m.get("role", "user")), "content": str(m["content"] or "")} for m in value]


def _shared_prompt_text(chosen: str, rejected: str) -> Optional[str]:
    """HH dialogues: their common prefix up to and including its last assistant marker (None: no shared turn)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    at = chosen.rfind(ASSISTANT, 0, n)
    return chosen[:at + len(ASSISTANT)] if at >= 0 else None


def record_texts(tokenizer: Any, chat: bool, prompt: Any, chosen: Any, rejected: Any, where: str,
                 columns: Tuple[str, str, str]) -> Optional[Tuple[str, str, str]]:
    """(prompt, chosen, rejected) texts of one record; None when its two dialogues share no prompt."""
    p_col, c_col, r_col = columns
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen = _check_messages(chosen, c_col, where)
        rejected = _check_messages(rejected, r_col, where)
        if prompt is None:  # whole conversations: the prompt is their common leading messages
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                return None
            head, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                _check_messages(prompt, p_col, where)
        p_text, c_text = _messages_texts(tokenizer, chat, head, chosen)
        _, r_text = _messages_texts(tokenizer, chat, head, rejected)
        if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
            c_text = r_text = ""  # an empty response: refused below, naming the record
        return p_text, c_text, r_text
    for value, column in ((chosen, c_col), (rejected, r_col), (prompt, p_col)):
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{where}: '{column}' must be text or a list of chat messages, not "
                             f"{type(value).__name__} ({json.dumps(value, default=str)[:60]})")
    if chosen is None or rejected is None:
        return prompt or "", chosen or "", rejected or ""
    if prompt is None:  # HH: whole dialogues
        head = _shared_prompt_text(chosen, rejected)
        if head is None:
            return None
        return head, chosen[len(head):], rejected[len(head):]
    if chosen.startswith(prompt) and rejected.startswith(prompt) and prompt:  # responses that repeat the prompt
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    return prompt, chosen, rejected


# ------------------------------------------------------------------------------------------ token ids


def special_frame(tokenizer: Any) -> Tuple[List[int], List[int]]:
    """The special tokens the tokenizer puts before and after a text (GPT-2: none; Llama: BOS; BERT: CLS, SEP)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def fit(prompt: List[int], chosen: List[int], rejected: List[int], seq_len: int
        ) -> Optional[Tuple[List[int], List[int], List[int], bool]]:
    """(prompt, chosen, rejected, whether cut) within seq_len; None when the prompt alone is longer."""
    if len(prompt) >= seq_len:
        return None
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= seq_len:
        return prompt, chosen, rejected, False
    keep = min(len(prompt), max(seq_len - longest, seq_len // 2))
    prompt = prompt[len(prompt) - keep:]
    room = seq_len - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def load_pairs(path: str, tokenizer: Any, seq_len: int, *, prompt_column: str = "prompt",
               chosen_column: str = "chosen", rejected_column: str = "rejected",
               margin_column: Optional[str] = None, end_with_eos: bool = True, hub_config: Optional[str] = None,
               split: str = "train", purpose: str = "preference tuning") -> Tuple[List[Pair], Dict[str, Any]]:
    """The preference pairs at `path` (file, folder, .gz, hub name), at most `seq_len` tokens per sequence.

    `end_with_eos`: a decoder's responses end with EOS (it learns to stop; a decoder reward model reads its
    score there). Returns (pairs, stats)."""
    chat = template_mode(tokenizer) == CHAT
    lead, trail = special_frame(tokenizer)
    eos = tokenizer.eos_token_id if end_with_eos else None
    parts = _parts(path, hub_config, split)
    stats: Dict[str, Any] = {"records": 0, "pairs": 0, "template": "chat" if chat else "plain",
                             "dropped_identical": 0, "dropped_empty": 0, "dropped_no_shared_prompt": 0, "dropped_long_prompt": 0,
                             "truncated": 0}
    if sum(p.ds.num_rows for p in parts) == 0:
        raise UsageError(f"{path} holds no records: {purpose} needs preference pairs "
                         f"({chosen_column}/{rejected_column} records)")
    texts: List[Tuple[str, str, str]] = []
    margins: List[float] = []
    for part in parts:
        if part.ds.num_rows == 0:
            continue
        columns = part.ds.column_names
        missing = [c for c in (chosen_column, rejected_column) if c not in columns]
        if missing:
            raise UsageError(f"{part.name} has no '{missing[0]}' column, so it holds no preference pairs ({purpose} "
                             f"needs them); its columns are {', '.join(columns)}: pass data.chosen_column=... "
                             f"data.rejected_column=... or a file of prompt/chosen/rejected records")
        if margin_column and margin_column not in columns:
            raise UsageError(f"{part.name} has no margin column '{margin_column}'; its columns are "
                             f"{', '.join(columns)}: pass data.margin_column=<one of them> or null")
        prompts = part.ds[prompt_column] if prompt_column in columns else [None] * part.ds.num_rows
        margin_values = part.ds[margin_column] if margin_column else [0.0] * part.ds.num_rows
        for row, (prompt, chosen, rejected, margin) in enumerate(
                zip(prompts, part.ds[chosen_column], part.ds[rejected_column], margin_values)):
            stats["records"] += 1
            where = part.where(row)
            got = record_texts(tokenizer, chat, prompt, chosen, rejected, where,
                               (prompt_column, chosen_column, rejected_column))
            if got is None:
                stats["dropped_no_shared_prompt"] += 1
                continue
            if not got[1].strip() or not got[2].strip():
                stats["dropped_empty"] += 1
                stats.setdefault("first_empty", where)
                continue
            if got[1] == got[2]:
                stats["dropped_identical"] += 1
                continue
            try:
                margins.append(float(margin))
            except (TypeError, ValueError):
                raise UsageError(f"{where}: '{margin_column}' must be a number, not {margin!r}") from None
            texts.append(got)

    pairs: List[Pair] = []
    encoded = [encode_all(tokenizer, [t[i] for t in texts]) for i in range(3)]
    for (p_ids, c_ids, r_ids), margin in zip(zip(*encoded), margins):
        p_ids = lead + p_ids
        c_ids, r_ids = _close(c_ids, trail, eos, chat), _close(r_ids, trail, eos, chat)
        fitted = fit(p_ids, c_ids, r_ids, seq_len)
        if fitted is None:
            stats["dropped_long_prompt"] += 1
            continue
        p_ids, c_ids, r_ids, cut = fitted
        if c_ids == r_ids:  # the responses differed only past the cut
            stats["dropped_identical"] += 1
            continue
        stats["truncated"] += int(cut)
        pairs.append(Pair(p_ids, c_ids, r_ids, margin))
    if not pairs:
        raise UsageError(_nothing_left(path, stats, seq_len))
    stats["pairs"] = len(pairs)
    return pairs, stats


def _close(ids: List[int], trail: List[int], eos: Optional[int], chat: bool) -> List[int]:
    """A response's end: the tokenizer's closing specials, then EOS for a decoder (a chat template that ends the
    turn with EOS ends it there)."""
    ids = ids + trail
    if eos is None:
        return ids
    if chat and eos in ids:
        return ids[:len(ids) - ids[::-1].index(eos)]
    return ids if ids[-1:] == [eos] else ids + [eos]


def _nothing_left(path: str, stats: Dict[str, Any], seq_len: int) -> str:
    if stats["dropped_long_prompt"]:
        return (f"every prompt in {path} that is not dropped otherwise is longer than train.seq_len={seq_len} "
                "tokens, so no pair fits: raise train.seq_len or shorten the prompts")
    if stats["dropped_empty"] and not (stats["dropped_identical"] or stats["dropped_no_shared_prompt"]):
        return (f"every pair in {path} has an empty response (the first: {stats['first_empty']}): write the "
                "responses, or check data.chosen_column and data.rejected_column")
    if stats["dropped_no_shared_prompt"] and not stats["dropped_identical"]:
        return (f"no record of {path} has chosen and rejected dialogues that share a prompt (the turns up to the "
                "last assistant turn): give prompt/chosen/rejected records, or dialogues that differ only in the "
                "last assistant turn")
    return (f"every pair in {path} has identical chosen and rejected responses, so there is no preference to "
            "learn: check data.chosen_column and data.rejected_column")


def dropped_note(stats: Dict[str, Any]) -> str:
    """What loading left out or cut, as a phrase for the data line (empty when nothing was)."""
    parts = [f"{stats[key]:,} {what}" for key, what in (
        ("dropped_identical", "dropped: chosen and rejected identical"),
        ("dropped_empty", "dropped: an empty response"),
        ("dropped_no_shared_prompt", "dropped: the two dialogues share no prompt"),
        ("dropped_long_prompt", "dropped: prompt longer than train.seq_len"),
        ("truncated", "pairs cut to fit train.seq_len")) if stats.get(key)]
    return f" ({'; '.join(parts)})" if parts else ""


# ------------------------------------------------------------------------------------------ batches


def collate_pairs(pairs: Sequence[Pair], pad_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """One batch of 2B sequences: prompt + chosen for each pair, then prompt + rejected for each. `labels` are the
    response tokens (-100 on prompts and padding); `margin` per pair; `reference_logps` (2B) when precomputed."""
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompts = [len(p.prompt) for p in pairs] * 2
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (seq, n_prompt) in enumerate(zip(sequences, prompts)):
        n = len(seq)
        start = 0 if padding_side == "right" else longest - n
        ids[row, start:start + n] = torch.tensor(seq, dtype=torch.long)
        mask[row, start:start + n] = 1
        labels[row, start + n_prompt:start + n] = ids[row, start + n_prompt:start + n]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}
    if all(p.reference is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs],
                                                dtype=torch.float64)
    return batch


class PairSource:
    """Training and validation pairs served as batches of 2B sequences (see ftk.train.Source and
    ftk.data.examples.ExampleSource, whose length grouping it shares)."""

    def __init__(self, train: List[Pair], validation: List[Pair], pad_id: int, padding_side: str = "right"):
        self.train, self.validation, self.pad_id, self.padding_side = train, validation, pad_id, padding_side
        self.n_train = len(train)

    def stream(self, seed: int, batch_size: int) -> Any:
        from ftk.data.sampler import BlockStream, LengthGroupedStream

        if batch_size <= 1 or self.n_train < LengthGroupedStream.MEGA * batch_size:
            return BlockStream(self.n_train, seed)
        return LengthGroupedStream([p.longest() for p in self.train], seed, batch_size)

    def train_batch(self, indices: np.ndarray) -> Dict[str, torch.Tensor]:
        return collate_pairs([self.train[i] for i in indices], self.pad_id, self.padding_side)

    def validation_batches(self, batch_size: int, limit: int) -> Iterable[Dict[str, torch.Tensor]]:
        order = sorted(range(len(self.validation)), key=lambda i: self.validation[i].longest())
        n = len(order) if not limit else min(len(order), limit * batch_size)
        for start in range(0, n, batch_size):
            yield collate_pairs([self.validation[i] for i in order[start:start + batch_size]], self.pad_id,
                                self.padding_side)

    def tokens_in(self, batch: Dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())
