"""The device worker in a child process of the HTTP service.

Why: in one process the worker's timing loops and the API's event loop share Python's
interpreter lock. Under 64 concurrent clients a profiling job advanced 9–15 keys in 10 s instead
of ~200, and every key timed meanwhile carried the wait for the lock in its figures
(docs/architecture.md, "Hot paths"). In its own process the worker only shares the CPUs, which
the operating system divides, and which ``GAS_CPU_AFFINITY`` can keep apart.

How: the child runs the same :class:`latency_service.jobs.DeviceWorker` thread and
``Host.measure`` as a single-process service would, on the identity the parent registered
(:class:`latency_service.service.HostSpec`). The parent keeps the measurement queue, so a client
that leaves before its measurement starts still takes it off the queue, and at most one
measurement is handed to the child at a time. Messages over one duplex pipe:

- parent → child: ``("wake",)`` a job was queued; ``("measure", id, request JSON)``;
  ``("stop", timeout_s)``.
- child → parent: ``("wrote", canonical key | None)`` rows committed (table caches);
  ``("job_end",)``; ``("result", id, MeasurePublic JSON)`` or ``("error", id, exception)``.

The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux, and the pipe's end-of-file
everywhere): a ``kill -9`` of the service must not leave a worker timing a job that the restarted
service resumes under the same owner.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

from gas_core.keys import LatencyKey
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service.jobs import DeviceWorker, QueueFull

if TYPE_CHECKING:
    from latency_service.service import HostSpec

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class WorkerProcess:
    """The parent's handle on the child: a :class:`latency_service.jobs.DeviceRunner`."""

    def __init__(self, spec: HostSpec | None) -> None:  # None: never started (tests of the protocol)
        self.spec = spec
        self.on_write: Callable[[LatencyKey | None], None] | None = None
        self.on_job_end: Callable[[], None] | None = None
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads or CUDA
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=child_main, args=(child_conn, spec, os.getpid()),
                                 name="gas-device-worker", daemon=True)
        self._child_conn = child_conn
        self._pending: deque[tuple[int, MeasureRequest, Future[MeasurePublic]]] = deque()
        self._inflight: dict[int, Future[MeasurePublic]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # pending/inflight and the pipe's sending end
        self._reader = threading.Thread(target=self._read, name="gas-device-worker-reader", daemon=True)
        self._gone = False  # the child exited: nothing more can be timed

    # ------------------------------------------------------------ DeviceRunner
    @property
    def measuring(self) -> bool:
        return bool(self._inflight)

    def start(self) -> None:
        self._proc.start()
        self._child_conn.close()  # the child holds its end; EOF here then means the child is gone
        self._reader.start()
        log.info("device worker process %d started", self._proc.pid)

    def stop(self, timeout: float = 30) -> None:
        """Ask the child to stop after the key or measurement in flight; kill it when ``timeout``
        passes (its uncommitted key rolls back and is re-timed on resume)."""
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
        for _, _, fut in waiting:
            fut.cancel()
        self._send(("stop", timeout))
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("device worker process still timing after %.0f s: killed; the key in flight is rolled back "
                        "and re-timed on resume", timeout)
            self._proc.kill()
            self._proc.join(5)

    def alive(self) -> bool:
        return self._proc.is_alive()

    def wake(self) -> None:
        self._send(("wake",))

    def queued(self) -> int:
        with self._lock:
            return sum(not fut.cancelled() for _, _, fut in self._pending)

    def submit_measure(self, req: MeasureRequest, limit: int | None = None) -> Future[MeasurePublic]:
        """Queue ``req``; :class:`QueueFull` when ``limit`` measurements already wait. Cancelling
        the future before the child was handed it drops it."""
        fut: Future[MeasurePublic] = Future()
        with self._lock:
            if self._gone:
                raise QueueFull(f"the device worker process exited (code {self._proc.exitcode}); see the service log")
            waiting = sum(not f.cancelled() for _, _, f in self._pending)
            if limit is not None and waiting >= limit:
                raise QueueFull(f"{waiting} measurements already queued (limit {limit}); retry later")
            self._pending.append((next(self._ids), req, fut))
        self._dispatch()
        return fut

    # ------------------------------------------------------------ parent internals
    def _dispatch(self) -> None:
        """Hand the child the next wanted measurement when it has none."""
        with self._lock:
            while not self._inflight and self._pending:
                task_id, req, fut = self._pending.popleft()
                if fut.set_running_or_notify_cancel():
                    self._inflight[task_id] = fut
                    self._send_locked(("measure", task_id, req.model_dump_json()))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the child is gone; _read reports it
            pass

    def _read(self) -> None:
        """Relay the child's messages until it exits; then fail what it was given."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._handle(message)
        if self._proc.pid is not None:
            self._proc.join(5)
        with self._lock:
            self._gone = True
            lost = [*self._inflight.values(), *(fut for _, _, fut in self._pending)]
            self._inflight.clear()
            self._pending.clear()
        for fut in lost:
            if fut.running() or fut.set_running_or_notify_cancel():  # handed over, or waiting and still wanted
                fut.set_exception(RuntimeError("the device worker process exited before the measurement ended"))
        log.log(logging.INFO if self._proc.exitcode == 0 else logging.ERROR,
                "device worker process exited with code %s", self._proc.exitcode)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "wrote" and self.on_write is not None:
            self.on_write(None if message[1] is None else LatencyKey.from_canonical(message[1]))
        elif kind == "job_end" and self.on_job_end is not None:
            self.on_job_end()
        elif kind in ("result", "error"):
            with self._lock:
                fut = self._inflight.pop(message[1], None)
            if fut is not None:
                if kind == "result":
                    fut.set_result(MeasurePublic.model_validate_json(message[2]))
                else:
                    fut.set_exception(message[2])
            self._dispatch()


# ---------------------------------------------------------------- child
def child_main(conn: multiprocessing.connection.Connection, spec: HostSpec, parent_pid: int) -> None:
    """Entry point of the worker process: a Host whose worker thread times, relaying to ``conn``."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    from latency_service import db
    from latency_service.service import Host, configure_torch

    settings = spec.settings
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_torch(settings, spec.torch_device)
    engine = db.make_engine(settings.database_url)
    sessions = db.session_factory(engine)
    worker = spec.device_worker(sessions)
    Host.of(spec, worker, engine, sessions)  # gives the worker Host.measure
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the parent is gone; we stop at the next recv

    worker.on_write = lambda key: send(("wrote", None if key is None else key.canonical))
    worker.on_job_end = lambda: send(("job_end",))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops the worker on the way out (finally below)
    worker.start()
    try:
        _serve(conn, worker, send)
    finally:
        worker.stop(timeout=settings.shutdown_grace_s / 2)
        engine.dispose()


def _serve(conn: multiprocessing.connection.Connection, worker: DeviceWorker, send: Callable[[tuple[Any, ...]], None]) -> None:
    """The parent's requests, until it says stop or goes away."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            log.warning("the service process went away: the device worker stops")
            return
        kind = message[0]
        if kind == "stop":
            worker.stop(timeout=message[1])
            return
        if kind == "wake":
            worker.wake()
        elif kind == "measure":
            task_id: int = message[1]
            fut = worker.submit_measure(MeasureRequest.model_validate_json(message[2]))
            fut.add_done_callback(partial(_report, send, task_id))


def _report(send: Callable[[tuple[Any, ...]], None], task_id: int, fut: Future[MeasurePublic]) -> None:
    send(_outcome(task_id, fut))


def _outcome(task_id: int, fut: Future[MeasurePublic]) -> tuple[Any, ...]:
    err = fut.exception()
    if err is None:
        return ("result", task_id, fut.result().model_dump_json())
    try:  # the exception itself when it pickles, else its words
        pickle.dumps(err)
        return ("error", task_id, err)
    except Exception:  # noqa: BLE001
        return ("error", task_id, RuntimeError(f"{type(err).__name__}: {err}"))


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable; relying on the pipe's end-of-file")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
