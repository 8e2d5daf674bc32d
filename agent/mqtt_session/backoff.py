"""How long the session waits before it connects again: after a link failed or ended
(`backoff_delay`), and after another client took the session over (`takeover_delay`)."""

from __future__ import annotations

import random


def takeover_delay(takeovers: int, low: float, high: float) -> float:
    """The wait after the n-th takeover in a row: low, doubling per repeat, capped at high,
    times 1 to 1.5 (jitter, so two twins do not come back together)."""
    base = min(high, low * float(2 ** min(max(takeovers - 1, 0), 20)))
    return min(high, base * random.uniform(1.0, 1.5))  # noqa: S311 - jitter, not crypto


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Full-jitter exponential backoff: a random delay in [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 20)))
    return random.uniform(low, max(low, ceiling))  # noqa: S311 - jitter, not crypto
