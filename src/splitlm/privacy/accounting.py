"""(epsilon, delta) over a run, from Google's ``dp_accounting`` library (privacy loss distributions).

The unit of privacy is one training sequence. Each time the client sends a sequence (once per epoch that
touches it), the sequence goes through the defenses' mechanisms; the accountant composes those releases.
No amplification by subsampling is claimed: the server sees each sequence it receives.

Neighbouring relation: one sequence replaced by a "zero" record (dp_accounting's ``REPLACE_SPECIAL``), the
relation under which a release of a clipped sequence has sensitivity sqrt(T)*C (L2) or T*C (L1), and the one
that supports Gaussian, Laplace and randomized-response events alike (for Gaussian and Laplace it gives the
same epsilon as add/remove-one). Against one sequence replaced by another, group privacy through the zero
record bounds the epsilon by about twice the reported one.
"""

from __future__ import annotations

import math

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.privacy_accountant import NeighboringRelation

FINE_INTERVAL = 1e-4  # dp_accounting's default privacy loss grid
COARSE_INTERVAL = 1e-2  # a first, cheap pass that sizes the grid of the second


class _Accountant(pld_privacy_accountant.PLDAccountant):
    """dp_accounting's PLD accountant, composing a repeated randomized response ``count`` times.

    dp_accounting 0.6.0 composes a ``RandomizedResponseDpEvent`` inside a ``SelfComposedDpEvent`` only once,
    whatever the count (Gaussian and Laplace events are handled); this applies the count.
    """

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> pld_privacy_accountant.CompositionErrorDetails | None:
        rr = isinstance(event, dp_event.RandomizedResponseDpEvent)
        if not rr or count == 1 or event.num_buckets == 1 or event.noise_parameter == 0:
            return super()._maybe_compose(event, count, do_compose)
        if do_compose:
            pld = privacy_loss_distribution.from_randomized_response(
                noise_parameter=event.noise_parameter,
                num_buckets=event.num_buckets,
                value_discretization_interval=self._value_discretization_interval,
                neighboring_relation=self.neighboring_relation,
            )
            self._pld = self._pld.compose(pld.self_compose(count))
        return None


def releases(steps: int, batch_size: int, grad_accum: int, num_examples: int) -> int:
    """How many times the most-sent sequence crossed the cut: the number of epochs begun."""
    sent = steps * batch_size * grad_accum
    return max(1, math.ceil(sent / max(num_examples, 1)))


def epsilon(events: list[dp_event.DpEvent] | None, count: int, delta: float) -> float | None:
    """epsilon after ``count`` releases, each going through ``events``; None when there is no mechanism.

    The privacy loss grid is as fine as dp_accounting's default (1e-4) for small epsilons and coarser, in
    proportion, for large ones (weak noise over long sequences), which would otherwise take minutes and GBs; the
    estimate stays pessimistic (an upper bound) either way.
    """
    if not events or count < 1:
        return None
    one = events[0] if len(events) == 1 else dp_event.ComposedDpEvent(list(events))
    event = dp_event.SelfComposedDpEvent(one, count)
    rough = _epsilon(event, delta, COARSE_INTERVAL)
    if not math.isfinite(rough):
        return None
    value = _epsilon(event, delta, min(COARSE_INTERVAL, max(FINE_INTERVAL, rough * FINE_INTERVAL)))
    return value if math.isfinite(value) else None


def _epsilon(event: dp_event.DpEvent, delta: float, interval: float) -> float:
    accountant = _Accountant(NeighboringRelation.REPLACE_SPECIAL, value_discretization_interval=interval)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
