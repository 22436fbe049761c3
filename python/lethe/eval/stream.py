"""Continual unlearning: a stream of deletion requests, built from the benchmark's corpus or read
from a JSONL file.

A request is a list of chunks, each an Example (what a method trains on). A facts request holds
one chunk per question/answer pair; a text request is split into sentences, and runs of sentences
into chunks of at most `chunk_words` words, each read as an Example by the JSONL text rule (the
first half of its words the prompt, the rest the answer: MUSE's verbatim completion).

The built-in stream (`make_stream`) draws, in an order fixed by the seed, three kinds of request:
a new person's facts (as question/answer pairs, or as a text passage), a *near-duplicate* of an
earlier request (the same person's facts reworded: another question template where the attribute
has one, the paraphrased answer), and a *partial overlap*: a person first requested with half of
their facts and later with all of them. Each chunk is marked `duplicate` when its fact was in an
earlier request, so that filtering can be scored, and each request names its `subjects` (the
people whose facts the forget score is measured on).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path
from typing import Optional

from lethe.eval.data import PROMPT, DataError, Example, jsonl_rows

__all__ = ["Request", "StreamConfig", "make_stream", "load_requests", "save_requests", "text_chunks", "text_example",
           "requested_people"]


@dataclasses.dataclass(frozen=True)
class Request:
    """One deletion request: its chunks (Examples), and for the built-in stream its subjects and
    per chunk whether it repeats a fact of an earlier request."""

    id: str
    chunks: tuple[Example, ...]
    kind: str = "facts"  # "facts" (question/answer pairs) or "text" (a passage)
    subjects: tuple[str, ...] = ()
    duplicate: Optional[tuple[bool, ...]] = None  # the generator's marks (None for a user's request)
    facts: tuple[tuple[str, str], ...] = ()  # (subject, attribute) of each chunk, built-in stream only

    def __post_init__(self):
        if not self.chunks:
            raise ValueError(f"request {self.id!r}: empty (no chunk to forget)")
        if self.duplicate is not None and len(self.duplicate) != len(self.chunks):
            raise ValueError(f"request {self.id!r}: {len(self.duplicate)} duplicate marks for {len(self.chunks)} chunks")

    def to_json(self) -> dict:
        d = {"id": self.id, "kind": self.kind}
        if self.kind == "text":
            d["chunks"] = [c.text for c in self.chunks]
        else:
            d["facts"] = [{"question": _question(c.prompt), "answer": c.answer} for c in self.chunks]
        if self.subjects:
            d["subjects"] = list(self.subjects)
        if self.duplicate is not None:
            d["duplicate"] = list(self.duplicate)
        return d


def _question(prompt: str) -> str:
    head, tail = PROMPT.split("{q}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return prompt


def text_chunks(text: str, chunk_words: int = 24) -> list[Example]:
    """A passage as chunks: sentences (split after . ! ?), consecutive ones joined while the chunk
    stays within `chunk_words` words; each chunk an Example by the text rule (first half of the
    words the prompt, the rest the answer). A sentence of one word joins its neighbour."""
    if not isinstance(chunk_words, int) or isinstance(chunk_words, bool) or chunk_words < 2:
        raise ValueError(f"chunk_words must be an int >= 2, got {chunk_words!r}")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    chunks, cur = [], []
    for s in sentences:
        w = s.split()
        if cur and len(cur) + len(w) > chunk_words and len(cur) >= 2:
            chunks.append(cur)
            cur = []
        cur = cur + w
    if cur:
        if len(cur) < 2 and chunks:
            chunks[-1] += cur
        else:
            chunks.append(cur)
    return [text_example(" ".join(c)) for c in chunks]


def text_example(text: str) -> Example:
    """A chunk of text as an Example: the first half of its words the prompt, the rest the answer."""
    w = text.split()
    if len(w) < 2:
        raise ValueError(f"text: a chunk needs at least two words, got {text!r}")
    return Example(" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:]))


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """The built-in stream: `requests` requests, of which about `duplicates` are near-duplicates of
    an earlier one and `partial` of the new people are first requested with half of their facts
    (and later in full); `passages` of the new requests are text passages."""

    requests: int = 30
    duplicates: float = 0.2
    partial: float = 0.2
    passages: float = 0.0
    seed: int = 0

    def __post_init__(self):
        from lethe.eval.corpus import positive_ints

        positive_ints(self, ("requests",))
        for f in ("duplicates", "partial", "passages"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"StreamConfig: {f} must be a fraction in [0, 1), got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"StreamConfig: seed must be an int, got {self.seed!r}")


def _reworded(qa, r: random.Random):
    """A re-filing of a fact: another question template of its attribute where there is one (not
    for award_year, whose question names the award), the same answer."""
    from lethe.eval.corpus import _TEMPLATES

    qs = [q for q in _TEMPLATES["person"][qa.attribute]["questions"] if "{a}" not in q]
    others = [q.format(s=qa.subject) for q in qs if q.format(s=qa.subject) != qa.question]
    return (r.choice(others) if others else qa.question), qa.answer


def _passage(subject: str, pairs) -> str:
    return " ".join(f"{subject}: {a}" for _, a in pairs)


def make_stream(corpus, config: Optional[StreamConfig] = None) -> list[Request]:
    """The built-in stream of deletion requests over `corpus`'s people, taken in the corpus's split
    order (a prefix of `corpus.people`). Deterministic by config.seed."""
    c = config or StreamConfig()
    r = random.Random(c.seed * 7919 + 17)
    people = list(corpus.people)
    nxt = 0
    requested: dict[str, set] = {}  # person -> attributes requested so far
    pending: list[str] = []  # people requested with half of their facts, not yet in full
    history: list[tuple[str, list]] = []  # (person, qas) of each earlier new-fact request
    out = []
    for i in range(c.requests):
        u = r.random()
        if history and u < c.duplicates:
            person, qas = history[r.randrange(len(history))]
            pairs = [_reworded(qa, r) for qa in qas]
            label = "duplicate"
        elif pending and u < c.duplicates + c.partial:
            person = pending.pop(0)
            qas = list(corpus.person_facts[person])
            pairs = [(qa.question, qa.answer) for qa in qas]
            history.append((person, qas))
            label = "complete"
        else:
            if nxt >= len(people):
                raise ValueError(f"StreamConfig: requests={c.requests} needs more people than the corpus has "
                                 f"({len(people)})")
            person = people[nxt]
            nxt += 1
            qas = list(corpus.person_facts[person])
            if r.random() < c.partial and len(qas) > 1:
                qas = qas[:len(qas) // 2]
                pending.append(person)
            pairs = [(qa.question, qa.answer) for qa in qas]
            history.append((person, qas))
            label = "new"
        dup = tuple(qa.attribute in requested.get(person, ()) for qa in qas)
        requested.setdefault(person, set()).update(qa.attribute for qa in qas)
        facts = tuple((person, qa.attribute) for qa in qas)
        if label != "complete" and r.random() < c.passages:
            # a passage: one chunk per fact sentence ("<person>: <answer>"), so the marks stay per fact
            chunks = tuple(text_example(f"{person}: {a}") for _, a in pairs)
            out.append(Request(f"r{i:03d}", chunks, "text", (person,), dup, facts))
        else:
            chunks = tuple(Example(PROMPT.format(q=q), a, subject=person) for q, a in pairs)
            out.append(Request(f"r{i:03d}", chunks, "facts", (person,), dup, facts))
    return out


def requested_people(requests) -> list[str]:
    """The people named by the requests, in first-request order."""
    seen: dict[str, None] = {}
    for q in requests:
        for s in q.subjects:
            seen.setdefault(s, None)
    return list(seen)


def _request_from(row, where: str, template: str, chunk_words: int, index: int) -> Request:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rid = row.get("id", f"r{index:03d}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(f"{where}: \"id\" must be a string or an int")
    if "facts" in row:
        facts = row["facts"]
        if not isinstance(facts, list) or not facts:
            raise DataError(f"{where}: \"facts\" must be a non-empty list of {{\"question\",\"answer\"}} objects")
        chunks = []
        for j, f in enumerate(facts):
            if (not isinstance(f, dict) or not isinstance(f.get("question"), str) or not f["question"].strip()
                    or not isinstance(f.get("answer"), str) or not f["answer"].strip()):
                raise DataError(f"{where}: facts[{j}] must be an object with non-empty \"question\" and \"answer\"")
            chunks.append(Example(template.format(q=f["question"]), f["answer"].strip()))
        kind = "facts"
    elif "question" in row or "answer" in row:
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise DataError(f"{where}: \"question\" and \"answer\" must both be non-empty strings")
        chunks, kind = [Example(template.format(q=q), a.strip())], "facts"
    elif "chunks" in row:  # a passage already split into chunks
        cs = row["chunks"]
        if not isinstance(cs, list) or not cs or not all(isinstance(x, str) and len(x.split()) >= 2 for x in cs):
            raise DataError(f"{where}: \"chunks\" must be a non-empty list of strings of at least two words")
        chunks, kind = [text_example(x) for x in cs], "text"
    elif "text" in row:
        t = row["text"]
        if not isinstance(t, str) or len(t.split()) < 2:
            raise DataError(f"{where}: \"text\" must be a string of at least two words")
        chunks, kind = text_chunks(t, chunk_words), "text"
    else:
        raise DataError(f"{where}: expected \"facts\", \"question\"/\"answer\", \"text\" or \"chunks\"; "
                        f"got {sorted(row)}")
    subjects = row.get("subjects", [])
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise DataError(f"{where}: \"subjects\" must be a list of strings")
    dup = row.get("duplicate")
    if dup is not None and (not isinstance(dup, list) or len(dup) != len(chunks)
                            or not all(isinstance(x, bool) for x in dup)):
        raise DataError(f"{where}: \"duplicate\" must be a list of {len(chunks)} booleans, one per chunk")
    return Request(str(rid), tuple(chunks), kind, tuple(subjects), None if dup is None else tuple(dup))


def load_requests(path, template: str = PROMPT, chunk_words: int = 24) -> list[Request]:
    """Reads a request file: one JSON object per line, either {"facts": [{"question", "answer"}, ...]},
    a single {"question", "answer"}, {"text": "..."} (a passage, split into chunks) or {"chunks":
    ["...", ...]} (a passage already split); optional
    "id", "subjects" and "duplicate" (one boolean per chunk). Raises DataError naming the file and
    line for a malformed line, and for a missing or empty file."""
    p = Path(os.fspath(path))
    if "{q}" not in template:
        raise DataError(f"template {template!r} must contain {{q}}")
    out = []
    for where, row in jsonl_rows(p, "requests"):
        try:
            out.append(_request_from(row, where, template, chunk_words, len(out)))
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: {e}") from None
    if not out:
        raise DataError(f"requests file {str(p)!r} holds no request")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"requests file {str(p)!r}: the id {dup!r} is used twice")
    return out


def save_requests(requests, path) -> None:
    """Writes requests as a request file (load_requests reads it back)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(q.to_json()) + "\n" for q in requests), encoding="utf-8")
    os.replace(tmp, p)
