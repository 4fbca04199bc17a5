"""The in-sandbox agent. Standard library only: it runs on the sandbox's own python3 and is shipped
as `python3 -c <this source> agent <config json>`, so no file has to be placed in the sandbox.

Two processes, both under the workload's uid:
* the agent speaks length-prefixed frames with the host on its stdin/stdout, writes files, pumps the
  program's stdin/stdout/stderr with byte caps, enforces the deadline, kills every leftover process
  and wipes the writable directories between tasks;
* the zygote is a fresh interpreter that never sees task data (so a forked program cannot find the
  last task's bytes in its inherited memory); it keeps one forked spare waiting, which takes the
  next run's pipes and becomes the program (the Python fast path runs it inside that fork,
  everything else execs), and it reports each program's exit status.

Frames: 4-byte big-endian header length, JSON header, then the raw blobs whose lengths the header
lists under "blobs". An exec request's last blob (stdin) is streamed, not buffered.
"""

import ctypes
import errno
import io
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
CHUNK = 1 << 16
LIBC = ctypes.CDLL(None, use_errno=True)


def read_exact(fd, n):
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("host closed the channel")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send_frame(fd, header, blobs=()):
    header = dict(header, blobs=[len(b) for b in blobs])
    raw = json.dumps(header).encode()
    write_all(fd, struct.pack(">I", len(raw)) + raw)
    for blob in blobs:
        write_all(fd, blob)


# ----------------------------------------------------------------------------------- file transfer
def open_dir(root_fd, parts, create):
    """Walks `parts` below root_fd without following any symlink; returns a new dir fd."""
    fd = os.dup(root_fd)
    for part in parts:
        if create:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def checked_parts(name):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts:
        raise ValueError("unsafe path %r" % name)
    return parts


def unpack(tar_bytes, root):
    """Writes a host-made tar of regular files below root; refuses anything that could escape."""
    if not tar_bytes:
        return
    import tarfile  # here, not at the top: the zygote (same source) must stay small to fork fast
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ValueError("only regular files may be sent, not %r" % member.name)
                parts = checked_parts(member.name)
                data = tar.extractfile(member).read()
                dir_fd = open_dir(root_fd, parts[:-1], create=True)
                try:
                    mode = 0o755 if data.startswith(b"#!") else 0o644
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                    fd = os.open(parts[-1], flags, mode, dir_fd=dir_fd)
                    try:
                        write_all(fd, data)
                    finally:
                        os.close(fd)
                finally:
                    os.close(dir_fd)
    except tarfile.TarError as exc:
        raise ValueError("the files sent are not a valid tar stream: %s" % exc)
    finally:
        os.close(root_fd)


def read_regular(root_fd, name, budget):
    """Content of a regular file below root_fd, or None if missing, a symlink or not regular."""
    try:
        parts = checked_parts(name)
        dir_fd = open_dir(root_fd, parts[:-1], create=False)
    except (OSError, ValueError):
        return None
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > budget:
            return None
        return read_exact(fd, st.st_size) if st.st_size else b""
    except (OSError, EOFError):
        return None
    finally:
        os.close(fd)


def pack(root, names, budget):
    import tarfile
    buf = io.BytesIO()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with tarfile.open(fileobj=buf, mode="w:") as tar:
            for name in names:
                data = read_regular(root_fd, name, budget)
                if data is None:
                    continue
                budget -= len(data)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    finally:
        os.close(root_fd)
    return buf.getvalue()


# --------------------------------------------------------------------------------------- cleanup
def our_processes():
    """(pid, session id, state) of every process of our real uid; the real uid from `status`,
    because a non-dumpable process's /proc entry is owned by root whatever its uid."""
    uid = str(os.getuid()).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = {}
        try:
            with open("/proc/%s/status" % name, "rb") as f:
                for line in f:
                    key, _, value = line.partition(b":")
                    fields[key] = value.split()
        except OSError:
            continue
        if fields.get(b"Uid", [b""])[0] == uid and b"NSsid" in fields:
            found.append((int(name), int(fields[b"NSsid"][-1]), fields[b"State"][0]))
    return found


def kill_all(spared, sessions=None):
    """SIGKILLs every other process of our uid until none is left; False if a fork bomb outran us.
    `spared(pid, session)` says which to keep; with `sessions` (no pid namespace and a shared uid)
    only processes in the programs' own sessions are candidates."""
    for _ in range(2000):
        victims = [pid for pid, sid, state in our_processes()
                   if state not in (b"Z", b"X") and not spared(pid, sid)
                   and (sessions is None or sid in sessions)]
        if not victims:
            return True
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.0005)
    return False


def remove_ipc():
    """Removes System V IPC objects of our uid: they outlive processes and could carry data over."""
    uid = os.getuid()
    tables = (("shm", 7, lambda i: LIBC.shmctl(i, 0, None)),
              ("msg", 7, lambda i: LIBC.msgctl(i, 0, None)),
              ("sem", 4, lambda i: LIBC.semctl(i, 0, 0, 0)))
    for table, uid_col, remove in tables:
        try:
            with open("/proc/sysvipc/" + table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:
            if len(row) > uid_col and int(row[uid_col]) == uid:
                remove(int(row[1]))


def wipe_dir(root):
    """Deletes everything below root without following symlinks, first making dirs writable."""
    stack, dirs = [root], []
    while stack:
        path = stack.pop()
        if path != root:
            os.chmod(path, 0o700)
            dirs.append(path)
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for path in reversed(dirs):
        os.rmdir(path)


# --------------------------------------------------------------------------------------- the zygote
class Zygote:
    """Keeps one spare fork waiting for the next run, so no fork is on the latency path. The
    spare takes the run's pipes straight from the agent's socket, tells the zygote (which forks
    the next spare) and the agent, then becomes the program. The zygote reports exits."""

    def __init__(self, sock_fd):
        self.sock = socket.socket(fileno=sock_fd)
        self.wake_r, self.wake_w = os.pipe()
        self.taken_r, self.taken_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.spare, self.running = None, set()

    def serve(self):
        self.fork_spare()
        while True:
            ready, _, _ = select.select([self.taken_r, self.wake_r], [], [])
            if self.taken_r in ready:  # before reaping: a taken spare may already have exited
                for (pid,) in struct.iter_unpack(">I", os.read(self.taken_r, 4096)):
                    self.running.add(pid)
                    self.spare = None if pid == self.spare else self.spare
                if self.spare is None:
                    self.fork_spare()
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()

    def fork_spare(self):
        pid = os.fork()
        if pid == 0:
            for fd in (self.wake_r, self.wake_w, self.taken_r):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            spare_main(self.sock, self.taken_w)
        self.spare = pid

    def reap(self):
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.running:
                self.running.discard(pid)
                self.sock.send(b"E %d %d %.6f" % (pid, status, usage.ru_utime + usage.ru_stime))
            elif pid == self.spare:
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == SPARE_SAW_NO_AGENT:
                    os._exit(0)
                self.fork_spare()  # killed while waiting (by a program or a cleanup): replace it


SPARE_SAW_NO_AGENT = 3


def spare_main(sock, taken_w):
    """A waiting fork: take the next run's pipes, tell the zygote and the agent, run it."""
    msg, fds, _, _ = socket.recv_fds(sock, 64, 8)
    if not msg:
        os._exit(SPARE_SAW_NO_AGENT)
    os.write(taken_w, struct.pack(">I", os.getpid()))
    sock.send(b"P %d" % os.getpid())
    child_main(fds)


def zygote_main(sock_fd):
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    zygote = Zygote(sock_fd)
    import runpy, traceback, types, atexit, resource  # noqa: F401,E401 - preloaded for the forks
    import gc
    # Objects made so far never need collecting: moving them out of the collector's reach keeps
    # a fork's collections from touching (and copying) every inherited page.
    gc.collect()
    gc.freeze()
    zygote.serve()


def child_main(fds):
    """In the fork: become the program. Never returns."""
    params = {"argv": ["program"]}
    try:
        in_r, out_w, err_w, par_r = fds
        params = json.loads(read_exact(par_r, struct.unpack(">I", read_exact(par_r, 4))[0]))
        os.setsid()
        for target, fd in ((0, in_r), (1, out_w), (2, err_w)):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)
        LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        import resource
        for name, value in params["rlimits"].items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
        os.chdir(params["cwd"])
        if params.get("fast"):
            run_python(params["fast"], params["env"])
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        argv = params["argv"]
        os.execvpe(argv[0], argv, params["env"])
    except OSError as exc:
        os.write(2, ("%s: %s\n" % (params["argv"][0], exc.strerror)).encode())
        os._exit(127 if exc.errno == errno.ENOENT else 126)
    except BaseException as exc:  # the fork must never fall back into the zygote's loop
        os.write(2, ("sandbox: could not start the program: %r\n" % (exc,)).encode())
        os._exit(126)


def run_python(spec, env):
    """The fast path: run a Python program in this pre-loaded interpreter, as `python3` would."""
    import atexit, builtins, traceback, types  # noqa: E401
    os.environ.clear()
    os.environ.update(env)
    sys.dont_write_bytecode = spec["no_bytecode"] or sys.dont_write_bytecode
    write_through = spec["unbuffered"]
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                  encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                                    encoding="utf-8", write_through=write_through)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                                    encoding="utf-8", errors="backslashreplace",
                                                    line_buffering=True)
    try:
        if spec["kind"] == "module":
            import runpy
            sys.argv = ["-m"] + spec["args"]
            sys.path[0] = os.getcwd()
            runpy.run_module(spec["target"], run_name="__main__", alter_sys=True)
            exit_code = 0
        else:
            exit_code = run_source(spec, types, builtins)
    except SystemExit as exc:
        exit_code = system_exit_code(exc)
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != spec["filename"]:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        exit_code = 1
    os._exit(finish_python(exit_code, atexit))


def run_source(spec, types, builtins):
    if spec["kind"] == "file":
        with open(spec["target"], "rb") as f:
            source = f.read()
        sys.argv = [spec["target"]] + spec["args"]
        sys.path[0] = os.path.dirname(os.path.abspath(spec["target"]))
    else:
        source = spec["target"].encode()
        sys.argv = ["-c"] + spec["args"]
        sys.path[0] = ""
    code = compile(source, spec["filename"], "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if spec["kind"] == "file":
        main.__file__ = spec["target"]
    sys.modules["__main__"] = main
    exec(code, main.__dict__)
    return 0


def system_exit_code(exc):
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def finish_python(exit_code, atexit):
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as exc:
        exit_code = system_exit_code(exc)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            exit_code = 120
    return exit_code


# ----------------------------------------------------------------------------------------- agent
class Agent:
    def __init__(self, config):
        self.config = config
        self.work = config["work"]
        # Roots the host listed that this sandbox lacks (no /dev/mqueue, say) are skipped.
        self.wipe_roots = [r for r in config["wipe"] if os.path.isdir(r) and os.access(r, os.W_OK)]
        self.oom_file = next((p for p in config.get("oom_files", []) if os.path.exists(p)), None)
        self.python = os.path.realpath(sys.executable)
        self.agent_pid, self.launcher_session = os.getpid(), os.getsid(0)
        self.zsock = None
        # Without a pid namespace or a uid of its own, only the programs' sessions may be killed.
        self.sessions = set() if config.get("kill_scope") == "session" else None
        self.start_zygote()

    def start_zygote(self):
        """A fresh exec, never a fork of the agent: the zygote must hold no task's bytes."""
        if self.zsock is not None:  # the old zygote is dead, stopped or tampered with: end it
            try:  # its spare exits by itself when it sees the old socket close
                os.kill(self.zygote, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.zsock.close()
            os.close(self.zygote_fd)
        zsock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = list(sys.orig_argv[:3]) + ["zygote", str(child_sock.fileno())]
        os.set_inheritable(child_sock.fileno(), True)
        self.zygote = os.posix_spawn(sys.executable, argv, dict(os.environ))
        child_sock.close()
        self.zsock = zsock
        self.zygote_fd = os.pidfd_open(self.zygote)
        self.zygote_dead = False
        self.taken, self.exits = set(), {}

    def on_zygote(self, msg):
        """Handles one message from the zygote side: "P pid" (a spare took a run) or
        "E pid status cpu" (a run's program exited; kept in self.exits)."""
        if not msg:
            self.zygote_dead = True
            return ("X", 0)
        parts = msg.split()
        kind, pid = parts[0].decode(), int(parts[1])
        if kind == "P":
            self.taken.add(pid)
        elif kind == "E":
            self.taken.discard(pid)
            self.exits[pid] = (int(parts[2]), float(parts[3]))
        return (kind, pid)

    def spared(self, pid, session):
        """Kept by a cleanup: the agent, the zygote, and its spares, which are the processes of
        the launcher's session that took no run (a program starts with setsid() and can never
        join that session again)."""
        if pid in (self.agent_pid, self.zygote):
            return True
        while not self.zygote_dead and select.select([self.zsock], [], [], 0)[0]:
            self.on_zygote(self.zsock.recv(64))
        return session == self.launcher_session and pid not in self.taken

    def reap_orphans(self):
        """When the agent is PID 1 (local backend), orphans of a dead zygote land here."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def serve(self):
        send_frame(1, {"ok": True, "ready": True, "pid": os.getpid(), "uid": os.getuid(),
                       "python": sys.version.split()[0]})
        dirty = False
        while True:
            try:
                raw = read_exact(0, struct.unpack(">I", read_exact(0, 4))[0])
            except EOFError:
                os._exit(0)
            header = json.loads(raw)
            if dirty:  # the last cleanup failed: refuse, so the host replaces this sandbox
                discard(sum(header["blobs"]))
                send_frame(1, {"ok": False, "dirty": True, "error": "the sandbox could not be cleaned"})
                continue
            after = None
            try:
                reply, blobs, after = getattr(self, "op_" + header["op"])(header)
            except (OSError, ValueError) as exc:
                reply, blobs = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}, ()
            send_frame(1, reply, blobs)
            # The end-of-task cleanup runs after the reply, while the host turns around; the next
            # request is read only when it is done.
            dirty = after is not None and not after()

    def read_blobs(self, header, streamed=0):
        sizes = header["blobs"]
        return [read_exact(0, n) for n in sizes[:len(sizes) - streamed]]

    def op_ping(self, header):
        return {"ok": True, "pid": os.getpid()}, (), None

    def op_put(self, header):
        (tar_bytes,) = self.read_blobs(header)
        unpack(tar_bytes, self.work)
        return {"ok": True}, (), None

    def op_get(self, header):
        self.read_blobs(header)
        return {"ok": True}, (pack(self.work, header["paths"], header["max_bytes"]),), None

    def op_reset(self, header):
        self.read_blobs(header)
        return {"ok": True, "clean": self.reset()}, (), None

    def reset(self):
        """Kills every process of the last task and empties every writable directory."""
        clean = kill_all(self.spared, self.sessions)
        if self.sessions is not None:
            self.sessions.clear()
        self.reap_orphans()
        remove_ipc()
        clean = clean and self.launcher_untouched()
        for root in self.wipe_roots:
            try:
                wipe_dir(root)
            except OSError:
                clean = False
            clean = clean and not os.listdir(root)
        return clean

    def launcher_untouched(self):
        """A program shares the launcher's uid: it may have stopped or reniced the zygote or its
        spare, which would slow every later task. Either one found so makes the sandbox dirty."""
        for pid, sid, _ in our_processes():
            if sid != self.launcher_session or pid == self.agent_pid:
                continue
            try:
                with open("/proc/%d/stat" % pid, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # a spare that just exited: the zygote makes another
            if fields[0] in (b"T", b"t") or int(fields[16]) != os.getpriority(os.PRIO_PROCESS, 0):
                return False
        return True

    def op_exec(self, header):
        files, = self.read_blobs(header, streamed=1)
        stdin_len = header["blobs"][-1]
        try:
            unpack(files, self.work)
            cwd = os.path.join(self.work, header["cwd"])
            if not os.path.isdir(cwd):
                raise ValueError("workdir %r does not exist in the sandbox" % header["cwd"])
        except (OSError, ValueError):
            discard(stdin_len)
            raise
        run = Run(self, header, cwd, stdin_len)
        reply, blobs = run.execute()
        if self.zygote_dead:
            kill_all(self.spared, self.sessions)
            self.reap_orphans()
            self.start_zygote()
        reply["clean"] = run.clean
        return reply, blobs, (self.reset if header["wipe"] else None)

    def fast_spec(self, argv, env):
        """How to run argv as a fork of the zygote, or None when it needs a real exec."""
        exe = which(argv[0], env.get("PATH", ""))
        if exe is None or os.path.realpath(exe) != self.python:
            return None
        spec = {"unbuffered": False, "no_bytecode": False, "args": []}
        rest = argv[1:]
        while rest and rest[0] in ("-u", "-B"):
            spec["unbuffered" if rest.pop(0) == "-u" else "no_bytecode"] = True
        if not rest or rest[0] == "-" or (rest[0].startswith("-") and rest[0] not in ("-c", "-m")):
            return None
        if rest[0] in ("-c", "-m"):
            if len(rest) < 2:
                return None
            kind = "code" if rest[0] == "-c" else "module"
            spec.update(kind=kind, target=rest[1], args=rest[2:], filename="<string>")
        else:
            spec.update(kind="file", target=rest[0], args=rest[1:], filename=rest[0])
        return spec


def which(name, path):
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        if directory and os.access(candidate, os.X_OK):
            return candidate
    return None


def discard(n):
    while n:
        n -= len(read_exact(0, min(n, 1 << 20)))


def read_oom_kills(path):
    if not path:
        return 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Run:
    """One execution: spawn through the zygote, pump bytes with caps, enforce the deadline."""

    def __init__(self, agent, header, cwd, stdin_len):
        self.agent, self.header, self.cwd = agent, header, cwd
        self.stdin_left, self.stdin_buf = stdin_len, b""
        self.cap = header["max_output"]
        self.out, self.err = bytearray(), bytearray()
        self.out_truncated = self.err_truncated = False
        self.outcome, self.status, self.cpu = None, None, 0.0
        self.clean, self.pid_fd, self.exited_at = False, None, None

    def spawn(self):
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        par_r, par_w = os.pipe()
        env = dict(self.agent.config["env"], **self.header["env"])
        argv = self.header["argv"]
        fast = self.agent.fast_spec(argv, env) if self.header["fast"] else None
        params = json.dumps({"argv": argv, "env": env, "cwd": self.cwd, "fast": fast,
                             "rlimits": self.header["rlimits"]}).encode()
        socket.send_fds(self.agent.zsock, [b"F"], [in_r, out_w, err_w, par_r])
        for fd in (in_r, out_w, err_w, par_r):
            os.close(fd)
        self.pid = None
        while self.pid is None:
            ready, _, _ = select.select(self.launcher_fds(), [], [])
            self.on_launcher(ready)
            if self.agent.zygote_dead:
                raise OSError("the sandbox's process launcher died")
        if self.agent.sessions is not None:
            self.agent.sessions.add(self.pid)
        # Exit news of our own: if the program stops the zygote, its exit report never comes.
        self.pid_fd = os.pidfd_open(self.pid)
        self.start = time.monotonic()
        write_all(par_w, struct.pack(">I", len(params)) + params)
        os.close(par_w)
        os.set_blocking(self.in_w, False)

    def execute(self):
        oom_file = self.agent.oom_file
        ooms = read_oom_kills(oom_file)
        self.spawn()
        self.pump(self.start + self.header["timeout_s"])
        wall = time.monotonic() - self.start
        discard(self.stdin_left)
        oom = read_oom_kills(oom_file) > ooms
        exit_code = decode_status(self.status) if self.status is not None else None
        if self.outcome is None:
            self.outcome = "oom" if oom and exit_code != 0 else "exited"
        reply = {"ok": True, "outcome": self.outcome, "exit_code": exit_code, "wall_s": wall,
                 "cpu_s": self.cpu, "stdout_truncated": self.out_truncated,
                 "stderr_truncated": self.err_truncated}
        return reply, (bytes(self.out), bytes(self.err))

    def pump(self, deadline):
        open_reads = {self.out_r, self.err_r}
        while self.status is None and self.outcome is None:
            rlist = list(open_reads) + self.launcher_fds()
            if self.stdin_left and len(self.stdin_buf) < (1 << 20):
                rlist.append(0)
            wlist = [self.in_w] if self.in_w is not None and self.stdin_buf else []
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                self.outcome = "timeout"
                continue
            if self.exited_at is not None:  # waiting for the exit report: look at the zygote often
                timeout = min(timeout, 0.02)
            ready_r, ready_w, _ = select.select(rlist, wlist, [], timeout)
            self.on_ready(ready_r, ready_w, open_reads)
        self.finish(open_reads)

    def launcher_fds(self):
        fds = [] if self.agent.zygote_dead else [self.agent.zsock, self.agent.zygote_fd]
        return fds + ([self.pid_fd] if getattr(self, "pid_fd", None) is not None else [])

    def on_launcher(self, ready):
        """News from the zygote side: our program's pid, its exit, or the zygote's death (only
        the program can have killed it: same uid, and nothing else runs here)."""
        if not self.agent.zygote_dead and self.agent.zsock in ready:
            kind, pid = self.agent.on_zygote(self.agent.zsock.recv(64))
            if kind == "P" and self.pid is None:
                self.pid = pid
        if self.pid in self.agent.exits:  # also news read while a cleanup looked for the spare
            self.status, self.cpu = self.agent.exits.pop(self.pid)
        if not self.agent.zygote_dead and self.agent.zygote_fd in ready:
            self.agent.zygote_dead = True
        if self.pid_fd is not None and self.pid_fd in ready:
            os.close(self.pid_fd)
            self.pid_fd, self.exited_at = None, time.monotonic()
        if self.exited_at is not None and self.status is None and not self.agent.zygote_dead:
            # The program is gone but its exit report is not: if the zygote is stopped, the
            # program stopped it (same uid). It is replaced after this run.
            if process_state(self.agent.zygote) in (b"T", b"t"):
                self.agent.zygote_dead = True
        if self.agent.zygote_dead and self.status is None:
            self.outcome = "launcher_killed"

    def on_ready(self, ready_r, ready_w, open_reads):
        self.on_launcher(ready_r)
        if 0 in ready_r:
            chunk = os.read(0, min(CHUNK, self.stdin_left))
            if not chunk:
                raise EOFError("host closed the channel mid-stdin")
            self.stdin_left -= len(chunk)
            self.stdin_buf += chunk
        if ready_w:
            self.feed_stdin()
        if self.in_w is not None and not self.stdin_left and not self.stdin_buf:
            os.close(self.in_w)
            self.in_w = None
        for fd in ready_r:
            if fd in open_reads:
                self.on_output(fd, open_reads)

    def feed_stdin(self):
        try:
            sent = os.write(self.in_w, self.stdin_buf[:CHUNK])
            self.stdin_buf = self.stdin_buf[sent:]
        except BlockingIOError:
            pass
        except BrokenPipeError:  # the program closed its stdin: the rest is dropped
            os.close(self.in_w)
            self.in_w, self.stdin_buf = None, b""

    def on_output(self, fd, open_reads):
        chunk = os.read(fd, CHUNK)
        if not chunk:
            open_reads.discard(fd)
            os.close(fd)
            return
        buf = self.out if fd == self.out_r else self.err
        room = self.cap - len(buf)
        buf += chunk[:room]
        if len(chunk) > room:
            if fd == self.out_r:
                self.out_truncated, self.outcome = True, "output_limit"
            else:
                self.err_truncated = True

    def finish(self, open_reads):
        """The program ended or must end: kill everything it started, then drain what it wrote."""
        self.clean = kill_all(self.agent.spared, self.agent.sessions)
        self.on_launcher([])  # the exit report may have been read during the cleanup
        end = time.monotonic() + 2.0
        while (open_reads or self.status is None) and time.monotonic() < end:
            if self.agent.zygote_dead and not open_reads:
                break
            rlist = list(open_reads) + self.launcher_fds()
            ready_r, _, _ = select.select(rlist, [], [], max(0.0, end - time.monotonic()))
            self.on_launcher(ready_r)
            for fd in ready_r:
                if fd in open_reads:
                    self.on_output(fd, open_reads)
        for fd in list(open_reads) + [fd for fd in (self.in_w, self.pid_fd) if fd is not None]:
            os.close(fd)
        self.in_w = self.pid_fd = None


def process_state(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"X"


def decode_status(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main():
    role = sys.argv[1]
    if role == "zygote":
        zygote_main(int(sys.argv[2]))
    # Non-dumpable: a program running under the same uid cannot ptrace the agent or read its memory.
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    Agent(json.loads(sys.argv[2])).serve()


if __name__ == "__main__":
    main()
