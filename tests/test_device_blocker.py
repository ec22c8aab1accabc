"""The device rehearsal's import blocker hides exactly the packages the GPU machine lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE = REPO / "benchmarks" / "device"

PROBE = """
import importlib.util, json
names = ["selenium", "pydantic", "torch", "numpy", "sail"]
print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))
try:
    import selenium
except ModuleNotFoundError as exc:
    print("refused:", exc.name)
"""


def run_probe(allow: list[Path]) -> list[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DEVICE / "blocker"), str(REPO / "src")]),
        "SAIL_DEVICE_ALLOW": os.pathsep.join(map(str, allow)),
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip().splitlines()


def test_blocker_hides_packages_missing_on_the_device_and_keeps_carried_ones():
    # selenium (a dev dependency here) is on neither list; pydantic travels as a wheel.
    lines = run_probe([DEVICE / "device_packages.txt", DEVICE / "wheels.txt"])
    assert (
        lines[0]
        == '{"selenium": false, "pydantic": true, "torch": true, "numpy": true, "sail": true}'
    )
    assert lines[1] == "refused: selenium"


def test_blocker_hides_a_package_once_its_wheel_is_not_carried(tmp_path):
    no_wheels = tmp_path / "wheels.txt"
    no_wheels.write_text("# nothing carried\n")
    lines = run_probe([DEVICE / "device_packages.txt", no_wheels])
    assert '"pydantic": false' in lines[0] and '"torch": true' in lines[0]
