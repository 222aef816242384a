"""A networked run records what crossed the cut: `splitlm serve` with the tap keeps what it received, its client keeps
the truth of its latest micro-batches, and the records are those of the same run in one process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from helpers import serve_one_client_in_threads
from splitlm.config import Config
from splitlm.frameworks import run_framework
from splitlm.privacy.attacks import observations
from splitlm.privacy.audit import audit
from splitlm.privacy.tap import read_records

TAPPED = ("privacy.tap.enabled=true", "privacy.tap.max_batches=2", "train.steps=3")


def test_serve_records_what_it_received_and_the_client_keeps_its_truth(
    fast_config: Callable[..., Config], tmp_path: Path
) -> None:
    run_framework(fast_config(tmp_path / "inprocess", *TAPPED))
    serve_one_client_in_threads(
        fast_config(tmp_path / "server", *TAPPED), fast_config(tmp_path / "client0", *TAPPED), tmp_path
    )
    assert not (tmp_path / "server" / "truth").exists()  # the server never sees the truth
    assert (tmp_path / "client0" / "truth").is_dir()
    here = read_records(tmp_path / "inprocess")
    there = read_records(tmp_path / "server", truth_dir=tmp_path / "client0")
    assert [key for key, _, _ in there] == [key for key, _, _ in here]
    for (_, tap, truth), (_, tap_here, truth_here) in zip(there, here, strict=True):
        assert tap.keys() == tap_here.keys()
        for name in tap:
            torch.testing.assert_close(tap[name], tap_here[name], rtol=1e-5, atol=1e-6)
        assert truth is not None and truth_here is not None
        assert torch.equal(truth["input_ids"], truth_here["input_ids"])
    # Without the client's folder the server's records have no truth to score against.
    assert all(o.truth is None for o in observations(tmp_path / "server"))
    # `splitlm audit SERVER --client-dir CLIENT`: the server's records, the client's truth and (inside) its parts.
    report = audit(
        tmp_path / "server", client_dir=tmp_path / "client0", attacks=["sip"], options={"sip": {"steps": "40"}},
        progress=False, say=lambda line: None,
    )  # fmt: skip
    assert [r["threat_model"] for r in report["attacks"]] == ["public", "inside"]
    assert (tmp_path / "server" / "audit.json").is_file()
