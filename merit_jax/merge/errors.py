"""The error raised when models or branches cannot be merged."""

from __future__ import annotations

from collections.abc import Sequence


class MergeError(ValueError):
    """Inputs that cannot be merged; ``problems`` lists every problem found, not only the first."""

    def __init__(self, summary: str, problems: Sequence[str]):
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{summary} ({len(self.problems)} problem(s)):\n{listing}")
