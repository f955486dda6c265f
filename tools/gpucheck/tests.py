"""The suite's CUDA-marked tests (pytest -m cuda), run on the card. On the CPU rehearsal they are
only collected (they skip without CUDA): that proves the marker selects them."""
from __future__ import annotations

import re
import subprocess
import sys
from typing import List

from gpucheck.common import REPO, Env, Row


def run(env: Env) -> List[Row]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", str(REPO / "tests")]
    if env.rehearsal:
        cmd.append("--collect-only")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=80, check=False)
    (env.out_dir / "pytest.log").write_text(result.stdout + result.stderr)
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    if env.rehearsal:
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
        count = int(collected.group(1)) if collected else 0
        return [Row("CUDA-marked tests collected (CPU rehearsal: not run)", count > 0 and result.returncode == 0,
                    count, "tests", "> 0", tail)]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", tail)) else 0
    return [Row("pytest -m cuda", result.returncode == 0 and failed == 0 and skipped == 0, passed, "passed",
                "exit 0, nothing failed or skipped", tail)]
