"""The scan of every process's log after a run (issue 12): tracebacks, and recipients left
unmasked, in any spelling, by anyone (ours, Dramatiq's, uvicorn's lines alike).

A recipient is masked as worker.logging masks it: `+7999***0123`, `c***@example.com`. The
producers' recipients are known, so a phone is found by its digits wherever they stand in
a line, whatever separates them (`8 (999) 100-01-23` is 89991000123 is +79991000123); an
email is flagged whenever its local part is more than one character and `***`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tests.support.chaos.model import LogFindings

#: A run of digits with the separators people write numbers with.
_DIGITS = re.compile(r"\d[\d \t().\-]{5,}\d")
#: An email as worker.logging finds one (its `_EMAIL`), the whole local part captured.
_EMAIL = re.compile(r"([A-Za-z0-9._%+-]+)@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
#: How many trailing digits identify a recipient: the national number of a Russian phone.
_NATIONAL = 10
_TRACEBACK = "Traceback (most recent call last)"


def national(recipient: str) -> str | None:
    """The last 10 digits of a phone recipient as written, None for an email or a non-number."""
    if "@" in recipient:
        return None
    digits = re.sub(r"\D", "", recipient)
    return digits[-_NATIONAL:] if len(digits) >= _NATIONAL else None


def _phones_in(line: str, wanted: set[str]) -> list[str]:
    found = []
    for match in _DIGITS.finditer(line):
        digits = re.sub(r"\D", "", match.group(0))
        for start in range(len(digits) - _NATIONAL + 1):
            if digits[start : start + _NATIONAL] in wanted:
                found.append(match.group(0))
                break
    return found


def _emails_in(line: str) -> list[str]:
    return [m.group(0) for m in _EMAIL.finditer(line) if not re.fullmatch(r".\*\*\*", m.group(1))]


def _tracebacks_in(line: str) -> int:
    count = line.count(_TRACEBACK)
    if count or not line.startswith("{"):
        return count
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    # A JSON line whose exception was rendered some other way still carries one.
    exception = record.get("exception") if isinstance(record, dict) else None
    return 1 if exception else 0


def scan_logs(log_dir: Path, recipients: Iterable[str]) -> LogFindings:
    """Every `*.log` under `log_dir`: tracebacks per process, and each unmasked recipient
    (or any unmasked email) as `process: text`."""
    wanted = {n for r in recipients if (n := national(r)) is not None}
    findings = LogFindings()
    for path in sorted(log_dir.rglob("*.log")):
        findings.files += 1
        name = path.stem
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                findings.lines += 1
                tracebacks = _tracebacks_in(line)
                if tracebacks:
                    findings.tracebacks[name] = findings.tracebacks.get(name, 0) + tracebacks
                    if len(findings.traceback_samples) < 20:
                        findings.traceback_samples.append(f"{name}: {line.strip()[:300]}")
                for text in _phones_in(line, wanted) + _emails_in(line):
                    findings.unmasked.append(f"{name}: {text.strip()}")
    return findings
