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

import collections
import contextlib
import fcntl
import io
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


#: Bytes of a snapshot's pickle per record: no process of the snapshot's path (the state
#: server, the Python worker, the JVM) holds more of it than a few of these at once. Under
#: half a G1 region (1 MiB at the driver's 2g heap), so the JVM never allocates them as
#: humongous objects (at 600k ratings: JVM peak 619 MiB against 695 with 4 MiB records).
CHUNK_BYTES = 256 << 10


class PickleChunk(NamedTuple):
    """Piece ``seq`` of a model partition as its state server pickled it (op ``dump``): a
    snapshot RDD holds a partition as these records, in order, ``last`` on the final one.
    No worker unpickles them; ``install_chunk`` hands each to a server, which unpickles the
    partition when the last has come."""

    seq: int
    blob: bytes
    last: bool


class _ChunkWriter:
    """A file for :class:`pickle.Pickler` that sends what it is given as ``send_bytes``
    messages of :data:`CHUNK_BYTES` (the last one shorter), never holding more than one."""

    def __init__(self, conn: Connection, size: int) -> None:
        self.conn, self.size, self.buf, self.sent = conn, size, bytearray(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n, i = len(view), 0
        if self.buf:
            i = min(n, self.size - len(self.buf))
            self.buf += view[:i]
            if len(self.buf) < self.size:
                return n
            self._send(self.buf)
            self.buf = bytearray()
        while n - i >= self.size:  # a large array's bytes go out in place, a chunk at a time
            self._send(view[i:i + self.size])
            i += self.size
        self.buf += view[i:]
        return n

    def _send(self, data: Any) -> None:
        self.conn.send_bytes(data)
        self.sent += 1

    def close(self) -> None:
        if self.buf:  # never an empty message: that ends the answer (Server.dump)
            self._send(self.buf)
            self.buf = bytearray()


class _ChunkReader(io.RawIOBase):
    """The concatenation of a list of chunks as a file, each chunk let go once read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.at = collections.deque(chunks), 0
        chunks.clear()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out, done = memoryview(b).cast("B"), 0
        while done < len(out) and self.chunks:
            head = self.chunks[0]
            take = min(len(out) - done, len(head) - self.at)
            out[done:done + take] = memoryview(head)[self.at:self.at + take]
            done, self.at = done + take, self.at + take
            if self.at == len(head):
                self.chunks.popleft()
                self.at = 0
        return done


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
        #: Snapshot chunks received so far per (key, pid): (epoch, chunks), op install_chunk.
        self.pending: dict[tuple[str, int], tuple[int, list[bytes]]] = {}
        #: Partitions being built piece by piece per (key, pid): (epoch, pieces applied, the
        #: partition so far), op install_piece.
        self.building: dict[tuple[str, int], tuple[int, int, Any]] = {}
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
            with self.lock:
                self.entries[(key, pid)] = _Entry(epoch, part)
            return True
        if op == "install_chunk":  # a snapshot's partition, one PickleChunk at a time
            key, pid, epoch, chunk, drop = args
            self.drop(drop)
            with self.lock:
                if chunk.seq == 0:  # a first chunk starts over (a retried task included)
                    self.pending[(key, pid)] = (epoch, [])
                got_epoch, chunks = self.pending.get((key, pid), (None, []))
                if got_epoch != epoch or len(chunks) != chunk.seq:
                    self.pending.pop((key, pid), None)
                    raise ValueError(f"snapshot chunk {chunk.seq} of partition {pid} (epoch {epoch}) "
                                     f"out of order: {len(chunks)} chunks of epoch {got_epoch} held")
                chunks.append(chunk.blob)
                if not chunk.last:
                    return False
                del self.pending[(key, pid)]
            part = pickle.Unpickler(io.BufferedReader(_ChunkReader(chunks), CHUNK_BYTES)).load()
            with self.lock:
                self.entries[(key, pid)] = _Entry(epoch, part)
            return True
        if op == "install_piece":  # a partition built here from pieces (a restore's rows)
            key, pid, epoch, piece, drop = args
            self.drop(drop)
            with self.lock:
                if piece.seq == 0:  # a first piece starts over (a retried task included)
                    self.building[(key, pid)] = (epoch, 0, None)
                got_epoch, applied, part = self.building.get((key, pid), (None, 0, None))
                if got_epoch != epoch or applied != piece.seq:
                    self.building.pop((key, pid), None)
                    raise ValueError(f"piece {piece.seq} of partition {pid} (epoch {epoch}) out of "
                                     f"order: {applied} pieces of epoch {got_epoch} applied")
                # Applied under the server's lock: pieces of one partition come in order from
                # one task, and a restore's pieces are small.
                part = piece.grow(part)
                if not piece.last:
                    self.building[(key, pid)] = (epoch, applied + 1, part)
                    return False
                del self.building[(key, pid)]
                self.entries[(key, pid)] = _Entry(epoch, part)
            return True
        if op == "has":
            key, pid, epoch = args
            e = self.entry(key, pid)
            return e is not None and e.epoch == epoch
        if op == "drop":
            self.drop(args[0])
            return True
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
            for k in [k for k in self.pending if k[0] in gone]:
                del self.pending[k]
            for k in [k for k in self.building if k[0] in gone]:
                del self.building[k]

    def dump(self, conn: Connection, key: str, pid: int, epoch: int, chunk_bytes: int) -> None:
        """Op ``dump``, for a snapshot: the partition pickled straight onto ``conn`` in
        chunks. Answered ``("chunks", None)``, the chunks, an empty message, then
        ``("ok", n)`` or ``("error", why)``; or only ``("ok", MISSING)``."""
        with self.current(key, pid, epoch) as e:
            if e is None:
                conn.send(("ok", MISSING))
                return
            conn.send(("chunks", None))
            out = _ChunkWriter(conn, max(1, int(chunk_bytes)))
            try:
                pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(e.part)
                out.close()
                reply: Any = ("ok", out.sent)
            except (EOFError, OSError):  # the connection: nothing more can be sent
                raise
            except Exception as exc:  # the partition would not pickle: the task is told
                reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send_bytes(b"")
        conn.send(reply)

    def serve_connection(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    op, args = conn.recv()
                except (EOFError, OSError):
                    return
                if op == "dump":
                    try:
                        self.dump(conn, *args)
                    except (EOFError, OSError):
                        return
                    continue
                try:
                    reply: Any = ("ok", self.handle(op, args))
                except BaseException as exc:  # reported to the task, which raises it
                    import traceback
                    reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                try:
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
    _, _, value = _request(socket_path(app), op, args)
    return value


def _request(path: str, op: str, args: tuple) -> tuple[Connection, str, Any]:
    """Send one request to the state server at ``path`` (started if need be; once more on a
    new connection if the first has died) and read its first answer; raise its error."""
    for attempt in (0, 1):
        conn = _connect(path)
        try:
            conn.send((op, args))
            status, value = conn.recv()
            break
        except (EOFError, OSError):
            _conn.pop(path, None)  # the server died: the second attempt starts a new one
            if attempt:
                raise
    if status == "error":
        raise RuntimeError(f"state server: {value}")
    return conn, status, value


def dump(app: str, key: str, pid: int, epoch: int, chunk_bytes: int | None = None) -> Any:
    """Partition ``pid`` of model ``key`` (at ``epoch``) pickled by application ``app``'s state
    server here, as an iterator of :class:`PickleChunk` of ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`; read it to the end before the next call), or :data:`MISSING`."""
    path = socket_path(app)
    conn, status, value = _request(path, "dump", (key, pid, epoch, chunk_bytes or CHUNK_BYTES))
    if status == "ok":
        return value

    def chunks() -> Iterator[PickleChunk]:
        done = False
        try:
            seq, blob = 0, conn.recv_bytes()
            while blob:
                nxt = conn.recv_bytes()
                yield PickleChunk(seq, blob, not nxt)
                seq, blob = seq + 1, nxt
            status, value = conn.recv()
            done = True
        finally:
            if not done:  # stopped half-way: the connection is mid-answer, so not reused
                if _conn.get(path) is conn:
                    del _conn[path]
                conn.close()
        if status == "error":
            raise RuntimeError(f"state server: {value}")

    return chunks()


def server_pid(app: str) -> int:
    return call(app, "ping")


if __name__ == "__main__":
    # Through the module's own name, not __main__: MISSING must be the object the clients
    # unpickle (modeler.spark.resident.MISSING).
    from modeler.spark.resident import serve as _serve

    _serve(sys.argv[1], int(sys.argv[2]))
