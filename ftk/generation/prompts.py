"""The prompts of `ftk generate`, from the command line or a file, as token ids the model was trained on.

A prompt is kept in the form it came in (plain text, an instruction with optional input, or chat messages)
and rendered once the tokenizer is known: plain text is continued as written (`prompt_format=raw`) or wrapped
as `ftk finetune objective=sft` trained it (`instruction`: the chat template, else the Alpaca layout).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ftk.errors import UsageError


@dataclass
class Prompt:
    text: str                                   # what the record shows (the instruction, or the last user turn)
    input: Optional[str] = None                 # an instruction's input
    messages: Optional[List[Dict[str, str]]] = None  # a chat conversation, rendered with the chat template
    record: Dict[str, Any] = field(default_factory=dict)  # a JSONL record's other fields, copied to the output


def read(prompts: Any, prompt_field: str = "prompt", limit: Optional[int] = None) -> List[Prompt]:
    """Prompts from a text, a list of texts, a .txt file (one per non-empty line) or a .jsonl(.gz) file."""
    if prompts is None:
        raise UsageError("no prompts: pass prompts='Once upon a time' (a text), prompts=[a,b] (texts), or "
                         "prompts=<file.txt (one per line) or file.jsonl>")
    if isinstance(prompts, (list, tuple)) or type(prompts).__name__ == "ListConfig":
        found = [Prompt(str(p)) for p in prompts]
    else:
        text = str(prompts)
        path = Path(text).expanduser()
        looks_like_file = text.endswith((".txt", ".jsonl", ".json", ".gz")) and "\n" not in text
        if path.is_file():
            found = _from_file(path, prompt_field)
        elif looks_like_file:
            raise UsageError(f"prompts={text}: no such file; pass an existing .txt or .jsonl file, or the "
                             "prompt text itself")
        else:
            found = [Prompt(text)]
    found = found[:limit] if limit else found
    if not found:
        raise UsageError(f"prompts={prompts}: no prompts in it (empty lines are skipped); give at least one")
    return found


def _lines(path: Path) -> List[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            return handle.read().splitlines()
    except (OSError, EOFError) as exc:  # e.g. a .gz that is not gzip
        raise UsageError(f"prompts={path}: cannot be read ({exc}); pass a plain or gzip-compressed text file") from None


def _from_file(path: Path, prompt_field: str) -> List[Prompt]:
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))
    lines = _lines(path)
    if not jsonl:
        return [Prompt(line) for line in lines if line.strip()]
    found = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"prompts={path} line {number} is not JSON ({exc.msg}); one JSON object per line "
                             "(JSONL) is expected") from None
        found.append(_from_record(record, prompt_field, f"prompts={path} line {number}"))
    return found


def _from_record(record: Any, prompt_field: str, where: str) -> Prompt:
    if isinstance(record, str):
        return Prompt(record)
    if not isinstance(record, dict):
        raise UsageError(f"{where} is a {type(record).__name__}, not an object with a '{prompt_field}' field")
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UsageError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if messages and messages[-1].get("role") == "assistant":  # generate the assistant's turn anew
            messages = messages[:-1]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return Prompt(str(last_user), messages=[dict(m) for m in messages], record=_rest(record, "messages"))
    if prompt_field in record and isinstance(record[prompt_field], str):
        return Prompt(record[prompt_field], record=_rest(record, prompt_field))
    if isinstance(record.get("instruction"), str):
        extra = record.get("input") or None
        return Prompt(record["instruction"], input=str(extra) if extra else None,
                      record=_rest(record, "instruction", "input", "output"))
    raise UsageError(f"{where} has no '{prompt_field}' text (fields: {', '.join(sorted(record)) or 'none'}); "
                     f"name the field with prompt_field=<name>, or give 'instruction' or 'messages'")


def _rest(record: Dict[str, Any], *used: str) -> Dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used and isinstance(v, (str, int, float, bool))}


def token_ids(prompt: Prompt, tokenizer: Any, instruction: bool) -> List[int]:
    """The prompt's ids: chat messages through the chat template; an instruction (or `instruction` format)
    exactly as SFT training laid it out; else the text as written, with the tokenizer's BOS if it adds one."""
    from ftk.data import instructions

    if prompt.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("a prompt is a chat conversation ('messages') but the tokenizer has no chat template; "
                             "give plain prompts or instructions instead")
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if instruction or prompt.input is not None:
        return instructions.prompt_ids(tokenizer, prompt.text, prompt.input)
    # As training saw text: the tokenizer's BOS when it adds one, never a trailing EOS (it would end the text)
    return instructions.plain_text_ids(tokenizer, prompt.text)
