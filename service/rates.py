"""Rates from the reviewers' verdicts, said honestly: with a 95% Wilson interval, and not at all
below `MIN_REVIEWS` reviews (a share of 2 reviews reads like a fact and is noise). Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The fewest reviews a share is given for (the alert and `/performance`).
MIN_REVIEWS = 20
#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes/trials (95% by default); (0, 1) for no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A share of reviews, shown only when there are enough of them."""

    count: int
    of: int

    @property
    def enough(self) -> bool:
        """Whether there are at least `MIN_REVIEWS` reviews behind it."""
        return self.of >= MIN_REVIEWS

    @property
    def share(self) -> float | None:
        """count/of, or None without any review."""
        return self.count / self.of if self.of else None

    @property
    def interval(self) -> tuple[float, float]:
        """Its 95% Wilson interval."""
        return wilson_interval(self.count, self.of)

    def text(self) -> str:
        """"72% (95% interval 59–82%, 41 of 57)", or why no share is given."""
        if not self.enough:
            return f"too few reviews yet ({self.of} of the {MIN_REVIEWS} needed)"
        low, high = self.interval
        return (f"{100 * self.count / self.of:.0f}% (95% interval {100 * low:.0f}–{100 * high:.0f}%, "
                f"{self.count} of {self.of})")


def benign_alerts_sentence(benign: int, reviewed: int, model_version: str) -> str:
    """What the alert says about how its model's earlier alerts turned out."""
    rate = Rate(benign, reviewed)
    if not rate.enough:
        return (f"Too few alerts of model {model_version} have been reviewed yet ({reviewed}; "
                f"{MIN_REVIEWS} are needed) to say what share turned out benign.")
    low, high = rate.interval
    return (f"Of the {reviewed} alerts of model {model_version} that reviewers have judged, {benign} "
            f"({100 * benign / reviewed:.0f}%, 95% interval {100 * low:.0f}–{100 * high:.0f}%) "
            f"were benign.")
