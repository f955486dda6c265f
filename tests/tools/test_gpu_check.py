"""The GPU proof's CPU rehearsal: every section of tools/gpu_check.py runs at tiny sizes on the CPU
(Triton interpreted), so the script cannot rot between the sessions that have a GPU."""
import json
import subprocess
import sys

import pytest

from tests.support import REPO, cli_env

pytestmark = pytest.mark.slow
SECTIONS = ("ceilings", "kernels", "benchmarks", "training", "tests")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu-rehearsal", str(out)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=1200)
    return out, result


def test_every_section_runs_and_passes(rehearsal):
    out, result = rehearsal
    payload = json.loads((out / "results.json").read_text())
    assert payload["environment"]["mode"] == "cpu rehearsal"
    by_name = {s["section"]: s for s in payload["sections"]}
    assert tuple(by_name) == SECTIONS, result.stdout[-3000:]
    for name, section in by_name.items():
        assert section["error"] is None, (name, section["error"])
        assert section["rows"], name
        failed = [r for r in section["rows"] if r["ok"] is False]
        assert not failed, (name, failed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_report_and_the_table(rehearsal):
    out, result = rehearsal
    report = (out / "report.md").read_text()
    assert "CPU rehearsal" in report
    for name in SECTIONS:
        assert f"## {name} (" in report
    last = result.stdout.strip().splitlines()[-len(SECTIONS) - 1:]
    assert last[0].split()[:3] == ["section", "pass", "fail"]  # the short table is printed last
    assert [line.split()[0] for line in last[1:]] == list(SECTIONS)
