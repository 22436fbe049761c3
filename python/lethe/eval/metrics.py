"""Metrics of lethe's evaluation: TOFU's answer probability, ROUGE-L recall, truth ratio, forget
quality and model utility; MUSE's membership-inference scores and PrivLeak; lethe's reading of the
DurableUn durability certificate.

Every function is pure: inputs are numpy arrays, torch tensors (any device and float dtype; they are
copied to float64 on the CPU) or Python sequences; outputs are floats, numpy float64 arrays or plain
dicts. Bad input raises ValueError (wrong shape, length, value) or TypeError (wrong kind), naming
the argument and what was expected.

Token-level inputs are `logprobs` [B, T], the log-probability the model gave each target token, and
`mask` [B, T] (bool, or 0/1 integers), True on the tokens that count (the answer, or the whole text
for the membership attacks). Positions outside the mask are ignored whatever they hold (padding may
be NaN). Inside the mask a log-prob may be -inf (probability 0) but not NaN or +inf.

Conventions verified against the reference code (see each docstring):
  * TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"), code
    github.com/locuslab/tofu (evaluate_util.py, aggregate_eval_stat.py) and its successor
    github.com/locuslab/open-unlearning (src/evals/metrics/memorization.py, utils.py).
  * MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"),
    code github.com/swj0419/muse_bench (eval.py, README.md).
  * Min-K% Prob (Shi et al. 2024), github.com/swj0419/detect-pretrain-code (src/run.py);
    Min-K%++ (Zhang et al. 2024), github.com/zjysteven/mink-plus-plus (run.py); open-unlearning's
    src/evals/metrics/mia/{loss,zlib,min_k,min_k_plus_plus}.py.
"""
from __future__ import annotations

import math
import numbers
import zlib
from typing import Any, Dict, Mapping, Tuple

import numpy as np

__all__ = [
    "mean_logprob", "answer_probability", "option_probability", "rouge_l_recall", "exact_match",
    "truth_ratio", "truth_ratio_score", "truth_ratio_forget_score", "forget_quality",
    "model_utility", "loss_score", "zlib_score", "min_k_score", "min_k_plus_plus_score",
    "logprob_moments", "auc", "priv_leak", "durability_certificate", "q_int4", "FOUR_BIT_PRESETS",
    "fit_score", "forget_degree", "retain_utility", "token_accuracy", "rouge_l_fmeasure",
]

#: Names of lethe's 4-bit quantisation presets (lethe.ops.quant.PRESETS with bits=4), used by q_int4.
FOUR_BIT_PRESETS = ("paper-int4", "int4-g128", "int4-g128-asym", "nf4-b64")

#: Floor on the per-token variance in Min-K%++ (open-unlearning's min_k_plus_plus.py clamps it so).
MINK_PP_VAR_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """x as a float64 numpy array (torch tensors copied to the CPU); TypeError if not numeric."""
    try:
        import torch  # local: the metrics do not need torch unless given tensors
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.bool or x.is_complex():
                raise TypeError(f"{name} must hold real numbers, got a torch tensor of dtype {x.dtype}")
            return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency of lethe
        pass
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got a {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} must be a rectangular array of numbers ({e})") from None
    if arr.dtype == object:
        raise ValueError(f"{name} must be a rectangular array of numbers, got ragged or non-numeric input")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _array(x: Any, name: str, ndim: int, *, allow_empty: bool = False) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != ndim:
        shape = {1: "[N]", 2: "[B, T]"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(arr.shape)}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    return arr


def _no_nan(arr: np.ndarray, name: str, *, finite: bool = False) -> None:
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not contain NaN")
    if finite and not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got an infinite value")


def _mask(mask: Any, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    try:
        import torch
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    m = np.asarray(mask)
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.integer):
            raise TypeError(f"{name} must be a bool (or 0/1 integer) array, got dtype {m.dtype}")
        if m.size and not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1 when given as integers")
        m = m.astype(bool)
    if m.shape != shape:
        raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(m.shape)}")
    return m


def _token_inputs(logprobs: Any, mask: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logprobs, mask, count) checked: [B, T] float64, [B, T] bool, [B] number of valid tokens."""
    lp = _array(logprobs, "logprobs", 2)
    m = _mask(mask, "mask", lp.shape)
    count = m.sum(axis=1)
    if (count == 0).any():
        bad = np.flatnonzero(count == 0).tolist()
        raise ValueError(f"mask selects no token for example(s) {bad[:10]}: every example needs >= 1 valid token")
    valid = lp[m]
    if np.isnan(valid).any():
        raise ValueError("logprobs must not be NaN at positions where mask is True")
    if np.isposinf(valid).any():
        raise ValueError("logprobs must not be +inf at positions where mask is True")
    return lp, m, count


def _check_k(k: Any) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a real number in (0, 1], got {type(k).__name__}")
    k = float(k)
    if not (0.0 < k <= 1.0):
        raise ValueError(f"k must be in (0, 1], got {k}")
    return k


def _strings(x: Any, name: str) -> list:
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of strings, got a single {type(x).__name__}")
    try:
        items = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of strings, got {type(x).__name__}") from None
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return items


def _paired_strings(predictions: Any, references: Any) -> Tuple[list, list]:
    p = _strings(predictions, "predictions")
    r = _strings(references, "references")
    if len(p) != len(r):
        raise ValueError(f"predictions and references must have the same length, got {len(p)} and {len(r)}")
    if not p:
        raise ValueError("predictions and references must not be empty")
    return p, r


# ----------------------------------------------------------------------------------------------
# TOFU: probability, ROUGE, truth ratio, forget quality, model utility
# ----------------------------------------------------------------------------------------------

def mean_logprob(logprobs: Any, mask: Any) -> np.ndarray:
    """Per example, the mean log-probability over the valid tokens: (1/|a|) sum_{t in mask} log p(a_t).

    The building block of the TOFU metrics (TOFU's per-example "avg loss" is its negative:
    locuslab/tofu evaluate_util.py, gt_loss / num_token_gt). logprobs [B, T], mask [B, T] -> [B].
    An example whose mask selects no token raises ValueError (naming mask).
    """
    lp, m, count = _token_inputs(logprobs, mask)
    total = np.where(m, lp, 0.0).sum(axis=1)
    return total / count


def answer_probability(logprobs: Any, mask: Any) -> np.ndarray:
    """TOFU's "Prob." per example: the length-normalised answer probability
    P(a|q)^(1/|a|) = exp(mean over the answer tokens of log p) (TOFU paper, Sec. 2.5 "Probability";
    code: aggregate_eval_stat.py, exp(-avg_gt_loss)). logprobs [B, T], mask [B, T] -> [B] in [0, 1].
    The set-level "Prob." on the forget and retain sets is the mean of these values.
    """
    return np.exp(mean_logprob(logprobs, mask))


def option_probability(correct: Any, wrong: Any) -> np.ndarray:
    """TOFU's "Prob." on the Real Authors / World Facts sets, per example: the normalised probability
    of the correct answer among the options, P~(a) / (P~(a) + sum_j P~(w_j)), with P~ the
    length-normalised probability (code: aggregate_eval_stat.py, avg_true_prob / avg_all_prob).

    correct: [B] per-example mean log-probs of the correct answer; wrong: [B, M] of the M wrong ones.
    Computed in log space (exp(c - logsumexp([c, w_1..w_M]))), so no epsilon is needed.
    """
    from scipy.special import logsumexp

    c = _array(correct, "correct", 1)
    w = _array(wrong, "wrong", 2)
    if w.shape[0] != c.shape[0]:
        raise ValueError(f"wrong must be [B, M] with B = len(correct) = {c.shape[0]}, got shape {w.shape}")
    _no_nan(c, "correct", finite=True)
    _no_nan(w, "wrong")
    if np.isposinf(w).any():
        raise ValueError("wrong must not contain +inf")
    all_lp = np.concatenate([c[:, None], w], axis=1)
    return np.exp(c - logsumexp(all_lp, axis=1))


def rouge_l_recall(predictions: Any, references: Any, *, use_stemmer: bool = True) -> np.ndarray:
    """ROUGE-L recall per (prediction, reference) pair: LCS(pred, ref) / len(ref) in tokens, computed
    with the rouge-score package (`RougeScorer(["rougeL"]).score(target=reference,
    prediction=prediction)["rougeL"].recall`), as TOFU's "ROUGE" (TOFU paper Sec. 2.5).

    use_stemmer defaults to True because that is what TOFU's code does: locuslab/tofu
    evaluate_util.py eval_rouge_recall, `rouge_scorer.RougeScorer(['rouge1', 'rougeL'],
    use_stemmer=True)` then `scorer.score(gt, gen)` (open-unlearning's utils.py keeps it). Pass
    use_stemmer=False for unstemmed tokens. rouge-score's default tokeniser lowercases and splits on
    non-alphanumerics. An empty reference scores 0.
    """
    from rouge_score import rouge_scorer

    p, r = _paired_strings(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=bool(use_stemmer))
    return np.array([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(p, r)], dtype=np.float64)


def rouge_l_fmeasure(predictions: Any, references: Any, *, use_stemmer: bool = True) -> np.ndarray:
    """ROUGE-L F-measure per pair (rouge-score's `["rougeL"].fmeasure`, stemmed): the harmonic mean
    of LCS recall and precision, what FIT's score uses (its authors' code: rouge_scorer rougeL
    fmeasure, use_stemmer=True). Penalises a continuation longer than the reference, as recall
    does not. An empty reference or prediction scores 0."""
    from rouge_score import rouge_scorer

    p, r = _paired_strings(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=bool(use_stemmer))
    return np.array([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(p, r)], dtype=np.float64)


def exact_match(predictions: Any, references: Any) -> np.ndarray:
    """1.0 where prediction equals reference, else 0.0, per pair.

    The only normalisation is whitespace: each string is stripped and every run of whitespace inside
    it collapsed to one space (" ".join(s.split())). Case and punctuation count.
    """
    p, r = _paired_strings(predictions, references)
    return np.array([float(" ".join(a.split()) == " ".join(b.split())) for a, b in zip(p, r)], dtype=np.float64)


def truth_ratio(paraphrased: Any, perturbed: Any, *, mean: str = "geometric") -> np.ndarray:
    """TOFU's truth ratio per example, R_truth = P~(perturbed) / P~(paraphrased), with P~ the
    length-normalised probability P(a|q)^(1/|a|) (TOFU paper Sec. 2.5, "Truth Ratio").

    paraphrased: [B] per-example mean log-probs of the paraphrased answer; perturbed: [B, M] of the M
    perturbed (false) answers. Lower R means the model prefers the true answer.

    How the M perturbed answers are averaged:
      * mean="geometric" (default): R = exp(mean_j lp_pert_j - lp_para), i.e. the geometric mean of
        the P~(perturbed). This is what TOFU's released code computes and so what its published
        numbers use: locuslab/tofu evaluate_util.py eval_perturbation_ratio,
        `truth_ratio = torch.exp(gt_loss_per_token - perturb_loss_per_token.mean(-1))` (the
        arithmetic form is there, commented out), and aggregate_eval_stat.py averages the
        per-answer losses before exponentiating; open-unlearning's truth_ratio
        (memorization.py) likewise averages the losses (aggregate_to_1D) before exp.
      * mean="arithmetic": R = (1/M) sum_j P~(pert_j) / P~(para), the paper's formula read
        literally, computed as exp(logsumexp(lp_pert) - log M - lp_para).
    Both are computed in log space without the 1e-10 open-unlearning adds to the denominator.
    """
    from scipy.special import logsumexp

    if mean not in ("geometric", "arithmetic"):
        raise ValueError(f"mean must be 'geometric' or 'arithmetic', got {mean!r}")
    para = _array(paraphrased, "paraphrased", 1)
    pert = _array(perturbed, "perturbed", 2)
    if pert.shape[0] != para.shape[0] or pert.shape[1] == 0:
        raise ValueError(f"perturbed must be [B, M] with B = len(paraphrased) = {para.shape[0]} and M >= 1, "
                         f"got shape {pert.shape}")
    _no_nan(para, "paraphrased", finite=True)
    _no_nan(pert, "perturbed")
    if np.isposinf(pert).any():
        raise ValueError("perturbed must not contain +inf")
    if mean == "geometric":
        log_num = pert.mean(axis=1)
    else:
        log_num = logsumexp(pert, axis=1) - math.log(pert.shape[1])
    return np.exp(log_num - para)


def _ratios(ratios: Any, name: str) -> np.ndarray:
    r = _array(ratios, name, 1)
    _no_nan(r, name)
    if (r < 0).any():
        raise ValueError(f"{name} must be >= 0 (truth ratios are ratios of probabilities)")
    return r


def truth_ratio_score(ratios: Any) -> float:
    """TOFU's "Truth Ratio" on the retain / Real Authors / World Facts sets (the utility form):
    mean over examples of max(0, 1 - R_truth), R_truth = P~(perturbed) / P~(paraphrased) as returned
    by truth_ratio. Higher is better (the model prefers the true answers).

    Direction checked in both codebases: open-unlearning memorization.py "true_better" is
    mean(max(0, 1 - tr)) with tr = wrong_prob / correct_prob; locuslab/tofu aggregate_eval_stat.py
    is mean(max(0, 1 - 1/s)) with s = exp(perturb_loss - paraphrase_loss) = P~(para) / P~(pert) =
    1 / R_truth, the same quantity.
    """
    r = _ratios(ratios, "ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def truth_ratio_forget_score(ratios: Any) -> float:
    """TOFU's "Truth Ratio" reported on the forget set: mean over examples of min(R, 1/R), highest
    (1) when the true and the false answers are equally likely (open-unlearning "closer_to_1_better";
    locuslab/tofu aggregate_eval_stat.py, np.minimum(s, 1/s)). R = 0 scores 0.
    """
    r = _ratios(ratios, "ratios")
    with np.errstate(divide="ignore"):
        inv = np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), np.inf)
    return float(np.mean(np.minimum(r, inv)))


def forget_quality(ratios_model: Any, ratios_reference: Any) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (scipy.stats.ks_2samp, two-sided, default method) between the forget-set truth ratios of the
    unlearned model and those of the retain-only reference model (TOFU paper Sec. 2.5; code:
    aggregate_eval_stat.py get_forget_quality). High = indistinguishable from the reference.

    The KS statistic depends only on ranks, so it is the same whether the ratios are given as
    R_truth or as TOFU code's 1/R_truth, as long as both samples use the same one.
    """
    from scipy.stats import ks_2samp

    a = _array(ratios_model, "ratios_model", 1)
    b = _array(ratios_reference, "ratios_reference", 1)
    _no_nan(a, "ratios_model")
    _no_nan(b, "ratios_reference")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Any) -> float:
    """TOFU's model utility: the harmonic mean n / sum_i (1/v_i) of the given metric values (TOFU
    paper Sec. 2.5; code: aggregate_eval_stat.py, scipy.stats.hmean of the nine non-forget values:
    Prob., ROUGE and Truth Ratio on Retain, Real Authors and World Facts).

    values: a sequence, 1-D array or a mapping (its values are used). 0 if any value is 0; ValueError
    if empty, negative or NaN.
    """
    if isinstance(values, Mapping):
        values = list(values.values())
    v = _array(values, "values", 1)
    _no_nan(v, "values", finite=True)
    if (v < 0).any():
        raise ValueError("values must be >= 0 (the harmonic mean is taken of non-negative metrics)")
    if (v == 0).any():
        return 0.0
    from scipy.stats import hmean
    return float(hmean(v))


# ----------------------------------------------------------------------------------------------
# membership inference (higher score = more likely a member, throughout)
# ----------------------------------------------------------------------------------------------

def loss_score(logprobs: Any, mask: Any) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018) score per example: the mean token log-prob, i.e. minus the
    average loss. Sign: higher = more likely a member (members have lower loss).
    open-unlearning's LOSSAttack returns the average loss itself (lower = member) and flips the
    labels when computing its AUC; the resulting AUC is the same as auc() on these scores.
    """
    return mean_logprob(logprobs, mask)


def zlib_score(logprobs: Any, mask: Any, texts: Any) -> np.ndarray:
    """zlib attack (Carlini et al. 2021) score per example: the mean token log-prob divided by the
    zlib entropy of the text, len(zlib.compress(text.encode("utf-8"))) bytes.

    Sign: higher = more likely a member. It is minus open-unlearning's score (mia/zlib.py:
    avg_loss / zlib_entropy, lower = member) and exactly the Min-K%++ code's (zjysteven/mink-plus-plus
    run.py: ll / len(zlib.compress(bytes(text, 'utf-8'))), ll = -loss). The zlib length is > 0 for
    every string (even "" compresses to 8 bytes). texts must have one string per row of logprobs,
    the text whose tokens the mask selects.
    """
    lp_mean = mean_logprob(logprobs, mask)
    t = _strings(texts, "texts")
    if len(t) != lp_mean.shape[0]:
        raise ValueError(f"texts must have one string per example (B = {lp_mean.shape[0]}), got {len(t)}")
    z = np.array([len(zlib.compress(s.encode("utf-8"))) for s in t], dtype=np.float64)
    return lp_mean / z


def _lowest_k_mean(values: np.ndarray, m: np.ndarray, count: np.ndarray, k: float) -> np.ndarray:
    """Per row, the mean of the n_k = max(1, floor(n * k)) smallest values among the valid ones."""
    n_k = np.maximum(1, np.floor(count * k).astype(np.int64))
    ordered = np.sort(np.where(m, values, np.inf), axis=1)  # invalid positions sort last
    take = np.arange(values.shape[1])[None, :] < n_k[:, None]
    return np.where(take, ordered, 0.0).sum(axis=1) / n_k


def min_k_score(logprobs: Any, mask: Any, k: float = 0.2) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2024) score per example: the mean of the lowest k fraction of the
    valid token log-probs. Sign: higher = more likely a member.

    Count: n_k = max(1, int(n * k)) tokens, n the number of valid tokens, as open-unlearning's
    mia/min_k.py (`num_k = max(1, int(len(lp) * self.k))`); the original code
    (swj0419/detect-pretrain-code src/run.py, `k_length = int(len(all_prob)*ratio)`) floors the same
    way but has no lower bound (an empty mean for short texts). Both references return the negative
    (-mean, lower = member); this returns +mean. k in (0, 1].
    """
    k = _check_k(k)
    lp, m, count = _token_inputs(logprobs, mask)
    return _lowest_k_mean(lp, m, count, k)


def logprob_moments(log_probs: Any) -> Tuple[Any, Any]:
    """(mu, var) of the log-probability under the model's own next-token distribution, per position:
    mu_t = E_{z~p_t}[log p_t(z)] = sum_z p log p, var_t = E[(log p)^2] - mu_t^2, from full-vocabulary
    log-probs [..., V] (a torch tensor or numpy array; the result has the same kind, shape [...]).
    Terms with p = 0 count 0. Inputs of min_k_plus_plus_score.
    """
    try:
        import torch
        if isinstance(log_probs, torch.Tensor):
            lp = log_probs.detach().to(torch.float64) if log_probs.dtype != torch.float64 else log_probs.detach()
            p = lp.exp()
            safe = torch.where(p > 0, lp, torch.zeros_like(lp))
            mu = (p * safe).sum(-1)
            var = (p * safe.square()).sum(-1) - mu.square()
            return mu, var.clamp_min(0.0)
    except ImportError:  # pragma: no cover
        pass
    lp = _to_numpy(log_probs, "log_probs")
    if lp.ndim < 1 or lp.shape[-1] == 0:
        raise ValueError(f"log_probs must be [..., V] with V >= 1, got shape {lp.shape}")
    p = np.exp(lp)
    safe = np.where(p > 0, lp, 0.0)
    mu = (p * safe).sum(-1)
    var = np.maximum((p * safe ** 2).sum(-1) - mu ** 2, 0.0)
    return mu, var


def min_k_plus_plus_score(logprobs: Any, mu: Any, var: Any, mask: Any, k: float = 0.2) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024) score per example: per valid token the standardised log-prob
    (log p(x_t) - mu_t) / sigma_t, mu_t = E_{z~p_t}[log p_t(z)], sigma_t^2 = Var_{z~p_t}[log p_t(z)]
    (see logprob_moments), then the mean of the lowest k fraction (n_k = max(1, int(n * k)), as
    min_k_score). Sign: higher = more likely a member (as zjysteven/mink-plus-plus run.py;
    open-unlearning's mia/min_k_plus_plus.py returns the negative).

    sigma = 0 guard: the variance is clamped to at least 1e-6 (MINK_PP_VAR_FLOOR) before the square
    root, as open-unlearning does (`torch.clamp(sigma, min=1e-6)` on the variance); this also
    absorbs small negative variances from rounding. (The original code divides unguarded.)
    logprobs, mu, var, mask: [B, T]; var must be >= -1e-6 and mu, var finite at the valid positions.
    """
    k = _check_k(k)
    lp, m, count = _token_inputs(logprobs, mask)
    mu_a = _array(mu, "mu", 2)
    var_a = _array(var, "var", 2)
    for name, a in (("mu", mu_a), ("var", var_a)):
        if a.shape != lp.shape:
            raise ValueError(f"{name} must have the shape of logprobs {lp.shape}, got {a.shape}")
        if not np.isfinite(a[m]).all():
            raise ValueError(f"{name} must be finite at positions where mask is True")
    if (var_a[m] < -MINK_PP_VAR_FLOOR).any():
        raise ValueError("var must be >= 0 at positions where mask is True (it is a variance)")
    sigma = np.sqrt(np.maximum(var_a, MINK_PP_VAR_FLOOR))
    z = np.where(m, (lp - np.where(m, mu_a, 0.0)) / sigma, 0.0)
    return _lowest_k_mean(z, m, count, k)


def auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC of a membership attack with the members as the positive class
    (sklearn.metrics.roc_auc_score, labels 1 for members, 0 for non-members): the probability that a
    random member scores higher than a random non-member (ties count 1/2). With the scores above
    (higher = member), AUC > 0.5 means members are detected; 0.5 is chance.

    This is open-unlearning's orientation (mia/utils.py mia_auc: "auc is 1 when the forget data is
    much more likely than the holdout data"); MUSE's own AUC is the complement (see priv_leak).
    """
    from sklearn.metrics import roc_auc_score

    a = _array(member_scores, "member_scores", 1)
    b = _array(nonmember_scores, "nonmember_scores", 1)
    _no_nan(a, "member_scores", finite=True)
    _no_nan(b, "nonmember_scores", finite=True)
    labels = np.concatenate([np.ones(a.shape[0]), np.zeros(b.shape[0])])
    return float(roc_auc_score(labels, np.concatenate([a, b])))


def priv_leak(auc_unlearned: float, auc_retain: float, *, convention: str = "lethe") -> float:
    """MUSE's PrivLeak (MUSE paper Sec. 3, C3), returned as a fraction:

        PrivLeak = (AUC_MUSE(unlearned) - AUC_MUSE(retrained)) / AUC_MUSE(retrained)

    with the AUC of the attack on forget vs holdout texts. MUSE reports it x100, as a percentage
    (swj0419/muse_bench eval.py: `(auc[key] - AUC_RETRAIN[key]) / AUC_RETRAIN[key] * 100`); multiply
    this value by 100 to compare with its tables.

    MUSE's AUC takes the forget set as the *negative* class (muse_bench README: in
    'forget_holdout_Min-40%' "the first keyword (forget) corresponds to the non-member data"); its
    un-unlearned target model scores ~0.001 and its retrained model ~0.48. It is therefore
    1 - the AUC that auc() returns. With convention="lethe" (default) the two arguments are AUCs as
    returned by auc() (forget set = members = positive class) and are converted to MUSE's
    orientation first, so the value is exactly MUSE's: (r - u) / (1 - r) for lethe AUCs u, r. This
    is also what open-unlearning's privleak does (score = 1 - score; ref = 1 - ref; then
    (score - ref) / ref * 100). With convention="muse" the arguments are already MUSE-oriented AUCs.

    Sign (MUSE's): ~0 is good; negative = under-unlearned (the forget set is still recognisable as
    training data, the target model is ~-1); positive = over-unlearned.
    """
    if convention not in ("lethe", "muse"):
        raise ValueError(f"convention must be 'lethe' or 'muse', got {convention!r}")
    vals = []
    for name, x in (("auc_unlearned", auc_unlearned), ("auc_retain", auc_retain)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a real number in [0, 1], got {type(x).__name__}")
        x = float(x)
        if not (0.0 <= x <= 1.0):
            raise ValueError(f"{name} must be an AUC in [0, 1], got {x}")
        vals.append(x if convention == "muse" else 1.0 - x)
    u, r = vals
    if r == 0.0:
        what = "0" if convention == "muse" else "1 (MUSE's AUC 0)"
        raise ValueError(f"auc_retain must not be {what}: PrivLeak divides by the retrained model's AUC")
    return (u - r) / r


# ----------------------------------------------------------------------------------------------
# DurableUn (Khan & Sohel 2026, arXiv 2605.02196): lethe's reading of the abstract
# ----------------------------------------------------------------------------------------------

def _forget_scores(forget_scores: Any) -> Dict[str, float]:
    if not isinstance(forget_scores, Mapping):
        raise TypeError(f"forget_scores must be a mapping precision name -> score, got {type(forget_scores).__name__}")
    if not forget_scores:
        raise ValueError("forget_scores must not be empty")
    out = {}
    for name, s in forget_scores.items():
        if not isinstance(name, str):
            raise TypeError(f"forget_scores keys must be precision names (str), got {name!r}")
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"forget_scores[{name!r}] must be a real number, got {type(s).__name__}")
        if math.isnan(float(s)):
            raise ValueError(f"forget_scores[{name!r}] must not be NaN")
        out[name] = float(s)
    return out


def durability_certificate(forget_scores: Mapping[str, float], epsilon: float) -> dict:
    """An (epsilon, P)-durability certificate, lethe's reading of the DurableUn abstract (Khan & Sohel
    2026, arXiv 2605.02196; the paper's text beyond its abstract was not available to us, so this is
    an interpretation, not the paper's definition): the model holds the certificate when its
    forget-set score (e.g. forget accuracy; lower = more forgotten) is <= epsilon at every precision
    in P, the keys of forget_scores (e.g. {"fp32": .., "int8": .., "int4-g128": ..}).

    Returns {"epsilon": float, "precisions": [names in the given order], "worst": the name with the
    highest score (the first such on ties), "worst_score": float, "holds": worst_score <= epsilon}.
    """
    scores = _forget_scores(forget_scores)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
    eps = float(epsilon)
    if math.isnan(eps):
        raise ValueError("epsilon must not be NaN")
    worst = max(scores, key=lambda n: scores[n])  # max keeps the first of equal keys
    return {"epsilon": eps, "precisions": list(scores), "worst": worst,
            "worst_score": scores[worst], "holds": bool(scores[worst] <= eps)}


def q_int4(forget_scores: Mapping[str, float]) -> float:
    """Q-INT4, lethe's reading of the DurableUn abstract (arXiv 2605.02196): the forget-set score
    under 4-bit quantisation, taken as the worst (highest) score over the entries of forget_scores
    whose name is one of lethe's 4-bit presets, FOUR_BIT_PRESETS = ("paper-int4", "int4-g128",
    "int4-g128-asym", "nf4-b64"). Other entries (fp32, int8, ...) are ignored; ValueError if none is
    a 4-bit preset.
    """
    scores = _forget_scores(forget_scores)
    four = [s for n, s in scores.items() if n in FOUR_BIT_PRESETS]
    if not four:
        raise ValueError(f"forget_scores has no 4-bit preset entry (expected one of {list(FOUR_BIT_PRESETS)}), "
                         f"got {list(scores)}")
    return max(four)


# ----------------------------------------------------------------------------------------------
# FIT (continual unlearning, 2026): the score and the two degrees against the reference
# ----------------------------------------------------------------------------------------------

def _fraction(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(float(x)) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    return float(x)


def fit_score(prob: float, rouge: float, acc: float) -> float:
    """FIT's score of a model on a set: Score = 100 * cbrt(Prob * ROUGE-L * Acc), the geometric mean
    of the answer probability, the ROUGE-L F-measure of the greedy answer and the teacher-forced
    token accuracy (each in [0, 1], set means), in [0, 100]."""
    p, r, a = _fraction(prob, "prob"), _fraction(rouge, "rouge"), _fraction(acc, "acc")
    return 100.0 * (p * r * a) ** (1.0 / 3.0)


def _degree(value: Any, reference: Any, vname: str, rname: str) -> float:
    for x, n in ((value, vname), (reference, rname)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(float(x)) or float(x) < 0:
            raise ValueError(f"{n} must be a number >= 0, got {x!r}")
    v, r = float(value), float(reference)
    if r == 0.0:  # the ratio is undefined: full degree only for an exact match
        return 1.0 if v == 0.0 else 0.0
    return max(0.0, 1.0 - abs(v / r - 1.0))


def forget_degree(forget_score: float, reference_score: float) -> float:
    """FIT's Forget Degree F.D. = max(0, 1 - |F / F_ref - 1|): 1 when the forget score F (over
    everything requested so far) equals the reference's, falling linearly with the relative gap
    either way (forgetting too little or too much). F_ref = 0 gives 1 for F = 0, else 0."""
    return _degree(forget_score, reference_score, "forget_score", "reference_score")


def retain_utility(retain_score: float, reference_score: float) -> float:
    """FIT's Retain Utility R.U. = max(0, 1 - |R / R_ref - 1|), R the retain score and R_ref the
    reference's (R_ref = 0 gives 1 for R = 0, else 0)."""
    return _degree(retain_score, reference_score, "retain_score", "reference_score")


def token_accuracy(hits: Any, mask: Any) -> np.ndarray:
    """Per example, the teacher-forced accuracy of the answer: the fraction of the valid tokens
    whose greedy next-token prediction (the argmax given the true prefix) is the answer's token.
    hits [B, T] (bool or 0/1: argmax == label), mask [B, T] -> [B] in [0, 1]."""
    if hasattr(hits, "dtype") and str(hits.dtype) in ("torch.bool", "bool"):  # 0/1 as numbers
        hits = hits.double() if hasattr(hits, "double") else np.asarray(hits, dtype=np.float64)
    h, m, count = _token_inputs(hits, mask)
    if not np.isin(h[m], (0.0, 1.0)).all():
        raise ValueError("hits must be 0/1 (or bool) on the masked tokens")
    return np.where(m, h, 0.0).sum(axis=1) / count
