"""The verdicts' tail probabilities: computed through scipy.special (fast to import), they
must be scipy.stats's numbers."""

import pytest
from scipy import stats

from ticketctl.protect.stats import binomial_tail, clopper_pearson_upper, precision_tail

CASES = [(k, n, p) for n in (1, 7, 100, 441, 10_000) for p in (1e-3, 0.1, 0.5, 0.9)
         for k in sorted({0, 1, n // 3, n // 2, n - 1, n})]


@pytest.mark.parametrize("k,n,p", CASES)
def test_binomial_tail_is_scipy_stats(k, n, p):
    want = float(stats.binom.sf(k - 1, n, p))
    got = binomial_tail(k, n, p)
    # both evaluate the regularized incomplete beta in float64 (Boost's ibeta): agreement to
    # a few ulps relative, and to 1e-300 absolute where the tail underflows toward zero
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_binomial_tail_edges():
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(-2, 10, 0.3) == 1.0
    assert binomial_tail(11, 10, 0.3) == 0.0 and binomial_tail(5, 0, 0.3) == 1.0
    # a verdict's scale: 441 of 441 modules at chance 1/2 is 2^-441
    assert binomial_tail(441, 441, 0.5) == pytest.approx(2.0 ** -441, rel=1e-9)


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (14, 100), (99, 100)])
def test_clopper_pearson_is_the_beta_quantile(k, n):
    want = float(stats.beta.ppf(0.99, k + 1, n - k))
    assert clopper_pearson_upper(k, n) == pytest.approx(want, rel=1e-9)
    assert clopper_pearson_upper(n, n) == 1.0


HYPER = [(h, d, m, n) for n in (5, 40, 441, 1200) for m in sorted({0, 1, n // 4, n // 2, n})
         for d in sorted({0, 1, n // 3, n // 2, n}) for h in sorted({0, 1, d // 2, d, m})]


@pytest.mark.parametrize("hits,drawn,marked,population", HYPER)
def test_precision_tail_is_scipy_stats(hits, drawn, marked, population):
    want = float(stats.hypergeom.sf(hits - 1, population, marked, drawn)) if drawn > 0 else 1.0
    got = precision_tail(hits, drawn, marked, population)
    # a sum of at most 1,201 pmf terms, each exp of a difference of log-gamma values below
    # 1e4 (float64: about 1e-12 relative each): 1e-9 relative leaves three orders of margin
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
