"""The built-in benchmark: the corpus, its tokenizer, the target model and the exactly retrained
reference models, built once and cached.

Every model is an ordinary Hugging Face model directory (config, safetensors weights, the fast
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads. The cache lives under `LETHE_CACHE`
(default `~/.cache/lethe`), keyed by a hash of the corpus bytes and the training recipe, so a second
run loads the models at once. Training writes a checkpoint after every epoch (model, optimiser,
scheduler, epoch; the data order is a function of the seed and the epoch), and an interrupted build
resumes from it with the same weights as an uninterrupted one. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lethe.eval.corpus import QA, SPLITS, Corpus, CorpusConfig, make_corpus, positive_ints
from lethe.eval.data import PROMPT, pad_batch

__all__ = ["TrainConfig", "BenchmarkConfig", "Benchmark", "build_benchmark", "build_stream_reference", "cache_dir",
           "encode_qa",
           "train_tokenizer", "train_model"]

FORMAT = 1  # bump when the cached layout or the recipe's meaning changes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The tiny LlamaForCausalLM and its training recipe: AdamW with warm-up and linear decay, the
    cross-entropy of the answer tokens only (as TOFU fine-tunes), computed by lethe's fused LM-head
    op. The defaults memorise the built-in corpus (greedy exact match 1.0 on forget and retain)."""

    # the model: LlamaConfig's hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    # the tokenizer's vocabulary size (BPE trained on the corpus)
    vocab: int = 2048
    # the recipe: passes over the training set, AdamW's batch and peak learning rate
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping (0: none), as the HF Trainer's default

    def __post_init__(self):
        positive_ints(self, ("hidden", "layers", "heads", "intermediate", "vocab", "epochs", "batch_size"))
        if self.hidden % self.heads:
            raise ValueError(f"TrainConfig: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not (self.lr > 0) or not (0 <= self.warmup < 1) or not (self.weight_decay >= 0) or not (self.clip >= 0):
            raise ValueError("TrainConfig: lr must be > 0, warmup in [0, 1), weight_decay >= 0, clip >= 0")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    corpus: CorpusConfig = CorpusConfig()
    train: TrainConfig = TrainConfig()
    seed: int = 0  # of the target and the first retain model; the second retain model uses seed + 1


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """`cache`, else `LETHE_CACHE`, else ~/.cache/lethe."""
    if cache is None:
        cache = os.environ.get("LETHE_CACHE") or Path.home() / ".cache" / "lethe"
    return Path(cache).expanduser()


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _atomic_dir(final: Path, write) -> Path:
    """Writes a directory under a temporary name and renames it: a reader sees all or nothing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        write(tmp)
        if final.exists():  # built meanwhile by another process: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE fast tokenizer trained on `texts` (the `tokenizers` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="right")


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of `<s> Question: q\\nAnswer: a</s>` and the index where the answer starts
    (the prompt and the answer are tokenised apart, so the boundary is the same for every answer
    of a question)."""
    p = tokenizer(PROMPT.format(q=question), add_special_tokens=False)["input_ids"]
    a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + p + a + [tokenizer.eos_token_id], 1 + len(p)


def _batches(encoded, batch_size, pad_id, order):
    for i in range(0, len(order), batch_size):
        yield pad_batch([encoded[j] for j in order[i:i + batch_size]], pad_id)


def _epoch_order(lengths, batch_size, seed, epoch):
    """A shuffled order in which each batch holds examples of similar length (less padding):
    shuffle, sort windows of 8 batches by length, then shuffle the batches."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    w = 8 * batch_size
    perm = [i for k in range(0, len(perm), w) for i in sorted(perm[k:k + w], key=lambda j: lengths[j])]
    batches = [perm[k:k + batch_size] for k in range(0, len(perm), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


def answer_loss(model, ids, labels, mask, backend=None):
    """Mean cross-entropy of the labelled tokens, with the LM head applied to those positions only,
    by lethe's fused op (fused_linear_topk_kl with K = 1 and a one-hot target is -log p(label))."""
    from lethe.integrations import hf
    from lethe.ops import fused_linear_topk_kl

    hidden, w, b = hf.last_hidden_and_head(model, ids, mask)
    lab = hf.shifted_labels(ids, mask, labels)
    keep = lab != -100
    h = hidden[:, :-1][keep]
    tgt = lab[keep].unsqueeze(-1)
    return fused_linear_topk_kl(h, w, tgt, torch.ones(tgt.shape, device=h.device), bias=b, backend=backend)


def _new_model(cfg: TrainConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       intermediate_size=cfg.intermediate, max_position_embeddings=128,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(conf)


def train_model(qas: list[QA], tokenizer, cfg: TrainConfig, seed: int, out: Path, progress: bool = True,
                desc: str = "train", stop_after: int | None = None) -> Path:
    """Trains a model on `qas` from scratch and saves it to `out` (a HF model directory).

    A checkpoint `out.ckpt` is written after every epoch; a later call resumes from it (bit for bit
    on CPU: the data order is a function of (seed, epoch), and nothing else draws random numbers).
    `stop_after` ends the call after that many epochs of this call (for tests of resumption).
    """
    from tqdm.auto import tqdm

    if out.exists():
        return out
    encoded = [encode_qa(tokenizer, qa.question, qa.answer) for qa in qas]
    lengths = [len(x) for x, _ in encoded]
    model = _new_model(cfg, tokenizer, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(encoded) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    ckpt = out.with_name(out.name + ".ckpt")
    epoch = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch = state["epoch"]
    model.train()
    bar = tqdm(total=total, initial=epoch * steps_per_epoch, desc=desc, disable=not progress,
               leave=False, dynamic_ncols=True)
    done_here = 0
    while epoch < cfg.epochs:
        order = _epoch_order(lengths, cfg.batch_size, seed, epoch)
        for ids, labels, mask in _batches(encoded, cfg.batch_size, tokenizer.pad_token_id, order):
            loss = answer_loss(model, ids, labels, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        epoch += 1
        done_here += 1
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch}, tmp)
        os.replace(tmp, ckpt)
        if stop_after is not None and done_here >= stop_after and epoch < cfg.epochs:
            bar.close()
            return ckpt
    bar.close()
    model.eval()

    def write(d):
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        (d / "lethe_model.json").write_text(json.dumps({"recipe": dataclasses.asdict(cfg), "seed": seed,
                                                         "examples": len(qas), "format": FORMAT}, indent=1))
    _atomic_dir(out, write)
    ckpt.unlink(missing_ok=True)
    return out


@dataclasses.dataclass
class Benchmark:
    """The built benchmark: the corpus, and the model directories of the target and of each
    split's reference (retain) models: `retain[split][0]` (seed) and `[1]` (seed + 1)."""

    config: BenchmarkConfig
    corpus: Corpus
    root: Path
    tokenizer_dir: Path
    target: Path
    retain: dict[str, list[Path]]

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)


def build_benchmark(config: BenchmarkConfig | None = None, splits=("forget10",), cache=None,
                    progress: bool = True, retain_seeds: int = 2) -> Benchmark:
    """Builds (or loads from the cache) the benchmark: the tokenizer, the target model and
    `retain_seeds` retain models for each of `splits`."""
    config = config or BenchmarkConfig()
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"splits: each must be one of {sorted(SPLITS)}, got {s!r}")
    if not isinstance(retain_seeds, int) or retain_seeds < 0:
        raise ValueError(f"retain_seeds must be an int >= 0, got {retain_seeds!r}")
    corpus = make_corpus(config.corpus)
    digest = corpus.digest()
    root = cache_dir(cache) / "benchmark" / _key(FORMAT, digest, dataclasses.asdict(config.train))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "corpus.json").exists():
        tmp = root / "corpus.json.tmp"
        tmp.write_bytes(corpus.to_bytes())
        os.replace(tmp, root / "corpus.json")
    tok_dir = root / "tokenizer"
    if not tok_dir.exists():
        texts = [PROMPT.format(q=qa.question) + " " + a for qa in corpus.all_qas()
                 for a in (qa.answer, qa.paraphrased, *qa.perturbed)]
        tok = train_tokenizer(texts, config.train.vocab)
        _atomic_dir(tok_dir, tok.save_pretrained)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    s0 = config.seed
    target = train_model(corpus.train_set(None), tok, config.train, s0, root / f"target-seed{s0}",
                         progress, desc="target model")
    retain = {}
    for split in splits:
        retain[split] = [train_model(corpus.train_set(split), tok, config.train, s0 + i,
                                     root / f"retain-{split}-seed{s0 + i}", progress,
                                     desc=f"retain model ({split}, seed {s0 + i})")
                         for i in range(retain_seeds)]
    return Benchmark(config, corpus, root, tok_dir, target, retain)


def build_stream_reference(bench: Benchmark, requests, progress: bool = True, seed: int | None = None) -> Path:
    """The model retrained from scratch without every fact the `requests` (a built-in stream,
    lethe.eval.stream.make_stream) ask to forget: the benchmark's recipe on the rest of the
    corpus (a person requested with half of their facts keeps the other half). Cached beside the
    benchmark's models, keyed by the removed facts."""
    gone = sorted({f for q in requests for f in q.facts})
    if not gone:
        raise ValueError("requests: they name no fact of the corpus (not a built-in stream)")
    known = {(qa.subject, qa.attribute) for p in bench.corpus.people for qa in bench.corpus.person_facts[p]}
    missing = [f for f in gone if tuple(f) not in known]
    if missing:
        raise ValueError(f"requests: fact {missing[0]} is not in this benchmark's corpus")
    drop = set(map(tuple, gone))
    qas = [qa for p in bench.corpus.people for qa in bench.corpus.person_facts[p]
           if (qa.subject, qa.attribute) not in drop] + list(bench.corpus.world)
    s = bench.config.seed if seed is None else seed
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bench.tokenizer_dir)
    return train_model(qas, tok, bench.config.train, s, bench.root / f"retain-stream-{_key(gone)}-seed{s}",
                       progress, desc=f"retrained without the stream's {len(gone)} facts")
