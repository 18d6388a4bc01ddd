"""The fault suite's tally: every fault test records what it injected and how each attempt ended.

Rows are appended (one JSON line each) to ``.kybdr/fault-report.jsonl`` — or ``$KYBDR_FAULT_REPORT`` — and
``python -m tests.faults.report`` prints them as the table the issue asks for. A test asserts its own
"hung" and "left behind" counts are zero; the report is how a reader sees the totals of a whole run.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
COLUMNS: Final = ("injected", "attempted", "restorable", "failed_cleanly", "hung", "left_behind")


def report_path() -> Path:
    return Path(os.environ.get("KYBDR_FAULT_REPORT", REPO_ROOT / ".kybdr" / "fault-report.jsonl"))


@dataclass
class FaultTally:
    """One fault type's outcome in one test: counts, not booleans, so a run's totals add up."""

    fault: str
    injected: int = 0
    attempted: int = 0
    restorable: int = 0
    failed_cleanly: int = 0
    hung: int = 0
    left_behind: int = 0

    def record(self) -> None:
        path = report_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(self)) + "\n")

    def assert_clean(self) -> None:
        """Every attempt ended one of the two acceptable ways, and nothing hung or was left behind."""
        self.record()
        assert self.hung == 0, self
        assert self.left_behind == 0, self
        assert self.restorable + self.failed_cleanly == self.attempted, self


def table(path: Path) -> str:
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for column in COLUMNS:
            totals[row["fault"]][column] += int(row[column])
    header = "| fault | injected | backups attempted | completed and restorable | failed cleanly | hung | left behind |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for fault, counts in sorted(totals.items()):
        lines.append(f"| {fault} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else report_path()
    print(table(source))
