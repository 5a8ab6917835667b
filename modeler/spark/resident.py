"""Model partitions held in one long-lived process per executor, so a batch moves only what it touches.

Why (docs/scale.md): a cached RDD record is immutable and lives in the JVM as pickled bytes, so
every batch unpickled the whole model partition into a Python worker, copied it, pickled the
new one back and unpickled it once more for the sink. That is O(model) per batch, and at
ML-25M size it was most of a batch. Here the partition stays unpickled in a *state server*,
one Python process per Spark application and host, reached over a Unix socket by any
Python worker of the application's executors there. The model RDD carries only ``(pid, Token(key, epoch))``; a
task sends the server its messages and a function, the server runs the stage on the
partition in place and answers with what the stage returns (stats, the sink's answer, the
rows another stage needs): batch-sized either way.

* **Epochs.** Every change of a partition names the epoch it expects and the one it makes.
  A server that lacks the key, or holds another epoch, answers :data:`MISSING`; the driver
  then rebuilds from its snapshot (:class:`modeler.spark.streaming_als.StreamingALS`). A
  step that fails half-way drops the partition, so a half-applied batch is never mistaken
  for a finished one. A step retried after it succeeded (a task that died after it) is
  answered again without being applied twice.
* **Lifetime.** The server is started by the first task that needs it (``subprocess``, the
  worker's own interpreter and ``sys.path``) and exits when the daemon it serves exits, i.e.
  with its executor. A lost executor therefore loses its partitions, exactly as it loses its
  cached blocks.
* **Trust.** The socket lives in a directory only this user can open (mode 0700); what
  crosses it is pickled, between Spark's own processes, as Spark's own blocks are.

numpy-free and Spark-free: the functions it runs bring their own imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, NamedTuple

from common.errors import StreamrecError


class StateLost(StreamrecError, RuntimeError):
    """A task found its model partition missing (executor lost, server restarted, or a
    half-applied step dropped): the driver rebuilds it from its snapshot."""


class Token(NamedTuple):
    """What the model RDD holds for partition ``pid``: the Spark application (whose state
    server holds it, one per host), the model's key and the partition's epoch there."""

    app: str
    key: str
    epoch: int


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: The answer of a server that lacks the requested (key, pid, epoch).
MISSING = _Missing()

START_TIMEOUT_S = 60.0


class Pickled(NamedTuple):
    """A model partition as the state server pickled it (op ``dump``): what a snapshot RDD
    holds. The Python worker that fetches it never unpickles it, so a snapshot costs the
    worker the pickle's bytes, not the partition as objects next to its pickle; ``install``
    unpickles it in the server."""

    blob: bytes

    def load(self) -> Any:
        return pickle.loads(self.blob)


class _Raw:
    """A server's answer sent with ``send_bytes`` (the client gets the bytes)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    epoch: int
    part: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], _Entry] = {}
        self.lock = threading.Lock()

    def entry(self, key: str, pid: int) -> _Entry | None:
        with self.lock:
            return self.entries.get((key, pid))

    @contextlib.contextmanager
    def current(self, key: str, pid: int, epoch: int) -> Iterator[_Entry | None]:
        """The entry of (key, pid), locked, if it holds ``epoch``; else None."""
        e = self.entry(key, pid)
        if e is None:
            yield None
            return
        with e.lock:
            yield e if e.epoch == epoch else None

    def handle(self, op: str, args: tuple) -> Any:
        if op == "ping":
            return os.getpid()
        if op == "install":
            key, pid, epoch, part, drop = args
            self.drop(drop)
            if isinstance(part, Pickled):  # a snapshot's record (op "dump")
                part = part.load()
            with self.lock:
                self.entries[(key, pid)] = _Entry(epoch, part)
            return True
        if op == "has":
            key, pid, epoch = args
            e = self.entry(key, pid)
            return e is not None and e.epoch == epoch
        if op == "drop":
            self.drop(args[0])
            return True
        if op == "dump":  # the partition pickled, for a snapshot: answered raw (serve_connection)
            key, pid, epoch = args
            with self.current(key, pid, epoch) as e:
                return MISSING if e is None else _Raw(pickle.dumps(e.part, protocol=pickle.HIGHEST_PROTOCOL))
        if op == "read":
            key, pid, epoch, fn, msgs = args
            with self.current(key, pid, epoch) as e:
                return MISSING if e is None else pickle.loads(fn)(pid, e.part, msgs)
        if op == "step":
            key, pid, expect, new, fn, msgs, finish, drop = args
            self.drop(drop)
            e = self.entry(key, pid)
            if e is None:
                return MISSING
            with e.lock:
                if e.epoch == expect:
                    try:
                        e.part = pickle.loads(fn)(pid, e.part, msgs)
                    except BaseException:
                        with self.lock:  # half applied: never serve it again
                            self.entries.pop((key, pid), None)
                        raise
                    e.epoch = new
                elif e.epoch != new:  # neither before nor (a retry) after this step
                    return MISSING
                return pickle.loads(finish)(pid, e.part) if finish is not None else None
        raise ValueError(f"unknown state-server operation {op!r}")

    def drop(self, keys: Any) -> None:
        if not keys:
            return
        gone = set(keys)
        with self.lock:
            for k in [k for k in self.entries if k[0] in gone]:
                del self.entries[k]

    def serve_connection(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    op, args = conn.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply: Any = ("ok", self.handle(op, args))
                except BaseException as exc:  # reported to the task, which raises it
                    import traceback
                    reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                try:
                    if reply[0] == "ok" and isinstance(reply[1], _Raw):
                        # Large bytes go as they are: pickling them into the reply would
                        # hold a second copy of the partition's pickle in this process.
                        blob, reply = reply[1].blob, None
                        conn.send(("raw", len(blob)))
                        conn.send_bytes(blob)
                        del blob
                    else:
                        conn.send(reply)
                except (EOFError, OSError):
                    return


def serve(path: str, watch_pid: int) -> None:
    """Run the state server on ``path`` until process ``watch_pid`` (the PySpark daemon
    that started it) is gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = Listener(path, family="AF_UNIX")
    server = _Server()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(watch_pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True).start()
    while True:
        conn = listener.accept()
        threading.Thread(target=server.serve_connection, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------------------------------------
# The client (in the PySpark workers)
# ---------------------------------------------------------------------------------------------


def _socket_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), f"streamrec-state-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise StateLost(f"{d} must belong to this user with mode 0700 (it holds the model's "
                        "state-server sockets); remove it or fix its mode")
    return d


def socket_path(app: str) -> str:
    """The state server of Spark application ``app`` on this host (shared by the app's
    executors here; it watches the PySpark daemon of the one that started it)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in app)[:80]
    return os.path.join(_socket_dir(), f"{safe}.sock")


_conn: dict[str, Connection] = {}


def _start(path: str, watch_pid: int) -> None:
    """Start the server detached (a double fork: it is nobody's child, so it never lingers
    as a zombie of the worker that happened to start it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    # glibc malloc: a fixed mmap threshold, so the large numpy arrays of a step or a dump
    # always come from mmap and go back to the system when freed (the default threshold
    # rises to 32 MB after such a free, and later arrays then fragment the heaps and stay
    # resident), and few arenas for the one-thread-per-connection server. Overridable.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(8 << 20))
    env.setdefault("MALLOC_ARENA_MAX", "2")
    child = os.fork()
    if child == 0:  # pragma: no cover - the intermediate process
        try:
            with open(path + ".log", "ab") as log:
                subprocess.Popen([sys.executable, "-m", "modeler.spark.resident", path, str(watch_pid)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                 start_new_session=True, close_fds=True)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def _connect(path: str) -> Connection:
    conn = _conn.get(path)
    if conn is not None:
        return conn
    watch_pid = os.getppid()
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn = Client(path, family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError):
            _start(path, watch_pid)
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    conn = Client(path, family="AF_UNIX")
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise StateLost(f"the state server at {path} did not start "
                                        f"(see {path}.log)") from None
                    time.sleep(0.05)
    _conn[path] = conn
    return conn


def call(app: str, op: str, *args: Any) -> Any:
    """One request to application ``app``'s state server on this host (started if need be)."""
    path = socket_path(app)
    for attempt in (0, 1):
        conn = _connect(path)
        try:
            conn.send((op, args))
            status, value = conn.recv()
            if status == "raw":
                value = conn.recv_bytes()
            break
        except (EOFError, OSError, BrokenPipeError):
            _conn.pop(path, None)  # the server died: the second attempt starts a new one
            if attempt:
                raise
    if status == "error":
        raise RuntimeError(f"state server: {value}")
    return value


def server_pid(app: str) -> int:
    return call(app, "ping")


if __name__ == "__main__":
    # Through the module's own name, not __main__: MISSING must be the object the clients
    # unpickle (modeler.spark.resident.MISSING).
    from modeler.spark.resident import serve as _serve

    _serve(sys.argv[1], int(sys.argv[2]))
