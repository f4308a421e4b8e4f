"""User-fixable problems. Library code raises MedtuneError; only cli.py prints it and exits 2."""

from __future__ import annotations


class MedtuneError(Exception):
    """A problem the user can fix (bad input, bad config, missing package). The message says what to do next."""


class DataError(MedtuneError):
    """One or more bad rows; each problem is one `file:line: field: what is wrong` line."""

    def __init__(self, problems: list[str], limit: int = 50):
        self.problems = problems
        shown = problems[:limit]
        more = f"\n... and {len(problems) - limit} more problems" if len(problems) > limit else ""
        super().__init__("\n".join(shown) + more)


class TrainingInterrupted(MedtuneError):
    """SIGTERM/SIGINT during training: a checkpoint was written; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
