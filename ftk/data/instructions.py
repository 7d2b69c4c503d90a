"""Instruction records (Alpaca-style) as SFT examples: loss on the response and its EOS only.

A record has an instruction, an optional input and a response. The response is read from the
`output` column (Alpaca's name); when a file has no `output` column but has one named `response`,
that one is used instead (only while `response_column` is left at its default "output").

Each record becomes one `Example`:

    input_ids     = prompt tokens + response tokens + EOS
    token_labels  = -100 ...       + response tokens + EOS

so the model is trained to write the response and then to stop. Labels are not shifted here; the
SFT objective compares logits[:, :-1] with labels[:, 1:].

The prompt is the tokenizer's chat template when it has one (`tokenizer.chat_template`), with the
messages [user: instruction + "\\n\\n" + input, assistant: response]: the prompt part is the rendering
of the user message with add_generation_prompt=True, the response part is what the full rendering
adds after it (end-of-turn tokens of the template included). Without a chat template (or with one
whose full rendering does not extend its generation prompt) the plain Alpaca layout is used:

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {response}<eos>

(the Input block only when there is an input). Prompt and response are tokenized separately, so
the prompt tokens seen in training are exactly those `prompt_ids` gives for generation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ftk.data.examples import Example
from ftk.data.sources import is_local, list_files, load_records
from ftk.errors import UsageError

PLAIN = "alpaca"
CHAT = "chat"
FALLBACK_RESPONSE_COLUMN = "response"  # used when the default "output" column is absent
_PROBE = ("Name a colour.", "Blue.")   # renders the chat template once to check it splits cleanly


# ---------------------------------------------------------------------------------------------
# Prompts


def user_message(instruction: str, input: Optional[str] = None) -> str:
    """The user turn of the chat template: the instruction, then the input (if any) after a blank line."""
    return instruction + ("\n\n" + input if input and input.strip() else "")


def plain_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca-style prompt used when the tokenizer has no (usable) chat template."""
    if input and input.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _render(tokenizer: Any, messages: List[Dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # defensive: some versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not str")
    return text


def _chat_split(tokenizer: Any, instruction: str, input: Optional[str], response: str) -> Optional[Tuple[str, str]]:
    """(prompt text, response text) from the chat template, or None if its renderings do not line up."""
    user = [{"role": "user", "content": user_message(instruction, input)}]
    prompt = _render(tokenizer, user, True)
    full = _render(tokenizer, user + [{"role": "assistant", "content": response}], False)
    if full.startswith(prompt) and len(full) > len(prompt):
        return prompt, full[len(prompt):]
    return None


def template_mode(tokenizer: Any) -> str:
    """"chat" when the tokenizer has a chat template whose full rendering extends its generation
    prompt (checked on a probe conversation), else "alpaca" (the plain template)."""
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN
    try:
        return CHAT if _chat_split(tokenizer, _PROBE[0], None, _PROBE[1]) is not None else PLAIN
    except Exception:  # a template that cannot render a plain user/assistant exchange
        return PLAIN


def prompt_for(tokenizer: Any, instruction: str, input: Optional[str] = None) -> str:
    """The prompt text the model was fine-tuned on, for generation: the chat template's rendering with
    the generation prompt, or the plain Alpaca prompt. It may contain special tokens as text (chat
    templates write BOS themselves): tokenize it with `prompt_ids`, which matches training exactly."""
    if template_mode(tokenizer) == CHAT:
        return _render(tokenizer, [{"role": "user", "content": user_message(instruction, input)}], True)
    return plain_prompt(instruction, input)


def prompt_ids(tokenizer: Any, instruction: str, input: Optional[str] = None) -> List[int]:
    """The prompt token ids exactly as in training (the response follows them)."""
    mode = template_mode(tokenizer)
    text = prompt_for(tokenizer, instruction, input)
    return _prompt_tokens(tokenizer, text, mode)


def plain_text_ids(tokenizer: Any, text: str) -> List[int]:
    """A text as a language model continues it: the tokenizer's BOS if it adds one, no EOS after it."""
    return _prompt_tokens(tokenizer, text, PLAIN)


def _encode(tokenizer: Any, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_specials) and with_specials[0] == bos and _encode(tokenizer, "a")[:1] != [bos]


def _prompt_tokens(tokenizer: Any, text: str, mode: str, adds_bos: Optional[bool] = None) -> List[int]:
    # A chat template writes its own BOS into the text; the plain template gets the tokenizer's BOS,
    # if it adds one, but never its EOS or any other trailing special token.
    ids = _encode(tokenizer, text)
    if mode == PLAIN and (_adds_bos(tokenizer) if adds_bos is None else adds_bos):
        ids = [tokenizer.bos_token_id] + ids
    return ids


# ---------------------------------------------------------------------------------------------
# Records


class _Part:
    """One loaded file (or hub split) and how to name its records in messages."""

    def __init__(self, ds: Any, name: str, jsonl: Optional[Path]):
        self.ds, self.name, self.jsonl = ds, name, jsonl
        self._lines: Optional[List[int]] = None

    def where(self, row: int) -> str:
        """'file:line: record N' for JSON lines, 'file: record N' otherwise (row is 0-based)."""
        if self.jsonl is not None:
            if self._lines is None:  # only on an error: the line number of each non-blank line
                with open(self.jsonl, encoding="utf-8", errors="replace") as handle:
                    self._lines = [n for n, line in enumerate(handle, 1) if line.strip()]
            if row < len(self._lines):
                return f"{self.name}:{self._lines[row]}: record {row + 1}"
        return f"{self.name}: record {row + 1}"


def _parts(path: str, hub_config: Optional[str], split: str) -> List[_Part]:
    if not is_local(path):
        return [_Part(load_records(path, hub_config=hub_config, split=split), f"{path} (split {split})", None)]
    parts = []
    for f in list_files(path):
        # Files that hold nothing are "empty", not unreadable: datasets cannot even infer a schema.
        if _blank(f):
            continue
        ds = load_records(str(f))
        parts.append(_Part(ds, str(f), f if f.suffix.lower() == ".jsonl" else None))
    return parts


def _blank(f: Path) -> bool:
    """Whether a file holds no records: only whitespace, a CSV header alone, or an empty JSON list."""
    suffix = f.suffix.lower()
    with open(f, "rb") as handle:
        if suffix in (".csv", ".tsv", ".json"):  # small or it has records: read a little only
            head = handle.read(1 << 16)
            if len(head) < 1 << 16:
                lines = [line for line in head.splitlines() if line.strip()]
                return (len(lines) <= 1 if suffix != ".json" else head.strip() in (b"", b"[]"))
            return False
        while True:
            chunk = handle.read(1 << 16)
            if not chunk:
                return True
            if chunk.strip():
                return False


def _text(value: Any, column: str, part: "_Part", row: int) -> Optional[str]:
    """A cell as text: None for missing values (null, NaN from an empty CSV cell)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise UsageError(f"{part.where(row)}: '{column}' must be text, not {type(value).__name__} "
                     f"({json.dumps(value, default=str)[:60]}); write it as a string")


def _response_column(columns: Sequence[str], wanted: str, name: str) -> str:
    if wanted in columns:
        return wanted
    if wanted == "output" and FALLBACK_RESPONSE_COLUMN in columns:
        return FALLBACK_RESPONSE_COLUMN
    also = f" (or '{FALLBACK_RESPONSE_COLUMN}')" if wanted == "output" else ""
    raise UsageError(f"{name} has no response column '{wanted}'{also}; its columns are {', '.join(columns)}: "
                     f"pass data.response_column=<one of them>")


def encode_all(tokenizer: Any, texts: List[str], batch: int = 1000) -> List[List[int]]:
    """Every text's ids (no special tokens), in batches; quiet about texts longer than the model's maximum,
    which the callers cut to the sequence length themselves."""
    from transformers.utils import logging

    out: List[List[int]] = []
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        for start in range(0, len(texts), batch):
            out.extend(list(ids) for ids in
                       tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"])
    finally:
        logging.set_verbosity(verbosity)
    return out


def _chat_texts(tokenizer: Any, instruction: str, extra: Optional[str], response: str, part: "_Part", row: int,
                stats: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(prompt text, response text) of one record through the chat template; None to drop the record."""
    try:
        texts = _chat_split(tokenizer, instruction, extra, response)
        if texts is not None:
            return texts
        # This record renders oddly (the generation prompt is not a prefix): find the response instead.
        user = [{"role": "user", "content": user_message(instruction, extra)}]
        full = _render(tokenizer, user + [{"role": "assistant", "content": response}], False)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"{part.where(row)}: the tokenizer's chat template failed on this record ({reason}); "
                         f"fix the record or remove it") from None
    at = full.rfind(response)
    if at <= 0:
        stats["dropped_unsplittable"] += 1
        return None
    stats["boundary_fallbacks"] += 1
    return full[:at], full[at:]


def load_instruction_examples(path: str, tokenizer: Any, max_len: int, *, instruction_column: str = "instruction",
                              input_column: str = "input", response_column: str = "output",
                              hub_config: Optional[str] = None,
                              split: str = "train") -> Tuple[List[Example], Dict[str, Any]]:
    """SFT examples from the instruction records at `path` (file, folder or hub name; see
    `ftk.data.sources.load_records`), at most `max_len` tokens each.

    Records whose prompt alone takes more than max_len - 1 tokens are dropped (counted in
    stats["dropped_long_prompt"]); longer responses are cut at the end (stats["truncated"]), and only
    then is EOS not the last label. The input column is optional; the response column falls back
    from "output" to "response". Returns (examples, stats).
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no eos token, so a fine-tuned model could not learn to stop: "
                         "use a decoder tokenizer with an eos token (GPT-2, Llama), or set one on it")
    if max_len < 2:
        raise UsageError(f"max_len={max_len} leaves no room for a response: pass a length >= 2 (train.seq_len)")
    eos = tokenizer.eos_token_id
    mode = template_mode(tokenizer)
    adds_bos = _adds_bos(tokenizer)
    parts = _parts(path, hub_config, split)
    if sum(p.ds.num_rows for p in parts) == 0:
        raise UsageError(f"{path} holds no instruction records: the dataset is empty; "
                         f"pass data.path=<file with {instruction_column}/{response_column} records>")

    stats: Dict[str, Any] = {"records": 0, "examples": 0, "template": mode, "dropped_long_prompt": 0,
                             "truncated": 0, "boundary_fallbacks": 0, "dropped_unsplittable": 0,
                             "prompt_tokens": 0, "response_tokens": 0}
    # First the texts of every record (errors name the record), then one batched tokenization.
    prompts: List[str] = []
    responses: List[str] = []
    for part in parts:
        if part.ds.num_rows == 0:
            continue
        columns = part.ds.column_names
        if instruction_column not in columns:
            raise UsageError(f"{part.name} has no instruction column '{instruction_column}'; its columns are "
                             f"{', '.join(columns)}: pass data.instruction_column=<one of them>")
        resp_col = _response_column(columns, response_column, part.name)
        stats.setdefault("response_column", resp_col)
        instructions = part.ds[instruction_column]
        outputs = part.ds[resp_col]
        inputs = part.ds[input_column] if input_column in columns else [None] * part.ds.num_rows
        for row, (instruction, extra, response) in enumerate(zip(instructions, inputs, outputs)):
            stats["records"] += 1
            response = _text(response, resp_col, part, row)
            if response is None or not response.strip():
                raise UsageError(f"{part.where(row)} has no response ('{resp_col}' is missing or empty): "
                                 f"write the response there or remove the record")
            instruction = _text(instruction, instruction_column, part, row)
            if instruction is None or not instruction.strip():
                raise UsageError(f"{part.where(row)} has no instruction ('{instruction_column}' is missing or "
                                 f"empty): write the instruction there or remove the record")
            extra = _text(extra, input_column, part, row)
            extra = extra if extra and extra.strip() else None
            if mode == CHAT:
                texts = _chat_texts(tokenizer, instruction, extra, response, part, row, stats)
                if texts is None:
                    continue
                prompts.append(texts[0])
                responses.append(texts[1])
            else:
                prompts.append(plain_prompt(instruction, extra))
                responses.append(response)

    examples: List[Example] = []
    bos = [tokenizer.bos_token_id] if mode == PLAIN and adds_bos else []
    for p_ids, r_ids in zip(encode_all(tokenizer, prompts), encode_all(tokenizer, responses)):
        p_ids = bos + p_ids
        if mode == CHAT and eos in r_ids:  # the template ends the turn with EOS: stop there (drop e.g. "\n")
            r_ids = r_ids[:len(r_ids) - r_ids[::-1].index(eos)]
        else:
            r_ids = r_ids + [eos]
        if len(p_ids) > max_len - 1:
            stats["dropped_long_prompt"] += 1
            continue
        room = max_len - len(p_ids)
        if len(r_ids) > room:
            r_ids = r_ids[:room]
            stats["truncated"] += 1
        examples.append(Example(input_ids=p_ids + r_ids, token_labels=[-100] * len(p_ids) + r_ids))
        stats["prompt_tokens"] += len(p_ids)
        stats["response_tokens"] += len(r_ids)
    if not examples:
        if stats["dropped_long_prompt"]:
            raise UsageError(f"every prompt in {path} takes more than max_len-1={max_len - 1} tokens, so no "
                             f"record fits: pass a larger length (train.seq_len) or shorten the instructions")
        raise UsageError(f"no record of {path} could be split into prompt and response by the tokenizer's "
                         f"chat template: fix the template or remove it (tokenizer.chat_template=None)")
    stats["examples"] = len(examples)
    return examples, stats


def dropped_note(stats: Dict[str, Any]) -> str:
    """What loading left out or cut, as a phrase for the data line (empty when nothing was)."""
    parts = [f"{stats[key]:,} {what}" for key, what in (
        ("dropped_long_prompt", "dropped: prompt longer than train.seq_len"),
        ("dropped_unsplittable", "dropped: prompt and response not separable by the chat template"),
        ("truncated", "responses cut to fit train.seq_len")) if stats.get(key)]
    return f" ({'; '.join(parts)})" if parts else ""
