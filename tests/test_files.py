"""``splitlm.files``: the one JSON lines reader (data files, a run's metrics and rounds)."""

from __future__ import annotations

import pytest

from splitlm.files import JsonLineError, read_jsonl


def test_read_jsonl_skips_blank_lines_and_keeps_the_order() -> None:
    assert read_jsonl(['{"a": 1}\n', "\n", "  \r\n", '{"b": [2]}\r\n']) == [{"a": 1}, {"b": [2]}]


def test_read_jsonl_names_the_first_bad_line_and_why() -> None:
    with pytest.raises(JsonLineError) as bad_json:
        read_jsonl(['{"a": 1}', "", "{broken", "[1]"])
    assert (bad_json.value.number, bad_json.value.found) == (3, None)
    assert bad_json.value.problem is not None and "property name" in bad_json.value.problem
    with pytest.raises(JsonLineError) as not_object:
        read_jsonl(['{"a": 1}', "[1, 2]"])
    assert (not_object.value.number, not_object.value.problem, not_object.value.found) == (2, None, "list")
