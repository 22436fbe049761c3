"""Tests of lethe.eval.metrics: each metric against a value computed here by another route (explicit
loops, math, a hand-counted LCS), against scipy / scikit-learn where they define the metric, the
sign conventions of the membership scores, edge cases and the bad-input errors."""
import math
import re
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp
from sklearn.metrics import roc_auc_score

from lethe.eval import metrics as M


# ---------------------------------------------------------------------------------------------
# helpers: the reference computations, written as plain loops
# ---------------------------------------------------------------------------------------------

def _random_tokens(rng, b=5, t=9, nan_pad=True):
    lp = -rng.gamma(2.0, 1.0, size=(b, t))
    mask = rng.random((b, t)) < 0.7
    mask[np.arange(b), rng.integers(0, t, size=b)] = True  # every row has a valid token
    if nan_pad:
        lp = np.where(mask, lp, np.nan)  # padding may hold anything
    return lp, mask


def _valid(lp, mask, i):
    return [float(lp[i, j]) for j in range(lp.shape[1]) if mask[i, j]]


def _loop_mean(lp, mask):
    out = []
    for i in range(lp.shape[0]):
        v = _valid(lp, mask, i)
        out.append(sum(v) / len(v))
    return out


def _loop_lowest_k(values, k):
    n_k = max(1, int(len(values) * k))
    return sum(sorted(values)[:n_k]) / n_k


def _tokens(s):  # rouge-score's default tokenisation without stemming: lowercase, alphanumeric runs
    return re.findall(r"[a-z0-9]+", s.lower())


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


# ---------------------------------------------------------------------------------------------
# mean log-prob, answer probability
# ---------------------------------------------------------------------------------------------

def test_mean_logprob_and_answer_probability_match_loops():
    rng = np.random.default_rng(0)
    lp, mask = _random_tokens(rng)
    want = _loop_mean(lp, mask)
    np.testing.assert_allclose(M.mean_logprob(lp, mask), want, rtol=1e-12)
    np.testing.assert_allclose(M.answer_probability(lp, mask), [math.exp(x) for x in want], rtol=1e-12)


def test_answer_probability_hand_value():
    # one answer of 2 tokens with p = 1/2 and 1/8: geometric mean (1/16)^(1/2) = 1/4
    lp = [[math.log(0.5), math.log(0.125), 0.0]]
    mask = [[True, True, False]]
    assert M.answer_probability(lp, mask)[0] == pytest.approx(0.25)


def test_torch_inputs_and_int_mask_agree_with_numpy():
    rng = np.random.default_rng(1)
    lp, mask = _random_tokens(rng, nan_pad=False)
    ref = M.mean_logprob(lp, mask)
    np.testing.assert_allclose(M.mean_logprob(torch.tensor(lp), torch.tensor(mask)), ref, rtol=1e-12)
    np.testing.assert_allclose(M.mean_logprob(torch.tensor(lp, dtype=torch.float32), mask.astype(int)), ref,
                               rtol=1e-6)
    bf = torch.tensor(lp, dtype=torch.bfloat16)
    np.testing.assert_allclose(M.mean_logprob(bf, mask), _loop_mean(bf.double().numpy(), mask), rtol=1e-12)


def test_minus_inf_logprob_gives_probability_zero():
    p = M.answer_probability([[-math.inf, -1.0]], [[True, True]])
    assert p[0] == 0.0


def test_token_input_errors():
    lp = np.full((2, 3), -1.0)
    ok = np.ones((2, 3), bool)
    empty_row = ok.copy()
    empty_row[1] = False
    with pytest.raises(ValueError, match="mask"):
        M.answer_probability(lp, empty_row)
    with pytest.raises(ValueError, match="mask"):
        M.mean_logprob(lp, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="logprobs"):
        M.mean_logprob(lp[0], ok[0])
    with pytest.raises(ValueError, match="logprobs"):
        M.mean_logprob(np.zeros((0, 3)), np.zeros((0, 3), bool))
    nan = lp.copy()
    nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.mean_logprob(nan, ok)
    pinf = lp.copy()
    pinf[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        M.mean_logprob(pinf, ok)
    with pytest.raises(TypeError, match="mask"):
        M.mean_logprob(lp, ok.astype(float))
    with pytest.raises(ValueError, match="mask"):
        M.mean_logprob(lp, np.full((2, 3), 2))
    with pytest.raises(TypeError, match="logprobs"):
        M.mean_logprob(ok, ok)
    with pytest.raises(ValueError, match="logprobs"):
        M.mean_logprob([[-1.0, -2.0], [-1.0]], ok)  # ragged


def test_option_probability_matches_loop():
    rng = np.random.default_rng(2)
    c = -rng.gamma(2.0, 1.0, size=4)
    w = -rng.gamma(2.0, 1.0, size=(4, 3))
    want = [math.exp(c[i]) / (math.exp(c[i]) + sum(math.exp(x) for x in w[i])) for i in range(4)]
    np.testing.assert_allclose(M.option_probability(c, w), want, rtol=1e-12)
    with pytest.raises(ValueError, match="wrong"):
        M.option_probability(c, w[:3])


# ---------------------------------------------------------------------------------------------
# ROUGE-L recall, exact match
# ---------------------------------------------------------------------------------------------

PAIRS = [
    ("The cat sat on the mat.", "the cat was sitting on a mat"),
    ("Alice was born in Paris in 1970", "She was born in 1970, in Paris"),
    ("completely unrelated words", "the author wrote novels"),
    ("", "nonempty reference"),
    ("a b c d", "a b c d"),
]


def test_rouge_l_recall_matches_hand_lcs_without_stemming():
    got = M.rouge_l_recall([p for p, _ in PAIRS], [r for _, r in PAIRS], use_stemmer=False)
    want = [_lcs(_tokens(p), _tokens(r)) / len(_tokens(r)) for p, r in PAIRS]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[-1] == 1.0 and got[2] == 0.0 and got[3] == 0.0


def test_rouge_l_recall_hand_counted_example():
    # ref "the cat sat on the mat" (6 tokens), pred "the mat sat on the cat": LCS "the sat on the" = 4
    got = M.rouge_l_recall(["the mat sat on the cat"], ["the cat sat on the mat"], use_stemmer=False)
    assert got[0] == pytest.approx(4 / 6)


def test_rouge_l_recall_default_stems_like_tofu():
    # TOFU's scorer uses the Porter stemmer: "cats"/"sitting" match "cat"/"sit"
    pred, ref = ["the cats are sitting"], ["the cat is sit"]
    plain = M.rouge_l_recall(pred, ref, use_stemmer=False)[0]
    stemmed = M.rouge_l_recall(pred, ref)[0]
    assert plain == pytest.approx(_lcs(_tokens(pred[0]), _tokens(ref[0])) / 4)  # only "the"
    assert stemmed == pytest.approx(_lcs(["the", "cat", "are", "sit"], ["the", "cat", "is", "sit"]) / 4)
    assert stemmed > plain


def test_string_metric_errors():
    for fn in (M.rouge_l_recall, M.exact_match):
        with pytest.raises(ValueError, match="same length"):
            fn(["a", "b"], ["a"])
        with pytest.raises(ValueError, match="empty"):
            fn([], [])
        with pytest.raises(TypeError, match="predictions"):
            fn("a single string", ["x"])
        with pytest.raises(TypeError, match=r"references\[1\]"):
            fn(["a", "b"], ["a", 3])


def test_exact_match_whitespace_only_normalisation():
    preds = ["  Paris ", "New   York\n", "paris", "Paris.", "a b"]
    refs = ["Paris", "New York", "Paris", "Paris", "ab"]
    want = [float(" ".join(p.split()) == " ".join(r.split())) for p, r in zip(preds, refs)]
    got = M.exact_match(preds, refs)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, [1.0, 1.0, 0.0, 0.0, 0.0])  # case and punctuation count


# ---------------------------------------------------------------------------------------------
# truth ratio, its scores, forget quality, model utility
# ---------------------------------------------------------------------------------------------

def test_truth_ratio_geometric_and_arithmetic_match_loops():
    rng = np.random.default_rng(3)
    para = -rng.gamma(2.0, 1.0, size=6)
    pert = -rng.gamma(2.0, 1.0, size=(6, 5))
    geo = [math.exp(sum(pert[i]) / 5 - para[i]) for i in range(6)]
    ari = [(sum(math.exp(x) for x in pert[i]) / 5) / math.exp(para[i]) for i in range(6)]
    np.testing.assert_allclose(M.truth_ratio(para, pert), geo, rtol=1e-12)
    np.testing.assert_allclose(M.truth_ratio(para, pert, mean="geometric"), geo, rtol=1e-12)
    np.testing.assert_allclose(M.truth_ratio(para, pert, mean="arithmetic"), ari, rtol=1e-12)
    assert (M.truth_ratio(para, pert) <= M.truth_ratio(para, pert, mean="arithmetic") + 1e-15).all()  # AM-GM


def test_truth_ratio_matches_tofu_loss_form():
    # TOFU's code: truth_ratio = exp(gt_loss_per_token - perturb_loss_per_token.mean(-1)), losses = -logprobs
    para = np.array([-0.7, -2.0])
    pert = np.array([[-1.2, -3.0, -0.1], [-2.0, -2.0, -2.0]])
    gt_loss, pert_loss = -para, -pert
    np.testing.assert_allclose(M.truth_ratio(para, pert), np.exp(gt_loss - pert_loss.mean(-1)), rtol=1e-12)
    assert M.truth_ratio(para, pert)[1] == pytest.approx(1.0)


def test_truth_ratio_arithmetic_is_stable_in_log_space():
    # exp(-1000) underflows; the ratio (1 + e^-1) / 2 must survive
    r = M.truth_ratio([-1000.0], [[-1000.0, -1001.0]], mean="arithmetic")
    assert r[0] == pytest.approx((1 + math.exp(-1)) / 2, rel=1e-12)


def test_truth_ratio_errors():
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratio([-1.0, -2.0], [[-1.0], [-2.0], [-3.0]])
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratio([-1.0], [-1.0])
    with pytest.raises(ValueError, match="paraphrased"):
        M.truth_ratio([np.nan], [[-1.0]])
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratio([-1.0], [[np.nan]])
    with pytest.raises(ValueError, match="mean"):
        M.truth_ratio([-1.0], [[-1.0]], mean="harmonic")


def test_truth_ratio_scores_match_both_codebases_forms():
    r = np.array([0.1, 0.5, 1.0, 2.0, 0.0])
    want = sum(max(0.0, 1 - x) for x in r) / len(r)
    assert M.truth_ratio_score(r) == pytest.approx(want)
    s = 1 / r[:-1]  # TOFU code's statistic P(para)/P(pert): mean(max(0, 1 - 1/s))
    assert M.truth_ratio_score(r[:-1]) == pytest.approx(np.mean(np.maximum(0, 1 - 1 / s)))
    want_forget = sum(min(x, 1 / x) if x > 0 else 0.0 for x in r) / len(r)
    assert M.truth_ratio_forget_score(r) == pytest.approx(want_forget)
    with pytest.raises(ValueError, match="ratios"):
        M.truth_ratio_score([-0.1])
    with pytest.raises(ValueError, match="ratios"):
        M.truth_ratio_forget_score([np.nan])


def test_forget_quality_is_ks_pvalue():
    rng = np.random.default_rng(4)
    a, b = rng.lognormal(size=40), rng.lognormal(0.3, size=30)
    assert M.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    assert M.forget_quality(a, 1 / (1 / a)) == pytest.approx(1.0)
    # ranks only: R or TOFU code's 1/R give the same p-value
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(M.forget_quality(a, b))
    assert M.forget_quality(a, a + 100) < 1e-6
    with pytest.raises(ValueError, match="ratios_reference"):
        M.forget_quality(a, [])
    with pytest.raises(ValueError, match="ratios_model"):
        M.forget_quality([np.nan, 1.0], b)


def test_model_utility_harmonic_mean():
    vals = [0.9, 0.4, 0.55, 0.7, 0.35, 0.6, 0.8, 0.45, 0.5]
    want = len(vals) / sum(1 / v for v in vals)
    assert M.model_utility(vals) == pytest.approx(want)
    assert M.model_utility(vals) == pytest.approx(hmean(vals))
    d = {f"m{i}": v for i, v in enumerate(vals)}
    assert M.model_utility(d) == pytest.approx(want)
    assert M.model_utility(np.array(vals)) == pytest.approx(want)
    assert M.model_utility(vals + [0.0]) == 0.0
    with pytest.raises(ValueError, match="values"):
        M.model_utility([])
    with pytest.raises(ValueError, match="values"):
        M.model_utility({})
    with pytest.raises(ValueError, match="values"):
        M.model_utility([0.5, -0.1])
    with pytest.raises(ValueError, match="values"):
        M.model_utility([0.5, np.nan])


# ---------------------------------------------------------------------------------------------
# membership-inference scores
# ---------------------------------------------------------------------------------------------

def test_loss_and_zlib_scores_match_loops():
    rng = np.random.default_rng(5)
    lp, mask = _random_tokens(rng, b=3)
    texts = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "The quick brown fox jumps over the lazy dog", ""]
    mean = _loop_mean(lp, mask)
    np.testing.assert_allclose(M.loss_score(lp, mask), mean, rtol=1e-12)
    want = [mean[i] / len(zlib.compress(texts[i].encode("utf-8"))) for i in range(3)]
    np.testing.assert_allclose(M.zlib_score(lp, mask, texts), want, rtol=1e-12)
    with pytest.raises(ValueError, match="texts"):
        M.zlib_score(lp, mask, texts[:2])
    with pytest.raises(TypeError, match="texts"):
        M.zlib_score(lp, mask, "one string")


def test_min_k_score_matches_loop_and_rounding():
    rng = np.random.default_rng(6)
    lp, mask = _random_tokens(rng, b=6, t=13)
    for k in (0.05, 0.2, 0.25, 0.5, 1.0):
        want = [_loop_lowest_k(_valid(lp, mask, i), k) for i in range(lp.shape[0])]
        np.testing.assert_allclose(M.min_k_score(lp, mask, k=k), want, rtol=1e-12)
    row = [[-5.0, -1.0, -3.0, -2.0, -4.0, -0.5, -0.1]]  # n = 7: k = 0.2 -> int(1.4) = 1 token
    assert M.min_k_score(row, [[True] * 7], k=0.2)[0] == -5.0
    assert M.min_k_score(row, [[True] * 7], k=0.3)[0] == pytest.approx((-5 - 4) / 2)  # int(2.1) = 2
    assert M.min_k_score(row, [[True] * 7], k=1.0)[0] == pytest.approx(sum(row[0]) / 7)
    assert M.min_k_score([[-2.0, -1.0]], [[True, True]], k=0.01)[0] == -2.0  # at least one token


@pytest.mark.parametrize("k", [0, 0.0, -0.2, 1.5, float("nan")])
def test_k_out_of_range(k):
    lp, mask = np.full((1, 3), -1.0), np.ones((1, 3), bool)
    with pytest.raises(ValueError, match="k"):
        M.min_k_score(lp, mask, k=k)
    with pytest.raises(ValueError, match="k"):
        M.min_k_plus_plus_score(lp, lp, np.ones((1, 3)), mask, k=k)


def test_k_wrong_type():
    lp, mask = np.full((1, 3), -1.0), np.ones((1, 3), bool)
    for k in (True, "0.2", None):
        with pytest.raises(TypeError, match="k"):
            M.min_k_score(lp, mask, k=k)


def _vocab_logprobs(rng, b, t, v):
    logits = rng.normal(0, 2, size=(b, t, v))
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_logprob_moments_match_loop_numpy_and_torch():
    rng = np.random.default_rng(7)
    vlp = _vocab_logprobs(rng, 2, 3, 5)
    mu, var = M.logprob_moments(vlp)
    for i in range(2):
        for j in range(3):
            ps = [math.exp(x) for x in vlp[i, j]]
            m1 = sum(p * x for p, x in zip(ps, vlp[i, j]))
            m2 = sum(p * x * x for p, x in zip(ps, vlp[i, j]))
            assert mu[i, j] == pytest.approx(m1, rel=1e-12)
            assert var[i, j] == pytest.approx(m2 - m1 * m1, rel=1e-9, abs=1e-12)
    tmu, tvar = M.logprob_moments(torch.tensor(vlp))
    assert isinstance(tmu, torch.Tensor)
    np.testing.assert_allclose(tmu.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(tvar.numpy(), var, rtol=1e-9, atol=1e-12)
    # p = 0 entries (log p = -inf) contribute 0, not NaN
    onehot = np.array([[[0.0, -np.inf, -np.inf]]])
    mu0, var0 = M.logprob_moments(onehot)
    assert mu0[0, 0] == 0.0 and var0[0, 0] == 0.0
    mu0t, var0t = M.logprob_moments(torch.tensor(onehot))
    assert mu0t.item() == 0.0 and var0t.item() == 0.0


def test_min_k_plus_plus_matches_loop():
    rng = np.random.default_rng(8)
    b, t, v = 4, 11, 7
    vlp = _vocab_logprobs(rng, b, t, v)
    ids = rng.integers(0, v, size=(b, t))
    lp = np.take_along_axis(vlp, ids[..., None], axis=-1)[..., 0]
    mu, var = M.logprob_moments(vlp)
    _, mask = _random_tokens(rng, b=b, t=t)
    for k in (0.2, 0.5, 1.0):
        want = []
        for i in range(b):
            z = [(lp[i, j] - mu[i, j]) / math.sqrt(max(var[i, j], 1e-6)) for j in range(t) if mask[i, j]]
            want.append(_loop_lowest_k(z, k))
        np.testing.assert_allclose(M.min_k_plus_plus_score(lp, mu, var, mask, k=k), want, rtol=1e-10)
    # torch inputs (as logprob_moments returns them) give the same
    tmu, tvar = M.logprob_moments(torch.tensor(vlp))
    np.testing.assert_allclose(M.min_k_plus_plus_score(torch.tensor(lp), tmu, tvar, torch.tensor(mask)),
                               M.min_k_plus_plus_score(lp, mu, var, mask), rtol=1e-10)


def test_min_k_plus_plus_sigma_zero_guard():
    # a one-hot distribution: the token has log p = mu = 0 and var = 0 -> 0, not NaN
    got = M.min_k_plus_plus_score([[0.0, -1.0]], [[0.0, -0.5]], [[0.0, 0.25]], [[True, True]], k=1.0)
    assert got[0] == pytest.approx((0.0 + (-1.0 + 0.5) / 0.5) / 2)
    # zero variance with log p != mu: divided by sqrt(1e-6), finite
    got = M.min_k_plus_plus_score([[-1.0]], [[-0.5]], [[0.0]], [[True]], k=1.0)
    assert got[0] == pytest.approx(-0.5 / math.sqrt(M.MINK_PP_VAR_FLOOR))


def test_min_k_plus_plus_errors():
    lp, mask = np.full((2, 3), -1.0), np.ones((2, 3), bool)
    mu, var = np.full((2, 3), -1.0), np.ones((2, 3))
    with pytest.raises(ValueError, match="mu"):
        M.min_k_plus_plus_score(lp, mu[:, :2], var, mask)
    with pytest.raises(ValueError, match="var"):
        M.min_k_plus_plus_score(lp, mu, -var, mask)
    bad = mu.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="mu"):
        M.min_k_plus_plus_score(lp, bad, var, mask)
    masked_out = mask.copy()
    masked_out[0, 0] = False  # NaN outside the mask is ignored
    assert np.isfinite(M.min_k_plus_plus_score(lp, bad, var, masked_out)).all()


def test_auc_matches_sklearn_and_pair_count():
    rng = np.random.default_rng(9)
    mem = np.round(rng.normal(0.5, 1, 20), 1)  # rounding makes ties
    non = np.round(rng.normal(0, 1, 25), 1)
    labels = np.r_[np.ones(20), np.zeros(25)]
    assert M.auc(mem, non) == pytest.approx(roc_auc_score(labels, np.r_[mem, non]))
    pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in mem for b in non) / (20 * 25)
    assert M.auc(mem, non) == pytest.approx(pairs)
    assert M.auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert M.auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="nonmember_scores"):
        M.auc(mem, [])
    with pytest.raises(ValueError, match="member_scores"):
        M.auc([np.nan, 1.0], non)
    with pytest.raises(ValueError, match="member_scores"):
        M.auc([-np.inf, 1.0], non)


def test_sign_convention_members_with_higher_logprobs_are_detected():
    # members: the model gives their tokens higher log-probs; every score must give AUC > 0.5
    rng = np.random.default_rng(10)
    b, t, v = 30, 16, 9
    mask = np.ones((b, t), bool)
    texts = [f"text number {i} " * 3 for i in range(b)]

    def sample(sharp):
        vlp = _vocab_logprobs(rng, b, t, v)
        ids = vlp.argmax(-1) if sharp else rng.integers(0, v, size=(b, t))
        return np.take_along_axis(vlp, ids[..., None], axis=-1)[..., 0], vlp

    mem_lp, mem_v = sample(True)
    non_lp, non_v = sample(False)
    assert mem_lp.mean() > non_lp.mean()
    mm, mv = M.logprob_moments(mem_v)
    nm, nv = M.logprob_moments(non_v)
    scores = {
        "loss": (M.loss_score(mem_lp, mask), M.loss_score(non_lp, mask)),
        "zlib": (M.zlib_score(mem_lp, mask, texts), M.zlib_score(non_lp, mask, texts)),
        "min_k": (M.min_k_score(mem_lp, mask), M.min_k_score(non_lp, mask)),
        "min_k++": (M.min_k_plus_plus_score(mem_lp, mm, mv, mask), M.min_k_plus_plus_score(non_lp, nm, nv, mask)),
    }
    for name, (a, b_) in scores.items():
        assert M.auc(a, b_) > 0.8, name
        assert M.auc(b_, a) < 0.2, name


# ---------------------------------------------------------------------------------------------
# PrivLeak
# ---------------------------------------------------------------------------------------------

def test_priv_leak_muse_formula_and_orientation():
    u, r = 0.7, 0.55  # lethe AUCs (members positive)
    mu, mr = 1 - u, 1 - r  # MUSE's AUCs (forget = negative class)
    assert M.priv_leak(u, r) == pytest.approx((mu - mr) / mr)
    assert M.priv_leak(mu, mr, convention="muse") == pytest.approx((mu - mr) / mr)
    assert M.priv_leak(0.6, 0.6) == 0.0
    # MUSE-News Min-40%: a target model AUC_MUSE ~0.0009 vs retrained 0.4772 -> about -100 %
    assert M.priv_leak(0.0009, 0.4772, convention="muse") * 100 == pytest.approx((0.0009 - 0.4772) / 0.4772 * 100)
    assert M.priv_leak(1 - 0.0009, 1 - 0.4772) < -0.99  # under-unlearned: negative, as MUSE's tables
    assert M.priv_leak(0.3, 0.5) > 0  # over-unlearned (forget set looks less seen than holdout): positive


def test_priv_leak_errors():
    with pytest.raises(ValueError, match="auc_retain"):
        M.priv_leak(0.5, 1.0)  # MUSE's AUC of the retrained model would be 0
    with pytest.raises(ValueError, match="auc_retain"):
        M.priv_leak(0.5, 0.0, convention="muse")
    with pytest.raises(ValueError, match="auc_unlearned"):
        M.priv_leak(1.2, 0.5)
    with pytest.raises(ValueError, match="auc_unlearned"):
        M.priv_leak(float("nan"), 0.5)
    with pytest.raises(TypeError, match="auc_retain"):
        M.priv_leak(0.5, "0.5")
    with pytest.raises(ValueError, match="convention"):
        M.priv_leak(0.5, 0.5, convention="percent")


# ---------------------------------------------------------------------------------------------
# DurableUn certificate, Q-INT4
# ---------------------------------------------------------------------------------------------

def test_durability_certificate():
    scores = {"fp32": 0.02, "int8": 0.03, "int4-g128": 0.4, "nf4-b64": 0.1}
    cert = M.durability_certificate(scores, 0.05)
    assert cert == {"epsilon": 0.05, "precisions": ["fp32", "int8", "int4-g128", "nf4-b64"],
                    "worst": "int4-g128", "worst_score": 0.4, "holds": False}
    assert M.durability_certificate(scores, 0.4)["holds"] is True  # <= epsilon
    assert M.durability_certificate({"fp32": 0.0}, 0.0)["holds"] is True
    tie = M.durability_certificate({"a": 0.3, "b": 0.3, "c": 0.1}, 0.5)
    assert tie["worst"] == "a"
    assert tie["worst_score"] == max(0.3, 0.3, 0.1)


def test_durability_certificate_errors():
    with pytest.raises(ValueError, match="forget_scores"):
        M.durability_certificate({}, 0.1)
    with pytest.raises(TypeError, match="forget_scores"):
        M.durability_certificate([0.1, 0.2], 0.1)
    with pytest.raises(ValueError, match="int8"):
        M.durability_certificate({"fp32": 0.1, "int8": float("nan")}, 0.1)
    with pytest.raises(TypeError, match="fp32"):
        M.durability_certificate({"fp32": "0.1"}, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        M.durability_certificate({"fp32": 0.1}, float("nan"))
    with pytest.raises(TypeError, match="epsilon"):
        M.durability_certificate({"fp32": 0.1}, None)


def test_q_int4():
    scores = {"fp32": 0.9, "int8": 0.8, "paper-int4": 0.3, "int4-g128": 0.5, "int4-g128-asym": 0.2,
              "nf4-b64": 0.45}
    assert M.q_int4(scores) == max(scores[n] for n in ("paper-int4", "int4-g128", "int4-g128-asym", "nf4-b64"))
    assert M.q_int4({"fp32": 0.0, "nf4-b64": 0.25}) == 0.25
    with pytest.raises(ValueError, match="4-bit"):
        M.q_int4({"fp32": 0.1, "int8": 0.2})


def test_four_bit_presets_are_lethes():
    from lethe.ops.quant import PRESETS
    assert set(M.FOUR_BIT_PRESETS) == {name for name, spec in PRESETS.items() if spec.bits == 4}
