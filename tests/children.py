"""The tests' child processes: a time limit sized from the work each runs, and a failure that
says what was running.

``alone_s`` is what the child takes on this project's 2-core CPU machine with nothing else
running; the limit is 20 times that, so a loaded CI machine, a cold import cache or a slower CPU
does not fail a test that would pass, while a hang still ends.
"""

from __future__ import annotations

import os
import subprocess

MARGIN = 20


def run(cmd: list[str], *, what: str, alone_s: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) within MARGIN x alone_s seconds; past
    that, a test failure naming ``what``, the limit, the machine's load and the child's last output."""
    limit = MARGIN * alone_s
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired as err:
        tail = err.stderr or err.stdout or b""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        raise AssertionError(f"{what} did not finish within {limit:.0f} s ({MARGIN} x the {alone_s:.0f} s it takes "
                             f"alone; load average {load}): {' '.join(map(str, cmd))[:500]}\n{tail[-3000:]}") from None
