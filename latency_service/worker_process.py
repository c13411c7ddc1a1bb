"""The device worker in a child process of the HTTP service.

Why: in one process the worker's timing loops and the API's event loop share Python's
interpreter lock. Under 64 concurrent clients a profiling job advanced 9–15 keys in 10 s instead
of ~200, and every key timed meanwhile carried the wait for the lock in its figures
(docs/architecture.md, "Hot paths"). In its own process the worker only shares the CPUs, which
the operating system divides, and which ``GAS_CPU_AFFINITY`` can keep apart.

How: the child runs the same :class:`latency_service.jobs.DeviceWorker` thread and
``Host.measure`` as a single-process service would, on the identity the parent registered
(:class:`latency_service.host.HostSpec`). The parent keeps the measurement queue, so a client
that leaves before its measurement starts still takes it off the queue, and at most one
measurement is handed to the child at a time. Messages over one duplex pipe:

- parent → child: ``("wake",)`` a job was queued; ``("measure", id, request JSON)``;
  ``("stop", timeout_s)``.
- child → parent: ``("key", job id, index, canonical key)`` before a key is timed and
  ``("key", None, None, None)`` once its progress is committed (the key to fail should the child
  die); ``("wrote", canonical key | None)`` rows committed (table caches); ``("job_end",)``;
  ``("result", id, MeasurePublic JSON)`` or ``("error", id, exception)``.

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
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

from gas_core.keys import LatencyKey
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service import db, e2e, job_state
from latency_service.host import HostSpec, configure_torch
from latency_service.jobs import DeviceWorker, MeasureQueue, QueueFull

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class WorkerProcess:
    """The parent's handle on the child: a :class:`latency_service.jobs.DeviceRunner` that also
    supervises it. A child that dies on its own (the kernel's OOM killer, a crash in a backend)
    is restarted after :data:`RESTART_PAUSE_S`; the key it was timing is failed with the reason,
    so the job goes on instead of dying on that key again, and the measurement it was timing
    fails. More than :data:`RESTARTS` deaths within :data:`RESTART_WINDOW_S` and it stays down:
    ``/health`` says degraded and ``/measure`` answers 503."""

    RESTARTS = 3
    RESTART_WINDOW_S = 600.0
    RESTART_PAUSE_S = 1.0

    def __init__(self, spec: HostSpec | None, sessions: sessionmaker[Session] | None = None) -> None:
        """``spec`` None: never started (tests of the protocol); ``sessions`` records a key the
        child died on."""
        self.spec, self.sessions = spec, sessions
        self.on_write: Callable[[LatencyKey | None], None] | None = None
        self.on_job_end: Callable[[str | None], None] | None = None
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads or CUDA
        self._conn, self._child_conn = self._ctx.Pipe(duplex=True)
        self._proc = self._new_process()
        self._pending: MeasureQueue[tuple[int, MeasureRequest]] = MeasureQueue()
        self._inflight: dict[int, Future[MeasurePublic]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the queue, the flags and the pipe's sending end
        self._up = False  # a child is running and reading the pipe
        self._gone = False  # given up: nothing more can be timed
        self._stopping = threading.Event()
        self._key: tuple[str, int, str] | None = None  # (job, index, key) the child is timing
        self._deaths: deque[float] = deque()
        self._supervisor = threading.Thread(target=self._supervise, name="gas-device-worker-supervisor", daemon=True)

    # ------------------------------------------------------------ DeviceRunner
    @property
    def measuring(self) -> bool:
        return bool(self._inflight)

    def start(self) -> None:
        self._launch()
        self._supervisor.start()

    def stop(self, timeout: float = 30) -> None:
        """Ask the child to stop after the key or measurement in flight; kill it when ``timeout``
        passes (its uncommitted key rolls back and is re-timed on resume)."""
        with self._lock:  # the supervisor relaunches under this lock: no new life begins after this
            self._stopping.set()
            waiting = self._pending.drain()
        for fut in waiting:
            fut.cancel()
        self._send(("stop", timeout))
        if self._proc.pid is None:  # never started
            return
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("device worker process still timing after %.0f s: killed; the key in flight is rolled back "
                        "and re-timed on resume", timeout)
            self._proc.kill()
            self._proc.join(5)

    def alive(self) -> bool:
        return self._proc.is_alive()

    def restarting(self) -> bool:
        """Dead but about to be restarted (within :data:`RESTART_PAUSE_S` and a start-up): a
        short gap, not an outage."""
        return not self._gone and not self._stopping.is_set() and not self._proc.is_alive()

    def wake(self) -> None:
        self._send(("wake",))

    def queued(self) -> int:
        return self._pending.waiting()

    def submit_measure(self, req: MeasureRequest, limit: int | None = None) -> Future[MeasurePublic]:
        """Queue ``req``; :class:`QueueFull` when ``limit`` measurements already wait or the
        worker is down for good. Cancelling the future before the child was handed it drops it."""
        with self._lock:
            if self._gone:
                raise QueueFull(f"the device worker process is down ({_exit_reason(self._proc.exitcode)}, "
                                f"{len(self._deaths)} times in {self.RESTART_WINDOW_S:.0f} s); see the service log")
            fut: Future[MeasurePublic] = self._pending.put((next(self._ids), req), limit)
        self._dispatch()
        return fut

    # ------------------------------------------------------------ the child's life
    def _new_process(self) -> multiprocessing.process.BaseProcess:
        return self._ctx.Process(target=child_main, args=(self._child_conn, self.spec, os.getpid()),
                                 name="gas-device-worker", daemon=True)

    def _launch(self) -> None:
        with self._lock:
            self._start_locked()
        self._dispatch()

    def _start_locked(self) -> None:
        self._proc.start()
        self._child_conn.close()  # the child holds its end; EOF here then means the child is gone
        self._up = True
        log.info("device worker process %d started", self._proc.pid)

    def _supervise(self) -> None:
        """Relay the child's messages; when it dies on its own, account for what it held and
        restart it, until the service stops it or it dies too often."""
        while True:
            self._read()
            if self._stopping.is_set():
                log.info("device worker process exited with code %s", self._proc.exitcode)
                return
            if not self._after_death():
                return
            self._stopping.wait(self.RESTART_PAUSE_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._conn, self._child_conn = self._ctx.Pipe(duplex=True)
                self._proc = self._new_process()
                self._start_locked()
            self._dispatch()

    def _read(self) -> None:
        """The child's messages until it exits; then the measurement it held fails."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._handle(message)
        if self._proc.pid is not None:
            self._proc.join(5)
        with self._lock:
            self._up = False
            lost = list(self._inflight.values())
            self._inflight.clear()
        why = "exited" if self._stopping.is_set() else _exit_reason(self._proc.exitcode)
        _fail(lost, f"the device worker process {why} before the measurement ended")

    def _after_death(self) -> bool:
        """Fail the key the child died on, log why; False (and everything waiting fails) when it
        died too often to restart."""
        why, key, self._key = _exit_reason(self._proc.exitcode), self._key, None
        if key is not None and self.sessions is not None and self.spec is not None:
            job_id, index, canonical = key
            with self.sessions() as s:
                failed = job_state.fail_key(s, job_id=job_id, owner=self.spec.settings.worker_id, index=index,
                                       error=f"{canonical}: WorkerDied: the device worker process {why} while timing it")
            log.error("device worker process %s while timing %s (job %s, key %d)%s", why, canonical, job_id, index,
                      ": that key is failed and the job goes on" if failed else "")
        else:
            log.error("device worker process %s", why)
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.RESTART_WINDOW_S:
            self._deaths.popleft()
        if len(self._deaths) <= self.RESTARTS:
            log.warning("restarting the device worker process in %.0f s", self.RESTART_PAUSE_S)
            return True
        log.error("the device worker process died %d times in %.0f s: not restarted; the service stays degraded "
                  "until it is restarted", len(self._deaths), self.RESTART_WINDOW_S)
        with self._lock:
            self._gone = True
            waiting = self._pending.drain()
        _fail(waiting, "the device worker process is down")
        if self.sessions is not None and self.spec is not None:
            with self.sessions() as s:
                ended = job_state.fail_running(
                    s, owner=self.spec.settings.worker_id,
                    reason=f"WorkerDown: the device worker process died {len(self._deaths)} times in "
                    f"{self.RESTART_WINDOW_S:.0f} s and was not restarted; restart the service to resume profiling")
            for job_id in ended:
                log.error("job %s failed: the device worker is down", job_id)
            if self.on_job_end is not None:
                self.on_job_end(None)
        return False

    # ------------------------------------------------------------ messages
    def _dispatch(self) -> None:
        """Hand the child the next wanted measurement when it has none."""
        with self._lock:
            while self._up and not self._inflight and (task := self._pending.take()) is not None:
                (task_id, req), fut = task
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

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "key":
            self._key = None if message[1] is None else (message[1], message[2], message[3])
        elif kind == "wrote" and self.on_write is not None:
            self.on_write(None if message[1] is None else LatencyKey.from_canonical(message[1]))
        elif kind == "job_end" and self.on_job_end is not None:
            self.on_job_end(message[1] if len(message) > 1 else None)
        elif kind in ("result", "error"):
            with self._lock:
                fut = self._inflight.pop(message[1], None)
            if fut is not None:
                if kind == "result":
                    fut.set_result(MeasurePublic.model_validate_json(message[2]))
                else:
                    fut.set_exception(message[2])
            self._dispatch()


def _fail(futures: list[Future[MeasurePublic]], why: str) -> None:
    for fut in futures:
        if fut.running() or fut.set_running_or_notify_cancel():  # handed over, or waiting and still wanted
            fut.set_exception(RuntimeError(why))


def _exit_reason(code: int | None) -> str:
    """A child's exit code in words (negative: the signal that killed it)."""
    if code is None:
        return "exited"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the kernel's OOM killer when host memory ran out, or kill -9)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# ---------------------------------------------------------------- child
def child_main(conn: multiprocessing.connection.Connection, spec: HostSpec, parent_pid: int) -> None:
    """Entry point of the worker process: a Host whose worker thread times, relaying to ``conn``."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    settings = spec.settings
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_torch(settings, spec.torch_device)
    engine = db.make_engine(settings.database_url)
    sessions = db.session_factory(engine)
    worker = spec.device_worker(sessions)
    worker.measure = partial(e2e.measure, spec, sessions)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the parent is gone; we stop at the next recv

    worker.on_write = lambda key: send(("wrote", None if key is None else key.canonical))
    worker.on_job_end = lambda request_hash: send(("job_end", request_hash))
    worker.on_key = lambda job_id, index, key: send(("key", job_id, index, None if key is None else key.canonical))
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
