"""Three-way verdicts by equivalence: transfers, drifts, or inconclusive.

"The interval contains 0" is not evidence of transfer (a wide interval contains everything),
and excluding 0 by a hair is not evidence of drift. A trend (octaves of lr* per doubling of
width, say) is judged against a tolerance band [-tolerance, +tolerance]:

- transfers: the whole 95 % interval lies inside the band;
- drifts: the whole interval lies outside it;
- inconclusive: anything else, including no interval at all.

An interval that excludes 0 with its point estimate beyond the tolerance is not called a drift:
the estimate of a slope near the band's edge lands on either side of it from one seed set to
the next, and a verdict that flips with noise is worse than none.

The default tolerance, 0.25 octave of lr* per doubling of width (or depth), is the drift a user
can ignore: an lr tuned on a proxy 16x narrower than the target is then off by at most one
octave, a factor of 2, the resolution of the usual one-octave tuning grid, and on the curves
seen in practice that costs about a percent of loss. `sweep report --tolerance` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TOLERANCE = 0.25
VERDICTS = ("transfers", "drifts", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # transfers | drifts | inconclusive
    why: str  # one clause in words: what the interval shows, or what would settle it


def judge(
    estimate: float | None,
    ci: list[float] | tuple[float, float] | None,
    tolerance: float,
    *,
    settle: str = "more seeds, or a wider range of sizes",
) -> Verdict:
    """Judge a trend `estimate` with its 95 % interval `ci` against +-`tolerance`.

    `settle` says what would make an inconclusive verdict conclusive (more seeds, a finer lr
    grid near the optimum, wider sizes); the caller knows which applies.
    """
    if estimate is None or ci is None or not all(np.isfinite(v) for v in (estimate, *ci)):
        return Verdict("inconclusive", f"no interval could be computed: {settle}")
    lo, hi = float(ci[0]), float(ci[1])
    band = f"+-{tolerance:g}"
    if -tolerance <= lo and hi <= tolerance:
        return Verdict("transfers", f"the whole interval lies within {band}")
    if hi < -tolerance or lo > tolerance:
        return Verdict("drifts", f"the whole interval lies outside {band}")
    if hi - lo > 2 * tolerance:
        return Verdict(
            "inconclusive", f"the interval is wider than the {band} band: {settle} would settle it"
        )
    return Verdict(
        "inconclusive",
        f"the interval straddles the edge of the {band} band: {settle} would settle it",
    )
