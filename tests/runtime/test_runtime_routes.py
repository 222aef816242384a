"""The server records each client's cut and runs the part of its trunk that cut leaves to it."""

from __future__ import annotations

import pytest
import torch

from splitlm.errors import ProtocolError
from splitlm.frameworks.federation import build_federation
from splitlm.frameworks.setup import load_source
from splitlm.models import SplitSpec, load_stage
from splitlm.transport import Message

B, T, D = 2, 5, 64  # tiny-llama: 6 blocks, hidden size 64


def _eval(client: str, hidden: torch.Tensor) -> Message:
    return Message("eval", client, -1, 0, {"hidden": hidden, "attention_mask": torch.ones(B, T, dtype=torch.long)})


def test_a_client_with_a_deeper_head_runs_only_the_blocks_its_cut_leaves(make_config) -> None:
    config = make_config("run", "split.head_layers=1", "split.tail_layers=1")  # the trunk holds blocks 1..4
    fed = build_federation(config)
    server = fed.server
    assert server.route_of("0").blocks == (1, 2, 3, 4)  # the configured cut: every block the trunk holds
    server.assign("deep", spec=SplitSpec("ushape", 2, 1))
    assert server.route_of("deep").blocks == (2, 3, 4)
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))
    reference = load_stage(load_source(config), SplitSpec("ushape", 2, 1), "trunk")
    with torch.no_grad():
        expected = reference(hidden_states=hidden, attention_mask=torch.ones(B, T, dtype=torch.long))
        whole = server.handle(_eval("0", hidden)).tensors["hidden"]
    got = server.handle(_eval("deep", hidden)).tensors["hidden"]
    # LoRA starts with B = 0: the adapted trunk computes what the pretrained blocks 2..4 compute
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, got)  # blocks 1..4 are another function


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (SplitSpec("ushape", 0, 1), r"needs trunk blocks 0..4, but this server holds blocks 1..4"),
        (SplitSpec("ushape", 1, 0), r"needs trunk blocks 1..5"),
        (SplitSpec("vanilla", 1, 0), "uses a vanilla split; this server serves ushape splits"),
    ],
)
def test_a_cut_the_server_cannot_serve_is_refused(make_config, spec: SplitSpec, pattern: str) -> None:
    server = build_federation(make_config("run", "split.head_layers=1", "split.tail_layers=1")).server
    with pytest.raises(ProtocolError, match=pattern):
        server.assign("odd", spec=spec)
    assert "odd" not in server.routes
