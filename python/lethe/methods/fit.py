"""FIT: continual unlearning of a stream of deletion requests ("FIT: Defying Catastrophic
Forgetting in Continual LLM Unlearning", 2026): Filtering of redundant chunks, an Importance-aware
choice of update, and Targeted layer attribution.

Per request (lethe.methods.continual: bind(model, ...), then handle(request) per request):

1. Filtering. Each chunk is embedded (`embedding`: "model", the bound model's last hidden states
   mean-pooled over the chunk's tokens; or a sentence-transformers model directory, as the paper's
   SimCSE). A chunk whose largest cosine similarity to the memory of earlier chunks is below `tau`
   is kept. Otherwise it is kept only if removing it changes the model's loss on the request by
   more than `epsilon`. lethe's reading of that change: the request's loss as the mean over its
   chunks of the model's length-normalised answer probability (what unlearning drives down), so a
   chunk's removal changes it by its own probability p_c, up to the 1/n of the mean; the chunk is
   kept when p_c > epsilon, i.e. when the model still holds it. A near-duplicate of a request that
   was unlearned before scores near 0 and is dropped; a similar-looking chunk the model still knows
   (another person's fact in the same template) is kept. `filter_test="loss_change"` is the
   authors' code's test instead: |L(request) - L(request without the chunk)| > epsilon with L the
   request's mean token cross-entropy (RESULTS.md: on the benchmark it keeps the unlearnt repeats,
   whose loss is far from the rest's). The kept chunks join the memory (as the authors').
2. Importance. s = ||dL/dE||, L the request's mean answer cross-entropy and E the input
   embeddings of its tokens (the authors' code: the Frobenius norm over every token). s >= `s_high`: NPO with the retain term (the request is tied
   into the model; protect the rest); `s_low` <= s < `s_high`: NPO; s < `s_low`: random-label
   training (a cheap update for a weakly held request).
3. Attribution. Each decoder layer's parameters are zeroed in turn, the loss on the request (its
   first `attribution_tokens` answer tokens) is measured, and the parameters are copied back (one
   layer's copy at a time, never a copy of the model). The `top_layers` layers with the largest
   |delta L| have their attention and MLP parameters trained, `steps` AdamW steps at `lr`.

The losses are lethe's fused ones (NPO on `sequence_nll`, the retain cross-entropy, the random
labels' cross-entropy, all `fused_linear_topk_kl` with K = 1). The thresholds are lethe's
calibration on the built-in benchmark (benchmarks/RESULTS.md, FIT), not the paper's: they depend
on the embedding and on the model."""
from __future__ import annotations

import dataclasses
import re
import torch
import torch.nn.functional as F

from lethe.methods.base import Method, check_number, check_weight, frozen_sequence_nll, mean_nll, register, sequence_nll
from lethe.methods.continual import ContinualMethod

__all__ = ["FIT", "FITConfig", "decoder_layers", "ROUTES"]

ROUTES = ("npo_rt", "npo", "random_label")


@dataclasses.dataclass(frozen=True)
class FITConfig:
    """FIT's settings. The paper's values for its 7B models and SimCSE did not carry over (and were
    not available to us): these are lethe's calibration on the built-in benchmark (RESULTS.md, FIT)."""

    tau: float = 0.5  # cosine similarity below which a chunk is new
    # a similar chunk is kept while the model's answer probability exceeds this (an unlearnt chunk
    # ends a request at target_prob or below; the benchmark's novel facts sit near 1)
    epsilon: float = 0.5
    embedding: str = "model"  # "model", or a sentence-transformers model directory
    # the test a similar chunk must pass to be kept: "probability" (lethe's: its answer probability
    # > epsilon) or "loss_change" (the authors' code: |L(request) - L(request without it)| > epsilon,
    # L the mean answer-token cross-entropy)
    filter_test: str = "probability"
    # the importance thresholds: the terciles of s over the built-in stream on the target model
    s_low: float = 0.033  # below: random-label training
    s_high: float = 0.045  # at or above: NPO with the retain term
    top_layers: int = 1  # decoder layers trained per request
    attribution_tokens: int = 256  # answer tokens of the request the attribution's loss reads
    steps: int = 8  # AdamW steps per request, at most
    # a request's update stops once its kept chunks' mean answer probability is at most this (lethe's
    # guard against over-forgetting, which F.D. penalises: about the retrained model's level)
    target_prob: float = 0.3
    lr: float = 3e-4
    beta: float = 0.1  # NPO's
    alpha: float = 5.0  # weight of the retain term (NPO's loss is on a 2 / beta scale)
    retain_batch: int = 16
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for f in ("tau", "epsilon", "target_prob"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
                raise ValueError(f"FITConfig: {f} must be a number in [-1, 1], got {v!r}")
        check_weight(self, "s_low", "s_high", "alpha", "clip")
        if self.s_high < self.s_low:
            raise ValueError(f"FITConfig: s_high ({self.s_high}) must be >= s_low ({self.s_low})")
        for f in ("top_layers", "attribution_tokens", "steps", "retain_batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FITConfig: {f} must be a positive int, got {v!r}")
        check_number(self, "lr", positive=True)
        check_number(self, "beta", positive=True)
        if self.filter_test not in ("probability", "loss_change"):
            raise ValueError(f"FITConfig: filter_test must be 'probability' or 'loss_change', got {self.filter_test!r}")
        if not isinstance(self.embedding, str) or not self.embedding:
            raise ValueError(f"FITConfig: embedding must be 'model' or a sentence-transformers directory, got "
                             f"{self.embedding!r}")


def decoder_layers(model) -> list:
    """[(name, module)] of the model's decoder blocks: the longest numbered ModuleList (Llama's
    model.layers, GPT-2's transformer.h)."""
    best = None
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and (best is None or len(m) > len(best[1])):
            best = (n, m)
    if best is None:
        raise ValueError(f"model: {type(model).__name__} has no list of decoder blocks (torch.nn.ModuleList)")
    return [(f"{best[0]}.{i}", b) for i, b in enumerate(best[1])]


def _trained(block) -> list:
    """A block's attention and MLP parameters (not its norms)."""
    out = []
    for n, p in block.named_parameters():
        parts = n.split(".")
        if any(re.search(r"attn|attention|mlp|feed_forward|ffn", x) for x in parts[:-1]):
            out.append(p)
    if not out:
        raise ValueError("model: a decoder block has no attention or MLP submodule (named *attn*, *mlp*)")
    return out


def _random_label_nll(model, batch, g: torch.Generator):
    """Mean cross-entropy of uniformly random labels (not the true one) at the answer positions."""
    from lethe.methods.base import answer_rows
    from lethe.ops import fused_linear_topk_kl

    h, w, b, lab, _, _ = answer_rows(model, batch)
    V = w.shape[0]
    r = torch.randint(V - 1, lab.shape, generator=g).to(lab.device)
    r = r + (r >= lab).long()  # skip the true label
    tgt = r.unsqueeze(-1)
    return fused_linear_topk_kl(h, w, tgt, torch.ones(tgt.shape, device=h.device), bias=b)


@register
class FIT(ContinualMethod, Method):
    name = "fit"
    Config = FITConfig
    uses_retain = True

    def bind(self, model, tokenizer, retain=None, checkpoint_dir=None, progress: bool = False):
        c = self.config
        n = len(decoder_layers(model))
        if c.top_layers > n:
            raise ValueError(f"FITConfig: top_layers={c.top_layers} is larger than the model's {n} decoder layers")
        self._memory = None
        self._encoder = None
        if c.embedding != "model":
            self._encoder = _sentence_encoder(c.embedding)
        return super().bind(model, tokenizer, retain, checkpoint_dir, progress)

    def _continual_state(self) -> dict:
        return {"memory": self._memory}

    def _load_continual(self, d: dict) -> None:
        self._memory = d["memory"]

    # -- 1. filtering --------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, exs, enc) -> torch.Tensor:
        """[n, D] unit embeddings of the chunks."""
        if self._encoder is not None:
            e = torch.as_tensor(self._encoder.encode([x.text for x in exs]), dtype=torch.float32)
            return F.normalize(e, dim=-1)
        from lethe.integrations import hf
        from lethe.methods.base import frozen

        with frozen(self.model) as dev:
            out = []
            for b in enc.batches(64, dev):
                h, _, _ = hf.last_hidden_and_head(self.model, b["input_ids"], b["attention_mask"])
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def chunk_nll(self, enc):
        """([n] summed answer-token NLL, [n] answer tokens) of each chunk under the model."""
        from lethe.methods.base import frozen

        with frozen(self.model) as dev:
            nll, cnt = zip(*((x.cpu(), c.cpu()) for x, c in (sequence_nll(self.model, b) for b in enc.batches(64, dev))))
        return torch.cat(nll).double(), torch.cat(cnt).double()

    def answer_probability(self, enc) -> torch.Tensor:
        """[n] the model's length-normalised answer probability of each chunk."""
        nll, cnt = self.chunk_nll(enc)
        return torch.exp(-nll / cnt).float()

    def filter(self, exs, enc):
        """(kept [n] bool, max similarity [n], answer probability [n]); adds the chunks to the memory."""
        c = self.config
        e = self.embed(exs, enc)
        if self._memory is None or not len(self._memory):  # nothing before: every chunk is new
            sim = torch.full((len(exs),), -1.0)
        else:
            sim = (e @ self._memory.T).max(1).values
        nll, cnt = self.chunk_nll(enc)
        p = torch.exp(-nll / cnt).float()
        if c.filter_test == "probability":
            passed = p > c.epsilon
        else:  # the request's mean token loss with and without the chunk (and its exact repeats)
            texts = [x.text for x in exs]
            same = torch.tensor([[a == b for b in texts] for a in texts])
            s_all, n_all = nll.sum(), cnt.sum()
            s_wo = s_all - (same.double() @ nll)
            n_wo = n_all - (same.double() @ cnt)
            l_wo = torch.where(n_wo > 0, s_wo / n_wo.clamp(min=1), torch.zeros_like(s_wo))
            passed = (s_all / n_all - l_wo).abs().float() > c.epsilon
        kept = (sim < c.tau) | passed
        # the memory holds the kept chunks (the authors' rule: a dropped one is a repeat of what is there)
        self._memory = e[kept] if self._memory is None else torch.cat([self._memory, e[kept]])
        return kept, sim, p

    # -- 2. importance -------------------------------------------------------------------------
    def importance(self, batch) -> float:
        """||dL/dE|| (Frobenius, over every token, as the authors' code): L the mean answer
        cross-entropy of the request, E its input embeddings."""
        emb = self.model.get_input_embeddings()
        seen = {}

        def hook(mod, inp, out):
            out = out.detach().requires_grad_(True)
            seen["e"] = out
            return out

        h = emb.register_forward_hook(hook)
        was = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                loss = mean_nll(self.model, batch)
                (g,) = torch.autograd.grad(loss, seen["e"])
        finally:
            h.remove()
            self.model.train(was)
        return float(g.float().norm())

    def route(self, s: float) -> str:
        c = self.config
        return "npo_rt" if s >= c.s_high else ("npo" if s >= c.s_low else "random_label")

    # -- 3. attribution ------------------------------------------------------------------------
    @torch.no_grad()
    def attribution(self, batch) -> list:
        """|delta L| per decoder layer when its parameters are zeroed (restored exactly after)."""
        from lethe.methods.base import frozen

        lab = batch["labels"]
        # bound the tokens: the first attribution_tokens answer tokens of the request
        count = (lab != -100).long().flatten().cumsum(0).view_as(lab)
        lab = lab.masked_fill(count > self.config.attribution_tokens, -100)
        b = {**batch, "labels": lab}
        out = []
        with frozen(self.model):
            base = float(mean_nll(self.model, b))
            for _, block in decoder_layers(self.model):
                params = list(block.parameters())
                saved = [p.detach().clone() for p in params]
                try:
                    for p in params:
                        p.zero_()
                    out.append(abs(float(mean_nll(self.model, b)) - base))
                finally:
                    for p, s in zip(params, saved):
                        p.copy_(s)
                del saved
        return out

    # -- the update ----------------------------------------------------------------------------
    def _handle(self, model, exs, enc) -> dict:
        from lethe.methods.base import Encoded
        from lethe.methods.driver import _positions

        c = self.config
        kept, sim, p = self.filter(exs, enc)
        entry = {"kept": int(kept.sum()), "kept_mask": kept.tolist(), "similarity": [round(float(x), 4) for x in sim],
                 "answer_probability": [round(float(x), 4) for x in p]}
        if not kept.any():
            return {**entry, "update": None, "layers": [], "importance": None}
        sub = Encoded([enc.rows[i] for i in range(len(exs)) if kept[i]], enc.pad_id, enc.what)
        dev = next(model.parameters()).device
        batch = sub.batch(range(len(sub)), dev)
        s = self.importance(batch)
        route = self.route(s)
        scores = self.attribution(batch)
        blocks = decoder_layers(model)
        top = sorted(range(len(blocks)), key=lambda i: -scores[i])[:c.top_layers]
        params = [q for i in sorted(top) for q in _trained(blocks[i][1])]
        ref = frozen_sequence_nll(model, sub).to(dev) if route != "random_label" else None
        idx = len(self.requests_log)
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + idx)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        frozen_params = [q for q in model.parameters() if q.requires_grad and not any(q is x for x in params)]
        for q in frozen_params:
            q.requires_grad_(False)
        model.train()
        losses = []
        try:
            for step in range(c.steps):
                with torch.set_grad_enabled(route != "random_label"):
                    nll, cnt = sequence_nll(model, batch)
                prob = float(torch.exp(-nll.detach() / cnt).mean())
                if prob <= c.target_prob:
                    break
                if route == "random_label":
                    loss = _random_label_nll(model, batch, g)
                else:
                    loss = -(2.0 / c.beta) * F.logsigmoid(-c.beta * (ref - nll)).mean()
                    if route == "npo_rt":
                        rows = _positions(len(self.retain), min(c.retain_batch, len(self.retain)), c.seed,
                                          idx * c.steps + step, 1)
                        loss = loss + c.alpha * mean_nll(model, self.retain.batch(rows, dev))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fit: the loss is {loss.item()} at step {step} of request {idx}; "
                                             "lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.clip:
                    torch.nn.utils.clip_grad_norm_(params, c.clip)
                opt.step()
                losses.append(loss.item())
        finally:
            for q in frozen_params:
                q.requires_grad_(True)
            for q in params:
                q.grad = None
            model.eval()
        if len(losses) == c.steps:  # the last step's effect
            with torch.no_grad():
                nll, cnt = sequence_nll(model, batch)
            prob = float(torch.exp(-nll / cnt).mean())
        return {**entry, "importance": s, "update": route, "attribution": scores,
                "layers": [blocks[i][0] for i in sorted(top)], "steps": len(losses),
                "loss": losses[-1] if losses else None, "answer_probability_after": prob}


def _sentence_encoder(path: str):
    from pathlib import Path

    if not Path(path).is_dir():
        raise ValueError(f"FITConfig: embedding must be 'model' or a sentence-transformers model directory; "
                         f"{path!r} is not a directory")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError(f"FITConfig: embedding={path!r} needs the sentence-transformers package "
                         "(pip install sentence-transformers)") from None
    return SentenceTransformer(path, device="cpu")
