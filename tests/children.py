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
        raise expired(f"{what} did not finish", alone_s, f"{' '.join(map(str, cmd))[:500]}\n{tail[-3000:]}") from None


def expired(what: str, alone_s: float, output: str) -> AssertionError:
    """The failure of children past MARGIN x alone_s: what, the limit, the machine's load, their output."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return AssertionError(f"{what} within {MARGIN * alone_s:.0f} s ({MARGIN} x the {alone_s:.0f} s it takes alone; "
                          f"load average {load}): {output}")


def run_together(cmds: list[tuple[list[str], dict]], *, what: str, alone_s: float) -> list[subprocess.CompletedProcess]:
    """Start every (cmd, Popen kwargs) at once, as the nodes of one job are, and wait for all of
    them within MARGIN x alone_s seconds; past that, kill them all and fail naming ``what``, the
    limit and each one's last output. Output goes through files, so no child blocks on a pipe."""
    import tempfile
    import time

    limit = MARGIN * alone_s
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(open(f"{tmp}/{i}.out", "w+"), open(f"{tmp}/{i}.err", "w+")) for i in range(len(cmds))]
        procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kw)
                 for (cmd, kw), (out, err) in zip(cmds, logs, strict=True)]
        deadline = time.monotonic() + limit
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        done = []
        for p, (cmd, _), (out, err) in zip(procs, cmds, logs, strict=True):
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    if hung:
        tails = "".join(f"\n--- {i} ({' '.join(map(str, done[i].args))[:300]}):\n{done[i].stderr[-2000:]}"
                        for i in range(len(done)))
        raise expired(f"{what}: {hung} did not finish", alone_s, tails)
    return done
