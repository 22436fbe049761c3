"""Evaluation data: the built-in benchmark's sets, or a user's JSONL files.

An example is a prompt and an answer, optionally with a paraphrased answer and perturbed (false)
answers (for the truth ratio). A question line `{"question", "answer"}` becomes the prompt
`Question: <q>\\nAnswer:` (the built-in benchmark's format; `template=` changes it); a text line
`{"text"}` is split in two by whitespace-separated words: the first half is the prompt and the rest
the answer (MUSE's verbatim-completion reading). Optional fields of a question line:
`"paraphrased_answer"` and `"perturbed_answers"` (a list).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

__all__ = ["Example", "load_jsonl", "jsonl_rows", "examples_from_qas", "pad_batch", "DataError", "PROMPT"]

PROMPT = "Question: {q}\nAnswer:"


class DataError(ValueError):
    """Bad evaluation data: names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    paraphrased: Optional[str] = None
    perturbed: tuple[str, ...] = ()
    subject: str = ""

    @property
    def text(self) -> str:
        return self.prompt + " " + self.answer


def pad_batch(rows, pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) of rows (ids, answer_start): the labels
    are the ids from answer_start on, -100 elsewhere."""
    import torch

    T = max(len(x) for x, _ in rows)
    flat = torch.tensor([t for x, _ in rows for t in list(x) + [pad_id] * (T - len(x))], dtype=torch.long)
    ids = flat.view(len(rows), T)
    pos = torch.arange(T)
    lengths = torch.tensor([len(x) for x, _ in rows]).unsqueeze(1)
    starts = torch.tensor([s for _, s in rows]).unsqueeze(1)
    mask = (pos < lengths).long()
    labels = ids.masked_fill((pos < starts) | (pos >= lengths), -100)
    return ids, labels, mask


def examples_from_qas(qas, template: str = PROMPT) -> list[Example]:
    return [Example(template.format(q=qa.question), qa.answer, qa.paraphrased, tuple(qa.perturbed), qa.subject)
            for qa in qas]


def jsonl_rows(path, what: str = "data"):
    """(where, row) for each non-blank line of a JSONL file, where = "file:line"; DataError for a
    missing file, a directory, or a line that is not valid JSON."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise DataError(f"{what} file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"{what} file {str(p)!r} is not a file")
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def load_jsonl(path, template: str = PROMPT, what: str = "data") -> list[Example]:
    """Reads a JSONL file of `{"question","answer"}` or `{"text"}` lines (blank lines skipped).
    Raises DataError naming the file and line for a malformed line, and for a missing or empty file."""
    p = Path(os.fspath(path))
    out = []
    for where, row in jsonl_rows(p, what):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "question" in row or "answer" in row:
            q, a = row.get("question"), row.get("answer")
            if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
                raise DataError(f"{where}: \"question\" and \"answer\" must both be non-empty strings")
            para = row.get("paraphrased_answer")
            pert = row.get("perturbed_answers", [])
            if para is not None and (not isinstance(para, str) or not para.strip()):
                raise DataError(f"{where}: \"paraphrased_answer\" must be a non-empty string")
            if not isinstance(pert, list) or not all(isinstance(x, str) and x.strip() for x in pert):
                raise DataError(f"{where}: \"perturbed_answers\" must be a list of non-empty strings")
            if pert and para is None:
                raise DataError(f"{where}: \"perturbed_answers\" needs a \"paraphrased_answer\"")
            try:
                prompt = template.format(q=q)
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(f"template {template!r} must contain {{q}} and no other field ({e})") from None
            out.append(Example(prompt, a.strip(), para, tuple(pert)))
        elif "text" in row:
            t = row["text"]
            if not isinstance(t, str) or len(t.split()) < 2:
                raise DataError(f"{where}: \"text\" must be a string of at least two words")
            words = t.split()
            h = len(words) // 2
            out.append(Example(" ".join(words[:h]), " ".join(words[h:])))
        else:
            raise DataError(f"{where}: expected the keys \"question\" and \"answer\", or \"text\"; "
                            f"got {sorted(row)}")
    if not out:
        raise DataError(f"{what} file {str(p)!r} holds no examples")
    return out
