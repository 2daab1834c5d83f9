"""The 30-second soak in CI: bench/soak.py --minutes 0.5 against a real server (one uvicorn worker, temp
SQLite), 50 mixed requests per second. Zero 5xx, zero unexpected statuses, zero lost feedback, every call
that gave cards audited, and no runaway memory. The 10-minute run is `python bench/soak.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_thirty_second_soak(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", "0.5", "--json", "--work-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    report = result.stderr[-6000:]
    print(report)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["server_errors"] == 0, report
    assert summary["errors"] == {}, report
    assert summary["feedback"]["lost_items"] == 0, report
    assert summary["feedback"]["acknowledged_items"] > 100, report  # feedback was really exercised
    assert summary["audit"]["missing"] == 0, report
    assert summary["server"]["tracebacks"] == 0, report
    assert summary["requests"] >= 1400 and summary["achieved_rate"] >= 45, report  # the rate was held
    assert summary["answers"]["malformed"] == {"400": summary["answers"]["malformed"]["400"]}, report
    assert summary["rss"]["end_mib"] < summary["rss"]["warm_mib"] * 1.5, report
    assert result.returncode == 0, report
