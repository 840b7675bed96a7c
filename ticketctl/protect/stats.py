"""The statistics behind a verdict: exact tail probabilities (scipy.special's functions, which
scipy.stats computes them with too, at a fraction of its import time), with the test, its
null and its size reported together."""

from __future__ import annotations


def binomial_tail(successes: int, trials: int, null_rate: float) -> float:
    """P[Binomial(trials, null_rate) >= successes]: how likely an unrelated model agrees this
    often by chance."""
    if trials <= 0 or successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    # P[X >= k] = I_p(k, n - k + 1), the regularized incomplete beta function (what
    # scipy.stats.binom.sf computes through the same Boost routine); scipy.special imports in
    # a fifth of the time scipy.stats takes, which `verify` pays on every run
    from scipy.special import betainc

    return float(betainc(successes, trials - successes + 1, null_rate))


def precision_tail(hits: int, drawn: int, marked: int, population: int) -> float:
    """Hypergeometric P[X >= hits] when `drawn` of `population` items are taken at random and
    `marked` of the population are marked: e.g. of the observed dark modules, how many fall on
    the code's dark modules."""
    if drawn <= 0:
        return 1.0
    import numpy as np
    from scipy.special import gammaln, logsumexp  # (not scipy.stats: see binomial_tail)

    lo, hi = max(hits, 0, drawn - (population - marked)), min(drawn, marked)
    if lo > hi:
        return 0.0
    if lo <= max(0, drawn - (population - marked)):
        return 1.0  # every possible outcome has at least `hits`

    def log_choose(n: float, k: np.ndarray | float) -> np.ndarray:
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    k = np.arange(lo, hi + 1, dtype=np.float64)
    # each term's pmf in log space, summed there: exact to about 1e-13 relative, and tails
    # far below float64's range come out as 0 rather than as an overflow
    logs = log_choose(marked, k) + log_choose(population - marked, drawn - k) \
        - log_choose(population, drawn)
    return float(min(1.0, np.exp(logsumexp(logs))))


def clopper_pearson_upper(successes: int, trials: int, confidence: float = 0.99) -> float:
    """One-sided upper confidence bound of a binomial rate."""
    if successes >= trials:
        return 1.0
    from scipy.special import betaincinv  # the beta quantile, as scipy.stats.beta.ppf

    return float(betaincinv(successes + 1, trials - successes, confidence))
