"""FedAvg (step 11) is a pure function: exact on hand-made inputs, loud on inputs that do not match."""

from __future__ import annotations

import pytest
import torch

from splitlm.frameworks.aggregate import AggregationError, fedavg


def _clone(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in states]


def test_weighted_mean_is_exact() -> None:
    # Prepare: weights 1 and 3 -> 1/4 of the first plus 3/4 of the second; all values exact in binary.
    a = {"w": torch.tensor([[0.0, 4.0], [8.0, -4.0]]), "b": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([[4.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([5.0, 2.0, -1.0])}
    # Execute
    result = fedavg([a, b], [1, 3])
    # Assert
    assert set(result) == {"w", "b"}
    torch.testing.assert_close(result["w"], torch.tensor([[3.0, 1.0], [2.0, 2.0]]), rtol=0, atol=0)
    torch.testing.assert_close(result["b"], torch.tensor([4.0, 2.0, 0.0]), rtol=0, atol=0)
    assert result["w"].dtype == torch.float32


def test_equal_weights_give_the_plain_mean_and_scale_does_not_matter() -> None:
    a = {"x": torch.tensor([1.0, 10.0])}
    b = {"x": torch.tensor([3.0, 20.0])}
    c = {"x": torch.tensor([8.0, 0.0])}
    # (1+3+8)/3 = 4, (10+20+0)/3 = 10
    for weights in ([1, 1, 1], [46.0, 46.0, 46.0], [0.5, 0.5, 0.5]):
        torch.testing.assert_close(fedavg([a, b, c], weights)["x"], torch.tensor([4.0, 10.0]), rtol=0, atol=0)


def test_a_zero_weight_drops_that_state() -> None:
    a = {"x": torch.tensor([2.0])}
    b = {"x": torch.tensor([1e6])}
    assert torch.equal(fedavg([a, b], [5, 0])["x"], torch.tensor([2.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs_keep_their_dtype(dtype: torch.dtype) -> None:
    a = {"x": torch.tensor([1.0, 2.0, -3.0], dtype=dtype)}
    b = {"x": torch.tensor([3.0, 6.0, 5.0], dtype=dtype)}
    result = fedavg([a, b], [1, 1])
    assert result["x"].dtype == dtype
    assert torch.equal(result["x"], torch.tensor([2.0, 4.0, 1.0], dtype=dtype))


def test_low_precision_sums_in_high_precision() -> None:
    # In fp16, 2048 + 1 rounds back to 2048, so a running fp16 sum of these 4 states would give 8192 / 4 = 512.
    # The float64 mean is 2051 / 4 = 512.75, which rounds once, to fp16's nearest value 513.
    states = [{"x": torch.tensor([2048.0], dtype=torch.float16)}] + [
        {"x": torch.tensor([1.0], dtype=torch.float16)} for _ in range(3)
    ]
    expected = torch.tensor([2051 / 4], dtype=torch.float64).to(torch.float16)
    assert expected.item() == 513.0
    assert torch.equal(fedavg(states, [1, 1, 1, 1])["x"], expected)


def test_single_state_returns_itself() -> None:
    state = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "n": torch.tensor([7])}
    result = fedavg([state], [12.0])
    assert set(result) == set(state)
    for key in state:
        assert result[key].dtype == state[key].dtype
        assert torch.equal(result[key], state[key])


def test_result_does_not_alias_inputs() -> None:
    state = {"w": torch.ones(2)}
    result = fedavg([state], [1.0])
    result["w"].add_(1.0)
    assert torch.equal(state["w"], torch.ones(2))


def test_inputs_are_not_modified() -> None:
    gen = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(2, 3, generator=gen), "b": torch.randn(3, generator=gen)} for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    snapshot, weights_before = _clone(states), list(weights)
    fedavg(states, weights)
    assert weights == weights_before
    for before, after in zip(snapshot, states, strict=True):
        assert set(before) == set(after)
        for key in before:
            assert torch.equal(before[key], after[key])


def test_keys_follow_the_first_state_and_order_of_keys_does_not_matter() -> None:
    a = {"p": torch.tensor([1.0]), "q": torch.tensor([2.0])}
    b = {"q": torch.tensor([4.0]), "p": torch.tensor([3.0])}
    result = fedavg([a, b], [1, 1])
    assert torch.equal(result["p"], torch.tensor([2.0]))
    assert torch.equal(result["q"], torch.tensor([3.0]))


X = {"x": torch.zeros(2)}
BAD = {
    "empty list": ([], [], "no states"),
    "missing key": ([X, {"y": torch.zeros(2)}], [1, 1], r"state 1 has different tensors"),
    "extra key": ([X, {"x": torch.zeros(2), "z": torch.zeros(1)}], [1, 1], r"different tensors.*'z'"),
    "mismatched shape": ([X, {"x": torch.zeros(3)}], [1, 1], r"x has shape \(3,\) in state 1 but \(2,\)"),
    "negative weight": ([X, X], [1, -1], r"weights must be >= 0"),
    "zero total weight": ([X, X], [0, 0], r"positive sum"),
    "more weights than states": ([X], [1, 1], r"1 states but 2 weights"),
    "fewer weights than states": ([X, X, X], [1, 1], r"3 states but 2 weights"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_aggregation_error_naming_the_problem(case: str) -> None:
    states, weights, message = BAD[case]
    snapshot = _clone(states)
    with pytest.raises(AggregationError, match=message):
        fedavg(states, weights)
    for before, after in zip(snapshot, states, strict=True):  # a rejected call changes nothing either
        assert all(torch.equal(before[k], after[k]) for k in before)
