"""The in-sandbox agent. Standard library only: it runs on the sandbox's own python3 and is shipped
as `python3 -I -c <this source> agent <config json>` with `/` as its working directory, so no file
has to be placed in the sandbox and nothing a program leaves in a writable directory (a `ctypes/`
package, a user site directory, a `.pth`) can ever be imported by it: isolated mode ignores the
environment, the user site and the working directory, and every module is imported at start.

Two processes, the agent and the zygote. Where the backend can give them a uid of their own (Docker,
and the local backend as root: `program_uid` in the config), they run as root with only the
capabilities SETUID, SETGID and KILL, and every program runs as `program_uid` with none: a program
can then neither signal, stop, renice, `prlimit` nor ptrace them, and a cleanup kills every process
of that uid in the sandbox's pid namespace, whatever its state (a thread-group leader that ended with
the raw `exit` syscall while another thread runs is a zombie leading a live thread, and is killed
too). Without one (an unprivileged user's bubblewrap or rlimit backend) they share the programs'
uid, and the agent checks after each task that the launcher was left alone.
* the agent speaks length-prefixed frames with the host on its stdin/stdout, writes files (as the
  programs' uid, through its file-system uid), pumps the program's stdin/stdout/stderr with byte caps,
  enforces the deadline, kills every leftover process and wipes the writable directories between
  tasks;
* the zygote is a fresh interpreter that never sees task data (so a forked program cannot find the
  last task's bytes in its inherited memory); it keeps one forked spare waiting, which takes the
  next run's pipes, drops to the programs' uid and becomes the program (the Python fast path runs it
  inside that fork, everything else execs), and it reports each program's exit status.
A launcher that died, stopped or was tampered with, or a cleanup that failed, makes the sandbox
refuse every later request, so that the host replaces it: nothing is ever restarted in place.

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
tarfile = shutil = None  # imported by main() in the agent only: the zygote forks faster without them


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
        view = view[os.write(fd, view) :]


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
                    write_regular(dir_fd, parts[-1], data)
                finally:
                    os.close(dir_fd)
    except tarfile.TarError as exc:
        raise ValueError("the files sent are not a valid tar stream: %s" % exc)
    finally:
        os.close(root_fd)


def write_regular(dir_fd, name, data):
    """Writes a file below dir_fd. Non-blocking open: a FIFO a program left at that name must not
    hang the agent (it fails with ENXIO, or is refused as not a regular file)."""
    mode = 0o755 if data.startswith(b"#!") else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("%r exists in the sandbox and is not a regular file" % name)
        os.set_blocking(fd, True)
        write_all(fd, data)
    finally:
        os.close(fd)


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
def process_table():
    """(pid, real uid, session id, state) of every process visible here; the real uid from
    `status`, because a non-dumpable process's /proc entry is owned by root whatever its uid."""
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
        if b"Uid" in fields and b"NSsid" in fields and b"State" in fields:
            found.append((int(name), int(fields[b"Uid"][0]), int(fields[b"NSsid"][-1]), fields[b"State"][0]))
    return found


def has_live_thread(pid, state):
    """Whether a process still runs code. The leader's state is not enough: a leader that ended with
    the raw `exit` syscall while another thread runs is a zombie leading a live thread group."""
    if state not in (b"Z", b"X"):
        return True
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    return any(process_state("%d/task/%s" % (pid, tid)) not in (b"Z", b"X") for tid in tids)


def kill_until_gone(victims, reap):
    """SIGKILLs every pid `victims()` lists until it lists none; False if a fork bomb outran us.
    SIGKILL to a thread group's leader ends the whole group, a zombie leader's included."""
    for _ in range(2000):
        pids = victims()
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        reap()
        time.sleep(0.0005)
    return False


# (table, column of the owner uid, column of the creator uid) in /proc/sysvipc
_IPC_TABLES = (("shm", 7, 9), ("msg", 7, 9), ("sem", 4, 6))


def ipc_objects(uid):
    """System V IPC objects owned or created by `uid`: they outlive processes and could carry data
    from one task to the next. The creator counts too: an owner may hand an object to another uid."""
    found = []
    for table, uid_col, cuid_col in _IPC_TABLES:
        try:
            with open("/proc/sysvipc/" + table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        found += [
            (table, int(row[1]))
            for row in rows
            if len(row) > cuid_col and uid in (int(row[uid_col]), int(row[cuid_col]))
        ]
    return found


def remove_ipc(objects):
    removers = {
        "shm": lambda i: LIBC.shmctl(i, 0, None),
        "msg": lambda i: LIBC.msgctl(i, 0, None),
        "sem": lambda i: LIBC.semctl(i, 0, 0, 0),
    }  # 0 = IPC_RMID
    for table, ident in objects:
        removers[table](ident)


def drop_to(uid):
    """Become `uid` (and its gid) for good: real, effective and saved ids, no supplementary groups.
    From root this clears the permitted, effective and ambient capabilities; the inheritable ones
    are cleared too, so that nothing of the launcher's is left to any program it execs."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    if LIBC.capset(header, bytes(24)) != 0:
        raise OSError(ctypes.get_errno(), "could not clear the capability sets")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        raise OSError(errno.EPERM, "could not drop to uid %d" % uid)


def read_limits(pid):
    """The text of /proc/PID/limits (every resource limit of the process), or None if unreadable."""
    try:
        with open("/proc/%s/limits" % pid, "rb") as f:
            return f.read()
    except OSError:
        return None


def fill_from(source, dest):
    """Copies the image's tree at `source` (a read-only volume) into the empty directory `dest`:
    directories, regular files and symbolic links (as links, never followed), permission bits and
    times kept (no owner, no extended attributes); anything else (a FIFO, a device) is left out.
    Runs as the programs' file-system uid, so what it makes is theirs to change, and only while no
    program runs."""
    with os.scandir(source) as entries:
        for entry in entries:
            target = os.path.join(dest, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(target, 0o700)
                fill_from(entry.path, target)
            elif entry.is_file(follow_symlinks=False):
                shutil.copyfile(entry.path, target, follow_symlinks=False)
                keep_meta(entry.stat(follow_symlinks=False), target)
    keep_meta(os.stat(source), dest)


def keep_meta(st, path):
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o1777)  # no setuid or setgid bit survives the copy
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def wipe_dir(root):
    """Deletes everything below root without following symlinks, first making dirs writable
    (the root too, where it is the programs': one of them may have locked it)."""
    try:
        os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | 0o700)
    except PermissionError:
        pass  # not the programs' (/tmp is root's): none of them can have locked it
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
        os.set_blocking(self.taken_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.spare, self.running = None, set()

    def serve(self):
        self.fork_spare()
        while True:
            ready, _, _ = select.select([self.taken_r, self.wake_r], [], [])
            if self.taken_r in ready:  # before reaping: a taken spare may already have exited
                self.note_taken()
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.spare is None:
                self.fork_spare()

    def note_taken(self):
        """Reads which spares took a run (each wrote its pid before it became the program)."""
        try:
            data = os.read(self.taken_r, 4096)
        except BlockingIOError:
            return
        for (pid,) in struct.iter_unpack(">I", data):
            self.running.add(pid)
            self.spare = None if pid == self.spare else self.spare

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
            if pid == self.spare:
                # Reaped before its "taken" note was read: it may have run a whole (short) program
                # since the last look, so look again before taking it for an idle spare.
                self.note_taken()
            if pid in self.running:
                self.running.discard(pid)
                self.sock.send(b"E %d %d %.6f" % (pid, status, usage.ru_utime + usage.ru_stime))
            elif pid == self.spare:
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == SPARE_SAW_NO_AGENT:
                    os._exit(0)
                self.spare = None  # killed while waiting: serve() forks another


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
        import resource

        for name, value in params["rlimits"].items():
            resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
        if params["uid"] is not None:
            drop_to(params["uid"])  # raises rather than run a program with the launcher's powers
        # Dumpable again, so that the program owns its /proc entries (the zygote's were root's).
        LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
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
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", write_through=write_through
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
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
class LauncherGone(Exception):
    """The zygote is dead, so no program can start here (the run never began)."""


class Agent:
    def __init__(self, config):
        self.config = config
        self.work = config["work"]
        self.program_uid = config.get("program_uid")
        if self.program_uid is not None:
            # File work happens as the programs' uid: what we write is theirs to change, and what
            # they leave (in directories they may have locked) is ours to delete.
            LIBC.setfsgid(self.program_uid)
            LIBC.setfsuid(self.program_uid)
            if LIBC.setfsuid(self.program_uid) != self.program_uid:
                raise OSError(errno.EPERM, "could not take the programs' file-system uid")
        # Roots the host listed that this sandbox lacks (no /dev/mqueue, say) are skipped. The
        # effective ids carry the file-system uid (a plain access() checks as the real uid).
        self.wipe_roots = [r for r in config["wipe"] if os.path.isdir(r) and os.access(r, os.W_OK, effective_ids=True)]
        # (image content, writable path) pairs: each path is filled again after every wipe.
        self.restore = [tuple(pair) for pair in config.get("restore", [])]
        self.restore_all()
        self.oom_file = next((p for p in config.get("oom_files", []) if os.path.exists(p)), None)
        self.python = os.path.realpath(sys.executable)
        self.agent_pid, self.launcher_session = os.getpid(), os.getsid(0)
        self.limits_at_start = read_limits("self")
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        # Sharing the programs' uid without a pid namespace: only the programs' sessions may be killed.
        self.sessions = set() if config.get("kill_scope") == "session" else None
        self.dirty = False
        self.start_zygote()

    def start_zygote(self):
        """A fresh exec, never a fork of the agent: the zygote must hold no task's bytes. Started
        once: a zygote that dies makes the sandbox dirty, and the host replaces the sandbox."""
        zsock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-I",
            "-c",
            sys.orig_argv[sys.orig_argv.index("-c") + 1],
            "zygote",
            str(child_sock.fileno()),
        ]
        os.set_inheritable(child_sock.fileno(), True)
        self.zygote = os.posix_spawn(sys.executable, argv, dict(os.environ))
        child_sock.close()
        self.zsock = zsock
        self.zygote_fd = os.pidfd_open(self.zygote)
        self.zygote_dead = False
        self.taken, self.exits = set(), {}

    def zygote_gone(self):
        if not self.zygote_dead and select.select([self.zygote_fd], [], [], 0)[0]:
            self.zygote_dead = True
        return self.zygote_dead

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
        """Kept by a cleanup that shares the programs' uid: the agent, the zygote, and its spares,
        which are the processes of the launcher's session that took no run (a program starts with
        setsid() and can never join that session again)."""
        if pid in (self.agent_pid, self.zygote):
            return True
        while not self.zygote_dead and select.select([self.zsock], [], [], 0)[0]:
            self.on_zygote(self.zsock.recv(64))
        return session == self.launcher_session and pid not in self.taken

    def programs(self, live_only=True):
        """Every process of the programs (only those that still run code, with `live_only`)."""
        table = process_table()
        if self.program_uid is not None:
            found = [(pid, state) for pid, uid, _, state in table if uid == self.program_uid]
        else:
            mine = os.getuid()
            found = [
                (pid, state)
                for pid, uid, sid, state in table
                if uid == mine and (self.sessions is None or sid in self.sessions) and not self.spared(pid, sid)
            ]
        return [pid for pid, state in found if not live_only or has_live_thread(pid, state)]

    def kill_programs(self, reap_within_s=2.0):
        """Kills every process of the programs, then waits until they are reaped: a zombie still
        counts against the next task's process limit. False if any outlives that."""
        if not kill_until_gone(self.programs, self.reap_orphans):
            return False
        end = time.monotonic() + reap_within_s
        while self.programs(live_only=False):
            if time.monotonic() > end:
                return False
            self.reap_orphans()
            time.sleep(0.001)
        return True

    def reap_orphans(self):
        """When the agent is PID 1 (local backend), orphans of the zygote's tree land here."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def serve(self):
        send_frame(
            1, {"ok": True, "ready": True, "pid": os.getpid(), "uid": os.getuid(), "python": sys.version.split()[0]}
        )
        while True:
            try:
                raw = read_exact(0, struct.unpack(">I", read_exact(0, 4))[0])
            except EOFError:
                os._exit(0)
            header = json.loads(raw)
            if self.dirty or self.zygote_gone():  # refuse, so that the host replaces this sandbox
                discard(sum(header["blobs"]))
                send_frame(
                    1, {"ok": False, "dirty": True, "error": "the sandbox could not be cleaned or its launcher failed"}
                )
                continue
            after = None
            try:
                reply, blobs, after = getattr(self, "op_" + header["op"])(header)
            except (OSError, ValueError) as exc:
                reply, blobs = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}, ()
            except LauncherGone as exc:
                self.dirty = True
                reply, blobs = {"ok": False, "dirty": True, "error": str(exc)}, ()
            send_frame(1, reply, blobs)
            # The end-of-task cleanup runs after the reply, while the host turns around; the next
            # request is read only when it is done.
            if after is not None and not after():
                self.dirty = True

    def read_blobs(self, header, streamed=0):
        sizes = header["blobs"]
        return [read_exact(0, n) for n in sizes[: len(sizes) - streamed]]

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
        """Kills every process of the last task and empties every writable directory; False (the
        sandbox is then dirty) if anything survived or the launcher was touched."""
        clean = self.kill_programs()
        if self.sessions is not None:
            self.sessions.clear()
        clean = self.clear_ipc() and clean
        clean = clean and self.launcher_untouched()
        for root in self.wipe_roots:
            try:
                wipe_dir(root)
            except OSError:
                clean = False
            clean = clean and not os.listdir(root)
        if clean:
            try:
                self.restore_all()
            except OSError:
                clean = False
        return clean

    def restore_all(self):
        """Fills each writable path with the image's content (it is empty: new, or just wiped)."""
        for source, dest in self.restore:
            fill_from(source, dest)

    def clear_ipc(self):
        """Removes the programs' System V IPC objects; with a uid of their own, from a short-lived
        fork that becomes that uid (no program runs any more, so none can meddle with it)."""
        uid = os.getuid() if self.program_uid is None else self.program_uid
        objects = ipc_objects(uid)
        if not objects:
            return True
        if self.program_uid is None:
            remove_ipc(objects)
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    drop_to(uid)
                    remove_ipc(objects)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        return not ipc_objects(uid)

    def launcher_untouched(self):
        """Whether the zygote lives and it, its spare and the agent keep the nice value and the
        limits they started with, unstopped. A program sharing their uid could change any of these
        (a zygote capped at one open file fails every later run); one with a uid of its own cannot,
        and then this only guards against the unexpected."""
        if self.zygote_gone() or os.getpriority(os.PRIO_PROCESS, 0) != self.nice:
            return False
        if read_limits("self") != self.limits_at_start:
            return False
        for pid, _, sid, _ in process_table():
            if sid != self.launcher_session or pid == self.agent_pid:
                continue
            limits, state = read_limits(pid), process_state(str(pid))
            if limits is None:
                continue  # a spare that just exited: the zygote makes another
            if state in (b"T", b"t") or limits != self.limits_at_start or process_nice(pid) != self.nice:
                return False
        return True

    def op_exec(self, header):
        (files,) = self.read_blobs(header, streamed=1)
        stdin_len = header["blobs"][-1]
        try:
            unpack(files, self.work)
            cwd = os.path.join(self.work, header["cwd"])
            if not os.path.isdir(cwd):
                raise ValueError("workdir %r does not exist in the sandbox" % header["cwd"])
            if self.zygote_gone():
                raise LauncherGone("the sandbox's process launcher died")
        except (OSError, ValueError, LauncherGone):
            discard(stdin_len)
            raise
        run = Run(self, header, cwd, stdin_len)
        try:
            reply, blobs = run.execute()
        except OSError as exc:
            # The agent's own resources failed mid-run: the program's doing where it shares our
            # uid (it capped our open files, say), the sandbox's otherwise. Replaced either way.
            self.dirty = True
            reply, blobs = run.aborted("%s: %s" % (type(exc).__name__, exc))
        # Sharing our uid, a program may have capped, stopped or reniced the launcher: that is
        # looked for after every run (sessions too), not only at the end of a task.
        tampered = self.program_uid is None and not self.launcher_untouched()
        if self.zygote_dead or not run.clean or tampered:
            self.dirty = True
        reply["clean"] = not self.dirty  # the host replaces a dirty sandbox at once
        reply["tampered"] = tampered or reply["outcome"] == "launcher_killed"
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
        params = json.dumps(
            {
                "argv": argv,
                "env": env,
                "cwd": self.cwd,
                "fast": fast,
                "rlimits": self.header["rlimits"],
                "uid": self.agent.program_uid,
            }
        ).encode()
        socket.send_fds(self.agent.zsock, [b"F"], [in_r, out_w, err_w, par_r])
        for fd in (in_r, out_w, err_w, par_r):
            os.close(fd)
        self.pid = None
        while self.pid is None:
            ready, _, _ = select.select(self.launcher_fds(), [], [])
            self.on_launcher(ready)
            if self.agent.zygote_dead:
                raise LauncherGone("the sandbox's process launcher died before the program started")
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
        ooms_after = read_oom_kills(oom_file)
        oom = ooms_after > ooms
        exit_code = decode_status(self.status) if self.status is not None else None
        if self.outcome in (None, "launcher_died") and oom and exit_code != 0:
            self.outcome = "oom"  # the kernel's OOM killer may have taken the launcher too
        elif self.outcome is None:
            self.outcome = "exited"
        reply = {
            "ok": True,
            "outcome": self.outcome,
            "exit_code": exit_code,
            "wall_s": wall,
            "cpu_s": self.cpu,
            "stdout_truncated": self.out_truncated,
            "stderr_truncated": self.err_truncated,
            "oom_kills": ooms_after,
        }
        return reply, (bytes(self.out), bytes(self.err))

    def aborted(self, why):
        """The reply for a run the agent could not see through; whatever it started is killed."""
        try:
            discard(self.stdin_left)  # the rest of stdin is still on the channel
            self.stdin_left = 0
            self.clean = self.agent.kill_programs()
        except OSError:
            self.clean = False
        outcome = "launcher_killed" if self.agent.program_uid is None else "launcher_died"
        start = getattr(self, "start", time.monotonic())
        reply = {
            "ok": True,
            "outcome": outcome,
            "exit_code": None,
            "wall_s": time.monotonic() - start,
            "cpu_s": 0.0,
            "stdout_truncated": self.out_truncated,
            "stderr_truncated": self.err_truncated,
            "detail": why,
        }
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
        """News from the zygote side: our program's pid, its exit, or the zygote's death (the
        program's doing when it shares the zygote's uid; otherwise a fault of the sandbox)."""
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
            # program stopped it (same uid). The sandbox is replaced after this run.
            if process_state(str(self.agent.zygote)) in (b"T", b"t"):
                self.agent.zygote_dead = True
        if self.agent.zygote_dead and self.status is None:
            self.outcome = "launcher_killed" if self.agent.program_uid is None else "launcher_died"

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
        self.clean = self.agent.kill_programs()
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


def stat_fields(path):
    """The fields of /proc/PATH/stat after the command name (state first), or None if gone."""
    try:
        with open("/proc/%s/stat" % path, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(path):
    """The state letter of /proc/PATH (a pid, or "pid/task/tid"); b"X" when it is gone."""
    fields = stat_fields(path)
    return fields[0] if fields else b"X"


def process_nice(pid):
    fields = stat_fields(str(pid))
    return int(fields[16]) if fields else None


def decode_status(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main():
    global shutil, tarfile
    role = sys.argv[1]
    if role == "zygote":
        zygote_main(int(sys.argv[2]))
    import shutil  # noqa: F401 - the agent's only imports beyond the zygote's, made before any task arrives
    import tarfile

    # Non-dumpable: a program running under the same uid cannot ptrace the agent or read its memory.
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    os.chdir("/")
    Agent(json.loads(sys.argv[2])).serve()


if __name__ == "__main__":
    main()
