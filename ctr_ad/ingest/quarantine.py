"""Summaries of quarantined lines, shared by ``ctr-ad ingest`` and ``ctr-ad predict``."""

from __future__ import annotations

import re
from collections import Counter


def reason_kind(reason: str) -> str:
    """Group quarantine reasons for a summary: drop the offending values."""
    kind = re.sub(r"found \d+", "found other", reason)
    return re.sub(r"^((?:field|label) \S+): .* (is not .*)$", r"\1 \2", kind)


def too_many_bad(read: int, bad: int, limit: float) -> bool:
    return bad > limit * read


def quarantine_summary(by_kind: Counter, examples: list[dict], read: int, bad: int, limit: float,
                       where: str = "quarantine.jsonl") -> str:
    lines = [f"{bad} of {read} rows ({bad / max(read, 1):.2%}) are malformed, above --max-bad-fraction "
             f"{limit:.2%}. Most common reasons:"]
    lines += [f"  {n:>8}  {k}" for k, n in by_kind.most_common(5)]
    lines += ["First bad lines:"]
    lines += [f"  {e['file']}:{e['line']}: {e['reason']}" for e in examples[:5]]
    lines += [f"All bad lines are listed in {where}; raise --max-bad-fraction to accept them."]
    return "\n".join(lines)
