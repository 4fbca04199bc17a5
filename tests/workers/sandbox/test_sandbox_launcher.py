"""The launcher (the agent's zygote) on its own, in a child interpreter: races that a whole
sandbox shows only rarely and only under load, made to happen every time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# The spare takes a run and its program ends before the zygote has looked at the spare's "taken"
# note (the zygote was busy reaping something else): the zygote must still report the exit.
REAPED_BEFORE_NOTED = r"""
import json, os, select, socket, struct, time
from workers.sandbox import agent
host, launcher = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
zygote = agent.Zygote(launcher.fileno())
zygote.fork_spare()
spare = zygote.spare
in_r, in_w = os.pipe(); out_r, out_w = os.pipe(); err_r, err_w = os.pipe(); par_r, par_w = os.pipe()
socket.send_fds(host, [b"F"], [in_r, out_w, err_w, par_r])
assert host.recv(64) == b"P %d" % spare
params = json.dumps({"argv": ["true"], "env": {"PATH": "/usr/bin:/bin"}, "cwd": "/", "fast": None,
                     "rlimits": {}, "uid": None}).encode()
os.write(par_w, struct.pack(">I", len(params)) + params)
select.select([os.pidfd_open(spare)], [], [], 10)  # the program has ended
zygote.reap()
host.settimeout(5)
kind, pid = host.recv(64).split()[:2]
print(kind.decode(), int(pid) == spare)
"""


def test_a_program_reaped_before_its_taken_note_is_still_reported() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REAPED_BEFORE_NOTED], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["E", "True"], proc.stdout
