"""``semi_async`` (SAFSL; survey §4.4): updates wait for the end of the current window, then are applied together
with ``w_i`` proportional to ``n_i x k_i``, ``k_i`` the windows since client i last took part (participation-interval
weighting: a slow client's rarer update counts for the windows it missed, so fast clients do not dominate),
normalised to sum to 1 (the mean delta, as FedBuff applies it). A client that is not done when the window closes
keeps training into the next one; one that hands in twice in a window sends the sum of its deltas. A window is
``round_window_s`` wall seconds (``clock: wall``) or ``window_steps`` on the virtual clock (``clock: steps``)."""

from __future__ import annotations

from pydantic import Field

from splitlm.frameworks.aggregation import STRATEGIES
from splitlm.frameworks.aggregation.asynchronous import Asynchronous, AsyncSettings
from splitlm.frameworks.federation import Federation


@STRATEGIES.component
class SemiAsync(Asynchronous):
    name = "semi_async"
    former_keys = (("framework.round_window_s", "framework.aggregation.semi_async.round_window_s"),)
    windowed = True

    class Settings(AsyncSettings):
        round_window_s: float = Field(
            10.0, gt=0, allow_inf_nan=False, description="clock=wall: wall seconds of one aggregation window."
        )
        window_steps: float = Field(
            0.0,
            ge=0,
            allow_inf_nan=False,
            description="clock=steps: length of one window on the virtual clock, in client steps of speed 1; 0: "
            "framework.local_steps (one local round of a client of speed 1).",
        )

    @property
    def window_seconds(self) -> float:
        return float(self.settings.round_window_s)  # type: ignore[attr-defined]

    def window_steps(self, fed: Federation) -> float:
        return float(self.settings.window_steps) or float(max(fed.local_steps, 1))  # type: ignore[attr-defined]
