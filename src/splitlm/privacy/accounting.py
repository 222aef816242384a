"""(epsilon, delta) over a run, from Google's ``dp_accounting`` library (privacy loss distributions).

The unit of privacy is one training sequence. Each time the client sends a sequence (once per epoch that
touches it), the sequence goes through the defenses' mechanisms; the accountant composes those releases.
No amplification by subsampling is claimed: the server sees each sequence it receives.
"""

from __future__ import annotations

import math

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant


def releases(steps: int, batch_size: int, grad_accum: int, num_examples: int) -> int:
    """How many times the most-sent sequence crossed the cut: the number of epochs begun."""
    sent = steps * batch_size * grad_accum
    return max(1, math.ceil(sent / max(num_examples, 1)))


def epsilon(events: list[dp_event.DpEvent] | None, count: int, delta: float) -> float | None:
    """epsilon after ``count`` releases, each going through ``events``; None when there is no mechanism."""
    if not events or count < 1:
        return None
    one = events[0] if len(events) == 1 else dp_event.ComposedDpEvent(list(events))
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(one, count))
    value = float(accountant.get_epsilon(delta))
    return value if math.isfinite(value) else None
