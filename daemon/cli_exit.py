"""What a `cptd` command's exit code says, and the one-line error every failure ends in.

Scripts and workflow steps (Airflow, Argo) branch on the code, so the numbers are one table for every command
(EXIT, printed by `cptd --help` and kept in docs/daemon.md); a command uses those that apply.
"""

from __future__ import annotations

import json
import sys
from enum import IntEnum


class Exit(IntEnum):
    """What a command's exit code says; the same numbers for every command (a command uses those that apply)."""

    OK = 0
    NO = 1
    BAD_INPUT = 2
    DOES_NOT_FIT = 3
    REFUSED = 4
    UNREACHABLE = 5
    REJECTED = 10
    FAILED = 11
    CANCELLED = 12
    OTHER_END = 13
    TIMEOUT = 14
    SHADOWED = 15


EXIT: dict[Exit, str] = {
    Exit.OK: "success; with --wait: the round ended DEPLOYED",
    Exit.NO: "the answer is no (validate-policy: invalid; seed-replay, index-echoes, rater-train: invalid lines; rollback failed;"
    " accept-redis-reset without --yes), or an unexpected error (named)",
    Exit.BAD_INPUT: "bad input: usage, an unreadable file, invalid settings, too few valid annotation lines (rater-train),"
    " or the daemon answered an error (4xx/5xx)",
    Exit.DOES_NOT_FIT: "plan: the round does not fit what was declared",
    Exit.REFUSED: "trigger: the daemon started no round (its reason is printed: empty buffer, a round running, rounds disabled);"
    " approve, reject: the round is not waiting for approval (its state is printed), or was decided otherwise already",
    Exit.UNREACHABLE: "no daemon answers at --url ($CPTD_URL); while waiting: none answered for 5 minutes",
    Exit.REJECTED: "--wait: the round ended REJECTED (the gate said no)",
    Exit.FAILED: "--wait: the round ended FAILED",
    Exit.CANCELLED: "--wait: the round ended FAILED because an operator cancelled it",
    Exit.OTHER_END: "--wait: the round ended in another terminal state (ROLLED_BACK)",
    Exit.TIMEOUT: "--wait: --timeout passed before the round ended (it goes on)",
    Exit.SHADOWED: "--wait: the round ended SHADOWED (deploy.mode shadow: the gate accepted, nothing was deployed)",
}


class CliError(Exception):
    """A refusal or failure said in one line (main prints it), with its exit code."""

    def __init__(self, message: str, code: Exit = Exit.BAD_INPUT):
        super().__init__(message)
        self.code = code


def say_error(message: str, as_json: bool) -> None:
    """One line: {"error": ...} on stdout for --json (what the script reads), else the message on stderr."""
    if as_json:
        print(json.dumps({"error": message}))
    else:
        print(f"cptd: {message}", file=sys.stderr)


class ApiError(CliError):
    """The daemon answered an error (`status`), or none answered (`status` None: Exit.UNREACHABLE)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message, Exit.UNREACHABLE if status is None else Exit.BAD_INPUT)
        self.status = status
