"""Faults across processes (benchmarks/faults.py): `splitlm serve` and three `splitlm client` processes over gRPC
with TLS, one process killed (or client 1 cut off by a silent link or stopped, without being killed) at a chosen
moment, must end bit for bit as the in-process run that leaves the lost client out of that round (a cut within the
grace period: as the clean run), and log every client step exactly once. One case per framework for each group of
faults, together covering every fault; `python benchmarks/faults.py` runs all 34."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow  # processes killed and restarted: about a minute a case

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "faults.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("splitlm_faults_benchmark", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAULTS = _harness()
CASES = list(zip(FAULTS.FRAMEWORKS, FAULTS.FAULTS, strict=True))  # sl x killed in round, psl x after round, ...
# a client cut off or stopped without being killed: past the grace, rolled back and rejoining in the same process
CASES += list(zip(FAULTS.LINK_FAULT_FRAMEWORKS, FAULTS.LINK_FAULTS, strict=True))


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("framework", "fault"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_a_fault_ends_as_its_reference(framework: str, fault: str, tmp_path: Path) -> None:
    for attempt in range(3):  # a fault is timed by polling files: on a loaded machine a poll can miss its moment
        case = tmp_path / f"case{attempt}"
        result = FAULTS.run_case(framework, fault, case)
        if result.get("fault_hit") or result.get("error") is not None:
            break
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(case.glob("*.log")))
    assert result.get("error") is None, f"{result}\n{logs}"
    assert result["fault_hit"], f"the fault was injected too late to test anything: {result}"
    assert result["completed"], f"a process did not exit 0: {result}\n{logs}"
    assert result["lost_steps"] == 0 and result["duplicated_steps"] == 0, result
    assert result["equal_to_reference"], f"{result}\n{logs}"
