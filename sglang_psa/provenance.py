"""Which code produced a result: the commit every benchmark and evaluation JSON records."""

from __future__ import annotations

import os
import subprocess


def git_commit() -> str:
    """$PSA_COMMIT when set (the device machine gets a copy of the work tree, not the repository),
    else the short HEAD of the checkout this package lives in, else "unknown"."""
    if os.environ.get("PSA_COMMIT"):
        return os.environ["PSA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:  # no git on this machine
        return "unknown"
    return out.stdout.strip() or "unknown"
