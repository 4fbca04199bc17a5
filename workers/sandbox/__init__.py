"""Sandboxes for untrusted code: warm hardened Docker pools and a local (bubblewrap) backend.

    async with SandboxPool(backend="docker", image="codeworld-sandbox:py311", size=4) as pool:
        result = await pool.run(ExecRequest(command=["python3", "main.py"], files={"main.py": b"..."}))
        async with pool.session() as box:          # one sandbox for several calls
            await box.put_files({"a.py": b"..."})
            await box.exec(ExecRequest(command=["python3", "-m", "pytest", "-q"]))
            files = await box.get_files(["report.txt"])

See docs/sandbox.md.
"""

from workers.sandbox.config import ImagePolicy, SandboxLimits, SandboxProfile
from workers.sandbox.models import ExecRequest, ExecResult, Isolation, PoolStats, Status
from workers.sandbox.pool import DEFAULT_IMAGE, SandboxError, SandboxPool, SandboxUnavailable, Session

__all__ = [
    "DEFAULT_IMAGE",
    "ExecRequest",
    "ExecResult",
    "ImagePolicy",
    "Isolation",
    "PoolStats",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxProfile",
    "SandboxUnavailable",
    "Session",
    "Status",
]
