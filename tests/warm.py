"""Warm command lines for the tests: `python -m MODULE ARGS` run in a process forked from a server that has already
imported the heavy libraries, instead of a fresh interpreter that imports them again.

Each `python -m dnd_jax.<command>` started by a test spends ~5-7 s of CPU importing torch, transformers, peft, jax,
flax and orbax before it reads its first argument (measured: `python -c "import peft"` 4.9 s, the experiment's
imports 7.2 s, on 2 EPYC cores), and the suite starts about 150 of them. Here a server per pytest worker (and per
start-up environment) imports them once; each command is a `fork()` of it that then runs exactly what
`python -m` runs (`runpy._run_module_as_main`, the same `__main__`, argv, cwd, environment, standard streams, exit
status, tracebacks and atexit handlers), as its own process: it can be killed (SIGKILL, SIGTERM) and its exit
status is a real one. Nothing has initialised a JAX backend, a torch thread pool or any thread before the fork.

What differs from a fresh interpreter, and where a test needs that it starts a real one (`subprocess`):
  - the libraries of `PRELOAD` are already in `sys.modules` (a test of what a command imports cannot use this);
  - the environment variables read at import time are the server's: a command whose environment differs from a
    server's in anything but `RUNTIME_ENV` (read after start-up) gets a server of its own (started on first use).

`run` and `Popen` take the arguments of `subprocess.run` / `subprocess.Popen` that the tests use; any other form of
command line (a script path, `-c`) goes to `subprocess` unchanged.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Imported by the server before any fork: the libraries every command of this repository imports at start-up.
PRELOAD = ("numpy", "jax", "jax.numpy", "flax", "flax.nnx", "optax", "orbax.checkpoint", "ml_collections", "absl.flags",
           "safetensors.numpy", "tokenizers", "torch", "transformers", "peft", "tensorboardX")  # fmt: skip
# Read after start-up (by XLA when a backend starts, by pytest, by this repository's code when it needs them): these
# may differ between the commands of one server (prefixes).
RUNTIME_ENV = ("XLA_FLAGS", "PYTEST_", "DND_JAX_")
# Servers kept per pytest worker (each holds ~0.37 GB resident); the least recently used idle one goes first.
MAX_SERVERS = 3
WARM = os.environ.get("DND_JAX_TEST_WARM", "1") != "0"  # DND_JAX_TEST_WARM=0: every command in a fresh interpreter


# ---------------------------------------------------------------------------------------------------- the server


def _send(conn: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    sent = socket.send_fds(conn, [msg], list(fds)) if fds else 0
    conn.sendall(msg[sent:])


def _exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        more = conn.recv(n - len(buf))
        if not more:
            raise ConnectionError("truncated message")
        buf += more
    return buf


def _recv(conn: socket.socket, nfds: int = 0):
    """Exactly one message (a 4-byte length, then JSON; the file descriptors come with its first bytes), so a second
    message on the same connection (the exit status after the pid) is never read with the first; None at its end."""
    if nfds:
        head, fds, _, _ = socket.recv_fds(conn, 4, nfds)
    else:
        head, fds = conn.recv(4), []
    if not head:
        return None, fds
    head += _exactly(conn, 4 - len(head))
    return json.loads(_exactly(conn, struct.unpack("!I", head)[0])), fds


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)


def serve(path: str, parent: int) -> None:
    """The server: imports `PRELOAD`, then forks one child per request until `parent` (the pytest worker) ends."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from jax._src import xla_bridge

    # No Python thread and no JAX backend may exist at a fork. (Native pools are another matter: OpenBLAS starts its
    # threads when numpy loads unless OMP_NUM_THREADS=1, as in the suite's workers, and re-makes them in a fork child
    # through its own atfork handlers, as for any forking numpy program.)
    assert threading.active_count() == 1, f"a preloaded library started threads: {threading.enumerate()}"
    assert not xla_bridge._backends, "a preloaded library started a JAX backend: its device count would be fixed"
    gc.freeze()  # the preloaded objects stay out of the children's collections (no copy-on-write of their pages)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the path appears once connections are accepted
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its exit status goes to
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                req, fds = _recv(conn, 3)
            except (OSError, ValueError):
                req, fds = None, []
            conn.settimeout(None)
            if req is None or len(fds) != 3:  # a client that went away or sent garbage: nothing to run
                _close(fds)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as e:
                _close(fds)
                try:
                    _send(conn, {"error": f"fork: {e}"})
                except OSError:
                    pass
                conn.close()
                continue
            if pid == 0:  # the command; never back into this loop
                try:
                    listener.close()
                    for c in waiting.values():
                        c.close()
                    _child(conn, req, fds)
                finally:
                    os._exit(70)
            _close(fds)
            try:
                _send(conn, {"pid": pid})
            except OSError:  # the test went away: its command still runs to its end and is reaped below
                pass
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"status": status})
                except OSError:  # the test went away without waiting
                    pass
                conn.close()
    Path(path).unlink(missing_ok=True)


def _child(conn: socket.socket, req: dict, fds: list[int]) -> None:
    """Becomes `python -m MODULE ARGS` in the request's cwd, environment and standard streams; exits as it does."""
    import runpy

    conn.close()
    if req["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    sys.argv = ["-m", *req["argv"][3:]]  # [python, "-m", MODULE, *ARGS]
    if "numpy" in sys.modules:  # numpy's global generator: seeded from the OS in every fresh interpreter, so here too
        sys.modules["numpy"].random.seed()
    interrupted = False
    try:
        runpy._run_module_as_main(req["argv"][2], alter_argv=True)
        code = 0
    except SystemExit as e:  # what the interpreter's top level does with it
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
    except BaseException:  # noqa: BLE001 - the interpreter's top level: any exception is printed, status 1
        kind, value, tb = sys.exc_info()
        value.__traceback__ = tb.tb_next  # from runpy's frames on, as `python -m` prints it (the hook reads this one)
        sys.excepthook(kind, value, tb.tb_next)
        interrupted, code = kind is KeyboardInterrupt, 130 if kind is KeyboardInterrupt else 1
    # The interpreter's exit, less the teardown of every module: non-daemon threads waited for, atexit handlers,
    # streams flushed. (Tearing down torch, transformers and jax object by object would touch, and so copy, most of
    # the server's memory: ~2 s per command.)
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = 120 if stream is sys.stdout and not code else code
    if interrupted:  # Python ends on an uncaught KeyboardInterrupt by SIGINT's own default action
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


# ---------------------------------------------------------------------------------------------------- the client


class _Server:
    def __init__(self, env: dict):
        short = len(tempfile.gettempdir()) > 60 and os.path.isdir("/tmp")  # a socket path has at most 107 bytes
        self.path = os.path.join(tempfile.mkdtemp(prefix="dnd_jax_warm_", dir="/tmp" if short else None), "sock")
        code = f"from tests.warm import serve; serve({self.path!r}, {os.getpid()})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO), **env},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
        self.running = 0  # commands started here whose exit status has not come back yet
        self.used = time.monotonic()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(Path(self.path).parent, ignore_errors=True)


_servers: dict[tuple, _Server] = {}
_lock = threading.Lock()


def _import_env(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(RUNTIME_ENV)))


def _server(env: dict) -> _Server:
    """The server for `env` (started on first use), its command count already raised."""
    key = _import_env(env)
    with _lock:
        server = _servers.get(key)
        if server is not None and server.proc.poll() is not None:  # ended (killed from outside): start another
            _servers.pop(key).stop()
            server = None
        if server is None:
            idle = sorted((s.used, k) for k, s in _servers.items() if not s.running)
            for _, k in idle[: max(0, len(_servers) + 1 - MAX_SERVERS)]:
                _servers.pop(k).stop()
            server = _servers[key] = _Server(env)
        server.running += 1
        server.used = time.monotonic()
    t0 = time.monotonic()
    while not os.path.exists(server.path):
        if server.proc.poll() is not None:
            _release(server)
            raise RuntimeError(f"the warm command server ended with status {server.proc.returncode}")
        if time.monotonic() - t0 > 300:
            _release(server)
            raise RuntimeError("the warm command server did not start in 300 s")
        time.sleep(0.02)
    return server


def _release(server: _Server) -> None:
    with _lock:
        server.running -= 1


@atexit.register
def _stop_servers() -> None:
    while _servers:
        _servers.popitem()[1].stop()


def _warmable(cmd) -> bool:
    return WARM and isinstance(cmd, (list, tuple)) and len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m"


def _fd_for(spec, default: int, stdout_fd: int | None = None) -> tuple[int, int | None]:
    """(the fd the child gets, the read end of a pipe for the test or None) for a stdin/stdout/stderr argument."""
    if spec is None:
        return os.dup(default), None
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (r, w) if default == 0 else (w, r)
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None
    if spec == subprocess.STDOUT:
        return os.dup(stdout_fd), None
    if isinstance(spec, int):
        return os.dup(spec), None
    return os.dup(spec.fileno()), None


class Popen:
    """`subprocess.Popen(cmd, ...)` for `[sys.executable, "-m", MODULE, *ARGS]`, forked from a warm server."""

    def __init__(self, cmd, env=None, cwd=None, stdin=None, stdout=None, stderr=None, text=False,
                 start_new_session=False):  # fmt: skip
        env = dict(os.environ if env is None else env)
        cwd = os.path.abspath(cwd or os.getcwd())
        if not os.path.isdir(cwd):
            raise FileNotFoundError(2, "No such file or directory", cwd)  # as subprocess raises it
        self.args, self.returncode = list(cmd), None
        ends: list[int] = []  # every descriptor made here and still open, closed if the start fails
        try:
            in_fd, in_w = _fd_for(stdin, 0)
            ends += [fd for fd in (in_fd, in_w) if fd is not None]
            out_fd, out_r = _fd_for(stdout, 1)
            ends += [fd for fd in (out_fd, out_r) if fd is not None]
            err_fd, err_r = _fd_for(stderr, 2, out_fd)
            ends += [fd for fd in (err_fd, err_r) if fd is not None]
            self._server = _server(env)
        except BaseException:
            _close(ends)
            raise
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(self._server.path)
            req = {"argv": [str(a) for a in cmd], "env": env, "cwd": cwd, "new_session": bool(start_new_session)}
            _send(self._conn, req, [in_fd, out_fd, err_fd])
            _close([in_fd, out_fd, err_fd])
            ends = [fd for fd in (in_w, out_r, err_r) if fd is not None]
            msg, _ = _recv(self._conn)
            if msg is None or "pid" not in msg:
                raise RuntimeError(f"warm server {self._server.proc.pid} did not start {cmd[2]}: {msg}")
        except BaseException:
            _close(ends)
            self._conn.close()
            _release(self._server)
            raise
        self.pid = msg["pid"]

        def stream(fd, mode):
            if fd is None:
                return None
            raw = open(fd, mode + "b")
            return io.TextIOWrapper(raw, write_through=mode == "w") if text else raw

        self.stdin, self.stdout, self.stderr = stream(in_w, "w"), stream(out_r, "r"), stream(err_r, "r")

    def poll(self):
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], 0)
            if ready:
                self._status()
        return self.returncode

    def _status(self):
        msg, _ = _recv(self._conn)
        self._conn.close()
        _release(self._server)
        if msg is None:
            self.returncode = -signal.SIGKILL
            raise RuntimeError(f"warm server {self._server.proc.pid} ended before reporting pid {self.pid}'s status")
        self.returncode = os.waitstatus_to_exitcode(msg["status"])

    def wait(self, timeout=None):
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._status()
        return self.returncode

    def send_signal(self, sig):
        self.poll()
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended and reaped by the server: its status is on the way (as subprocess)
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def communicate(self, input=None, timeout=None):
        """(stdout, stderr) read to their ends and stdin fed, each in its own thread as subprocess does, then the exit
        status. A reader's exception is raised here."""
        got: dict[str, object] = {}
        errors: list[BaseException] = []

        def read(name, s):
            try:
                got[name] = s.read()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(e)

        def feed():
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:  # the command ended without reading it all (ignored, as subprocess does)
                pass

        pipes = [(n, s) for n, s in (("out", self.stdout), ("err", self.stderr)) if s is not None and not s.closed]
        threads = [threading.Thread(target=read, args=p, daemon=True) for p in pipes]
        if self.stdin is not None and not self.stdin.closed:
            threads.append(threading.Thread(target=feed, daemon=True))
        for t in threads:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        if errors:
            raise errors[0]
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.close()
        return got.get("out"), got.get("err")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        self.wait()


def popen(cmd, **kw):
    """`Popen` for a warm-able command line (`[sys.executable, "-m", ...]`), else `subprocess.Popen`."""
    return Popen(cmd, **kw) if _warmable(cmd) else subprocess.Popen(cmd, **kw)


def run(cmd, *, input=None, capture_output=False, timeout=None, check=False, stdout=None, stderr=None, **kw):
    """`subprocess.run` for a warm-able command line (`[sys.executable, "-m", ...]`), else `subprocess.run` itself."""
    if not _warmable(cmd):
        return subprocess.run(cmd, input=input, capture_output=capture_output, timeout=timeout, check=check,
                              stdout=stdout, stderr=stderr, **kw)  # fmt: skip
    if capture_output:
        stdout = stderr = subprocess.PIPE
    stdin = subprocess.PIPE if input is not None else kw.pop("stdin", None)
    proc = Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, **kw)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # (its readers end at the pipes' end of file, the command being gone)
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
