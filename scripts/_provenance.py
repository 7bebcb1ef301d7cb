"""What every benchmark JSON records about where it ran: the commit of the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_sha(short: bool = False) -> str:
    """The checked-out commit of this repository ("unknown" outside a git checkout)."""
    command = ["git", "-C", str(REPO), "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
