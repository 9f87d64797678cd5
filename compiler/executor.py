"""Where independent pieces of work run: in this process (``local``) or as Ray tasks (``ray``).

One seam, :class:`Executor`, with :meth:`Executor.imap` (``(index, fn(item, shared))`` as each
piece finishes) and :meth:`Executor.map` (the results in the items' order). Who uses it:

* calibration (:func:`edgec.calibration.collect`): shards of consecutive batches, each shard's
  mergeable statistics merged in shard order (the statistics do not depend on how the batches
  are split, so the result is the local one, bit for bit);
* mixed precision's sensitivity runs (:mod:`edgec.mixed_precision`): one probe run per plan;
* ``--goal``'s trial compiles (:mod:`edgec.strategy`);
* ``edgec batch`` (:mod:`edgec.batch`): one compile per job.

``local`` (the default) is what edgec always did: everything in this process, batches over a
thread pool of single-threaded reference sessions (:func:`edgec.runtime.map_batches`); it
reports ``distributed = False`` and the callers keep their in-process path. ``ray`` runs each
piece as a Ray task (``max_retries``: a worker killed mid-task costs only the time to redo it).
``shared`` is put in Ray's object store once per :meth:`map` call and every task receives a
reference; a worker resolves it once and keeps it (and what it builds from it, such as an ONNX
Runtime session: :func:`cached`) for the following tasks. Each task runs single-threaded
reference sessions, so one Ray worker is one core's worth of work.

The same code runs on a laptop's local Ray (started in-process, all its cores) and on a cluster
(``--ray-address HOST:PORT`` or ``EDGEC_RAY_ADDRESS``); on a cluster, edgec must be installed on
every node and the paths a job names must be readable there (a shared file system). Ray is an
optional extra (``pip install "edgec[ray]"``): it is imported only when the ray executor is asked
for, and asking without it installed is a one-line user error.

The executor in force is a context (:func:`using`, :func:`current`), set by ``edgec.compile``
for its duration, so that the stages deep inside a compile reach it without every signature
carrying it.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator

from . import runtime
from .errors import UserError

EXECUTORS = ("local", "ray")
ADDRESS_ENV = "EDGEC_RAY_ADDRESS"
MAX_RETRIES = 3  # a task whose worker dies is run again this many times


class Executor:
    """Runs ``fn(item, shared)`` for every item. ``distributed`` says whether the work leaves
    this process (callers keep their in-process fast paths when it does not)."""

    name = "local"
    distributed = False

    @property
    def workers(self) -> int:
        return 1

    def imap(self, fn: Callable[[Any, Any], Any], items: Iterable, *, shared: Any = None,
             return_exceptions: bool = False) -> Iterator[tuple[int, Any]]:
        """``(index, fn(item, shared))`` for each item, as they finish. An exception raised by
        ``fn`` is raised here (the others are cancelled), or with ``return_exceptions`` (for a
        task the executor could not run, too) yielded as that item's value."""
        for i, item in enumerate(items):
            try:
                value = fn(item, shared)
            except Exception as e:  # noqa: BLE001 - handed to the caller, who asked for it
                if not return_exceptions:
                    raise
                value = e
            yield i, value

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable, *, shared: Any = None) -> Iterator[Any]:
        """``fn(item, shared)`` for each item, in the items' order."""
        done: dict[int, Any] = {}
        nxt = 0
        for i, value in self.imap(fn, items, shared=shared):
            done[i] = value
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1

    def close(self) -> None:
        pass


class LocalExecutor(Executor):
    """Today's in-process path: one item after the other (each may use the batch thread pool)."""


class RayExecutor(Executor):
    """Ray tasks on a local Ray (started here when no address is given) or a cluster.

    ``workers`` caps the tasks in flight at once (default: the cluster's CPUs); 1 makes one
    task run at a time, one worker process. Tasks are retried ``MAX_RETRIES`` times when their
    worker dies; exceptions raised by the work itself are not retried, they are raised here."""

    name = "ray"
    distributed = True

    def __init__(self, address: str | None = None, *, workers: int | None = None, num_cpus: int | None = None):
        self.ray = _import_ray()
        ray = self.ray
        self.owned = False
        if not ray.is_initialized():
            address = address or os.environ.get(ADDRESS_ENV) or None
            import logging

            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                          configure_logging=True)
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:  # a new local Ray, never one some other program started on this machine
                    # Ray runs its workers 15 nice levels below the driver by default; edgec's
                    # workers do the command's work, so they run at the command's own priority
                    os.environ.setdefault("RAY_worker_niceness", "0")
                    ray.init(address="local", num_cpus=num_cpus, **kwargs)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise UserError(f"--executor ray: cannot start or reach {where}: {first}") from None
            self.owned = True
        cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
        self._workers = max(1, int(workers)) if workers else cpus
        # tasks in flight: a queue of one more per worker hides the round trip, unless fewer
        # workers than the cluster's CPUs are asked for (then exactly that many run at once)
        self._in_flight = self._workers if self._workers < cpus else 2 * self._workers
        self._remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_run_task)

    @property
    def workers(self) -> int:
        return self._workers

    def imap(self, fn, items, *, shared=None, return_exceptions=False):
        ray = self.ray
        ref = [ray.put(SharedView(uuid.uuid4().hex, shared))]  # once per map; a list: resolved by the worker, once
        pending: deque = deque()
        index = {}
        it = enumerate(items)
        try:
            while True:
                for i, item in itertools.islice(it, max(0, self._in_flight - len(pending))):
                    r = self._remote.options(name=f"edgec.{fn.__name__}").remote(fn, item, ref)
                    pending.append(r)
                    index[r] = i
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                r = ready[0]
                pending.remove(r)
                try:
                    value = ray.get(r)
                except ray.exceptions.RayTaskError as e:  # the work's own exception, as it was raised
                    cause = getattr(e, "cause", None)
                    value = cause if isinstance(cause, Exception) else e
                    if not return_exceptions:
                        raise value from None
                except ray.exceptions.RayError as e:  # the task could not run (its worker died too often)
                    if not return_exceptions:
                        raise
                    value = e
                yield index.pop(r), value
        finally:  # an error, or a consumer that stops early: nothing is left running
            for r in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(r)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
            self.owned = False


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError('--executor ray needs Ray, which is not installed: pip install "edgec[ray]" '
                        '(or pip install ray)') from None
    return ray


# ---------------------------------------------------------------------- in a worker
_CACHE: OrderedDict = OrderedDict()  # (token, key) -> value, in this worker process
_CACHE_SIZE = 4  # sessions of large models are large: keep only the last few


def cached(token: str, key: str, build: Callable[[], Any]) -> Any:
    """``build()`` once per worker process for ``(token, key)`` (the last few are kept)."""
    k = (token, key)
    if k in _CACHE:
        _CACHE.move_to_end(k)
        return _CACHE[k]
    value = build()
    _CACHE[k] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


class SharedView:
    """What ``fn`` receives as ``shared`` in a Ray task: the value and a token naming it (for
    :func:`cached`)."""

    def __init__(self, token: str, value):
        self.token, self.value = token, value


def _run_task(fn, item, ref):
    """A Ray task: ``fn(item, shared)`` with the executor of nested work set to local (a task
    never waits on other tasks: no deadlock on a small cluster)."""
    import ray

    token = ref[0].hex()
    shared = cached(token, "shared", lambda: ray.get(ref[0]))
    # the task holds one CPU (num_cpus=1): its batches run one at a time, not over every core of
    # the node, or two tasks on a 2-core node would each run two threads
    os.environ[runtime.THREADS_ENV] = "1"
    with using(LocalExecutor()):
        return fn(item, shared)


def shared_value(shared):
    """``fn``'s ``shared`` argument as the caller gave it (the local executor passes it as is)."""
    return shared.value if isinstance(shared, SharedView) else shared


def shared_token(shared) -> str | None:
    return shared.token if isinstance(shared, SharedView) else None


# ---------------------------------------------------------------------- the executor in force
_CURRENT: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("edgec_executor", default=None)
_LOCAL = LocalExecutor()


def current() -> Executor:
    """The executor in force (local unless :func:`using` set another)."""
    ex = _CURRENT.get()
    return ex if ex is not None else _LOCAL


@contextlib.contextmanager
def using(ex: Executor):
    token = _CURRENT.set(ex)
    try:
        yield ex
    finally:
        _CURRENT.reset(token)


def check(executor, ray_address) -> None:
    """The ``executor``/``ray_address`` options (UserError on a mistake, before any work)."""
    if isinstance(executor, Executor):
        if ray_address is not None:
            raise UserError("--ray-address goes with --executor ray (a name), not with an Executor object")
        return
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if ray_address is not None:
        if not isinstance(ray_address, str) or not ray_address.strip():
            raise UserError(f"--ray-address {ray_address!r}: expected HOST:PORT (or ray://HOST:PORT)")
        if executor != "ray":
            raise UserError("--ray-address needs --executor ray")


@contextlib.contextmanager
def open_executor(executor: str | Executor = "local", ray_address: str | None = None):
    """The executor named (started, and stopped at the end if started here), in force for the
    block. An :class:`Executor` object is used as is (its owner closes it)."""
    check(executor, ray_address)
    if isinstance(executor, Executor):
        with using(executor):
            yield executor
        return
    if executor == "local":
        with using(_LOCAL):
            yield _LOCAL
        return
    ex = RayExecutor(ray_address)
    try:
        with using(ex):
            yield ex
    finally:
        ex.close()
