"""The Ray engine: a cache build's row ranges fanned out over an actor pool with Ray Data.

``build_cache_ray`` computes the same entry as :func:`probing_core.store.activations.build_cache`
(same key, same bytes: each range runs the one-process build's own batches through
:func:`probing_core.store.shards.extract_range`), as a sharded entry (see ``store/shards.py``):

* the dataset is tokenized on the driver and its rows split into ranges of whole batches;
* ``ray.data.from_items(ranges).map_batches(_RangeWorker, concurrency=N, num_gpus=G)`` runs an
  actor pool: each actor loads the model once (from its spec; it must hash to the driver's model
  key) and computes one range per call;
* ``write="worker"``: the actor writes the shard straight into the entry's partial folder (the
  store must be on a filesystem every worker sees — one machine, or a shared volume);
  ``write="driver"``: the actor returns the arrays and the driver writes the shard (workers on
  machines without the store's filesystem);
* the driver counts finished ranges as Ray's output stream yields them and reports them to the
  same progress callback as a local build; a killed or failed job leaves its finished shards and
  the next build of the key computes only the missing ranges.

``ray`` is imported only here, and only when this engine runs (``import ray`` costs about a
second; ``ray.init`` of a local cluster 7–8 s on a 2-core machine).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probing_core.data.datasets import Dataset, TokenBatch
from probing_core.errors import InputError, ModelError, ProbingError
from probing_core.models import LoadedModel, ModelSpec, default_cache_root, load_model
from probing_core.store.activations import BuildParams, Progress, build_cache
from probing_core.store.entries import ActivationStore, StoreEntry
from probing_core.store.shards import (
    RangeDone,
    RangeJob,
    RangeRunner,
    ShardedBuild,
    arrays_of_range,
    build_sharded,
    compute_shard,
    write_shard,
)

__all__ = ["WRITE_MODES", "RayOptions", "build_cache_on", "build_cache_ray", "connect", "ray_address_from_env", "ray_runner"]

WRITE_MODES = ("worker", "driver")
RAY_PIN = "ray==2.60.0"
#: Where the app finds the Ray cluster it offers on Home (first set wins); the CLI's --address
#: defaults to RAY_ADDRESS, as Ray's own tools do.
ADDRESS_VARS = ("PROBING_RAY_ADDRESS", "RAY_ADDRESS")


def ray_address_from_env() -> str | None:
    """The configured Ray cluster address (``PROBING_RAY_ADDRESS``, else ``RAY_ADDRESS``), or None."""
    for var in ADDRESS_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine runs a build (none of it changes the entry's bytes or key).

    Attributes:
        workers: actors in the pool.
        gpus_per_worker: GPUs reserved per actor (0 = CPU actors).
        cpus_per_worker: CPUs reserved per CPU actor; default leaves half a CPU of the cluster
            for Ray Data's own tasks (at 1 CPU per actor a 2-CPU cluster starves them and hangs).
        threads_per_worker: torch threads in each actor (default: this machine's cores / workers
            on a local cluster, torch's default on a remote one).
        write: "worker" (actors write shards into the store) or "driver" (arrays come back).
        place_timeout_s: how long a build waits for the cluster to have room for every actor
            (CPUs/GPUs free) before it gives up with a message saying what is free.
        fault: test faults injected into every actor: ``{"fail_after_ranges": n}`` or
            ``{"die_mid_range_after_passes": k}``.
    Raises:
        InputError: a value out of range.
    """

    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    threads_per_worker: int | None = None
    write: str = "worker"
    place_timeout_s: float = 60.0
    fault: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.write not in WRITE_MODES:
            raise InputError(f"write mode must be one of {', '.join(WRITE_MODES)}; got {self.write!r}.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise InputError(f"--workers must be a whole number of at least 1, got {self.workers!r}.")
        if not self.gpus_per_worker >= 0:
            raise InputError(f"--gpus-per-worker must be ≥ 0, got {self.gpus_per_worker}.")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise InputError(f"CPUs per worker must be positive, got {self.cpus_per_worker}.")
        if not self.place_timeout_s >= 0:
            raise InputError(f"the wait for Ray workers must be ≥ 0 s, got {self.place_timeout_s}.")

    @classmethod
    def from_env(cls) -> RayOptions:
        """The app's options (Home's Ray build): ``PROBING_RAY_WORKERS`` (default 2),
        ``PROBING_RAY_GPUS_PER_WORKER`` (default 0), ``PROBING_RAY_WRITE`` (worker|driver).

        Raises:
            InputError: a variable that is not a number / a write mode (names it).
        """
        kw: dict[str, Any] = {}
        for var, name, kind in (("PROBING_RAY_WORKERS", "workers", int), ("PROBING_RAY_GPUS_PER_WORKER",
                                                                           "gpus_per_worker", float)):
            raw = os.environ.get(var, "").strip()
            if raw:
                try:
                    kw[name] = kind(raw)
                except ValueError:
                    raise InputError(f"{var}={raw!r} is not a {'whole ' if kind is int else ''}number; set it to "
                                     f"one (e.g. {'2' if kind is int else '1'}) or unset it.") from None
        write = os.environ.get("PROBING_RAY_WRITE", "").strip()
        return cls(**kw, **({"write": write} if write else {}))


def import_ray() -> Any:
    """``import ray``, or an error saying how to get it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise InputError(
            f"the Ray engine needs the `ray` package, which is not installed here ({e}). Install it with "
            f"`pip install {RAY_PIN}` (pinned in requirements.txt), or build with --engine local."
        ) from e
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one; reuse a
    connection this process already has. Returns the ``ray`` module.

    Raises:
        InputError: ray missing, or no cluster answers at the address.
    """
    ray = import_ray()
    if address:
        _check_reachable(address)
    if ray.is_initialized():  # this process already joined a cluster (e.g. a test session's)
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError, OSError) as e:
        where = f"at {address}" if address else "on this machine"
        raise InputError(
            f"could not start or reach a Ray cluster {where} ({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}). "
            "Check the address (host:port of the head node, as `ray start --head` prints it) and that this "
            "machine can reach it, or leave --address out to run a local cluster."
        ) from e
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes: ``ray.init`` retries an unreachable head for a long time."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001).")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(
            f"no Ray cluster answers at {address} ({e.strerror or e}). Check the address (host:port of the head "
            "node, as `ray start --head` prints it) and that this machine can reach it, or leave --address out "
            "(and unset RAY_ADDRESS) to run a local cluster."
        ) from e


class _RangeWorker:
    """A Ray Data actor: loads the model once, then computes one row range per call."""

    def __init__(self, *, spec: dict[str, str], cache_root: str, model_key: str, batch_ref: Any,
                 hooks: Sequence[str], dtype: str, batch_size: int, shards_dir: str, write: str,
                 threads: int | None, fault: Mapping[str, int] | None) -> None:
        import ray
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(ModelSpec(**spec), cache_root=Path(cache_root))
        if self.model.key != model_key:
            raise ModelError(
                f"a Ray worker on {socket.gethostname()} loaded different weights for {self.model.spec.label()} "
                f"(key {self.model.key}, the driver has {model_key}); give every node the same model files."
            )
        parts = ray.get(batch_ref) if isinstance(batch_ref, ray.ObjectRef) else batch_ref
        self.batch = TokenBatch(tokens=parts["tokens"], lengths=parts["lengths"], doc_index=parts["doc_index"],
                                has_bos=bool(parts["has_bos"]), pad_id=int(parts["pad_id"]))
        self.offsets = np.concatenate([[0], np.cumsum(self.batch.lengths.astype(np.int64))])
        self.hooks, self.dtype, self.batch_size = list(hooks), dtype, int(batch_size)
        self.shards_dir, self.write = Path(shards_dir), write
        self.fault = dict(fault or {})
        self.ranges_done = 0
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _on_forward(self) -> None:
        self.passes += 1
        mid = self.fault.get("die_mid_range_after_passes")
        if mid is not None and self.passes >= mid:
            raise RuntimeError(f"test fault: worker {self.name} died {self.passes} forward passes into a range")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        after = self.fault.get("fail_after_ranges")
        if after is not None and self.ranges_done >= after:
            raise RuntimeError(f"test fault: worker {self.name} stopped after {after} ranges")
        out: dict[str, list[Any]] = {"start": [], "stop": [], "passes": [], "worker": []}
        arrays_out: dict[str, list[np.ndarray]] = {}
        for a, b in zip(batch["start"].tolist(), batch["stop"].tolist()):
            r = (int(a), int(b))
            self.passes = 0
            if self.write == "worker":
                compute_shard(self.model, self.batch, self.hooks, r, self.shards_dir, dtype=self.dtype,
                              batch_size=self.batch_size, on_forward=self._on_forward)
            else:
                arrays, meta = arrays_of_range(self.model, self.batch, self.hooks, r, dtype=self.dtype,
                                               batch_size=self.batch_size, on_forward=self._on_forward)
                for i, h in enumerate(self.hooks):
                    arrays_out.setdefault(f"h{i}", []).append(arrays[h])
                out.setdefault("nonfinite", []).append(np.array([meta["nonfinite"][h] for h in self.hooks], np.int64))
                out.setdefault("fwd_s", []).append(float(meta["forward_seconds"]))
            self.ranges_done += 1
            out["start"].append(r[0])
            out["stop"].append(r[1])
            out["passes"].append(self.passes)
            out["worker"].append(self.name)
        res: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in out.items()}
        for k, v in arrays_out.items():
            res[k] = np.stack(v) if len({x.shape for x in v}) == 1 else np.array(v, dtype=object)
        return res


def ray_runner(model: LoadedModel, *, cache_root: Path, options: RayOptions | None = None) -> RangeRunner:
    """The Ray engine as a :data:`~probing_core.store.shards.RangeRunner` (call :func:`connect` first).

    Args:
        model: the driver's model (its spec is loaded by every actor; its key checks their weights).
        cache_root: where actors find converted model weights (shared path on a cluster).
        options: pool size, resources, write mode (default :class:`RayOptions`'s).
    """
    opts = options or RayOptions()

    def run(job: RangeJob) -> Iterator[RangeDone]:
        if not job.ranges:
            return
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        n_actors = max(1, min(int(opts.workers), len(job.ranges)))
        remote = _actor_resources(ray, opts, n_actors)
        pool = _reserve_pool(ray, n_actors, remote, opts.place_timeout_s)
        local_cluster = all(n.get("NodeManagerHostname") == socket.gethostname() for n in ray.nodes() if n.get("Alive"))
        threads = opts.threads_per_worker or (
            max(1, (os.cpu_count() or 1) // n_actors) if local_cluster and not opts.gpus_per_worker else None)
        b = job.batch
        batch_ref = ray.put({"tokens": b.tokens, "lengths": b.lengths, "doc_index": b.doc_index,
                             "has_bos": b.has_bos, "pad_id": b.pad_id})
        ds = ray.data.from_items([{"start": r[0], "stop": r[1]} for r in job.ranges], override_num_blocks=len(job.ranges))
        ds = ds.map_batches(
            _RangeWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pool),
            fn_constructor_kwargs={
                "spec": model.spec.to_json(), "cache_root": str(cache_root), "model_key": model.key,
                "batch_ref": batch_ref, "hooks": list(job.hooks), "dtype": job.dtype, "batch_size": job.batch_size,
                "shards_dir": str(job.shards_dir), "write": opts.write, "threads": threads, "fault": dict(opts.fault),
            },
            **remote,
        )
        stream = ds.iter_batches(batch_size=None, batch_format="numpy")
        failure: str | None = None
        try:
            for out in stream:
                for i in range(len(out["start"])):
                    r = (int(out["start"][i]), int(out["stop"][i]))
                    if opts.write == "driver":
                        tokens = (int(job.offsets[r[0]]), int(job.offsets[r[1]]))
                        arrays = {h: np.asarray(out[f"h{k}"][i]) for k, h in enumerate(job.hooks)}
                        nonfinite = {h: int(x) for h, x in zip(job.hooks, out["nonfinite"][i])}
                        write_shard(job.shards_dir, r, tokens, arrays,
                                    {"nonfinite": nonfinite, "forward_passes": int(out["passes"][i]),
                                     "forward_seconds": float(out["fwd_s"][i])})
                    yield RangeDone(r, int(out["passes"][i]), str(out["worker"][i]))
        except ProbingError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever Ray raised becomes one line: the worker's own error
            failure = _ray_error_message(e)  # raised below, outside this block (Ray's error holds actor handles)
        finally:
            _release_pool(ds, pool)
            del ds, stream, batch_ref
        if failure is not None:
            raise RuntimeError(failure)

    return run


def _actor_resources(ray: Any, opts: RayOptions, n_actors: int) -> dict[str, float]:
    """``num_cpus`` / ``num_gpus`` of one actor."""
    if opts.gpus_per_worker > 0:
        return {"num_gpus": float(opts.gpus_per_worker),
                "num_cpus": opts.cpus_per_worker if opts.cpus_per_worker is not None else 1.0}
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else max(0.25, min(1.0, (cluster_cpus - 0.5) / n_actors))
    return {"num_cpus": float(cpus)}


def _reserve_pool(ray: Any, n_actors: int, remote: Mapping[str, float], timeout_s: float) -> Any:
    """Reserve the pool's CPUs/GPUs as a placement group (one bundle per actor), waiting at most
    ``timeout_s`` for the cluster to have them. The actors are scheduled into it, and removing it
    (:func:`_release_pool`) ends every one of them, however the build ends.

    Raises:
        InputError: the cluster has no room for the pool after the wait (nothing was started).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": float(remote.get("num_cpus", 0.0))}
    if remote.get("num_gpus"):
        bundle["GPU"] = float(remote["num_gpus"])
    pool = placement_group([dict(bundle) for _ in range(n_actors)], strategy="SPREAD")
    ready, _ = ray.wait([pool.ready()], timeout=timeout_s)
    if ready:
        return pool
    remove_placement_group(pool)
    free, total = ray.available_resources(), ray.cluster_resources()
    short = [r for r in bundle if float(free.get(r, 0.0)) + 1e-6 < n_actors * bundle[r]] or list(bundle)
    r = short[-1]
    raise InputError(
        f"Ray could not start {n_actors} worker{'s' if n_actors != 1 else ''}: only {float(free.get(r, 0.0)):g} {r}s free (each worker needs "
        f"{bundle[r]:g} {r}; the cluster has {float(total.get(r, 0.0)):g}), after waiting {timeout_s:g} s. Other Ray "
        "jobs hold the rest: wait for them, build with fewer workers, or add nodes to the cluster."
    )


def _release_pool(ds: Any, pool: Any) -> None:
    """End a build's actors now and give their CPUs/GPUs back, however its stream ended.

    Ray Data ends a failed stream gently: it drops the pool's actor handles and lets reference
    counting end the actors, which does not happen while something still holds a handle (Ray's
    error objects and tracebacks do, in reference cycles; an actor still starting kept its CPU for
    more than 30 s after its stream failed); and a stream the consumer stops early (Ctrl-C, a
    Streamlit rerun) is not shut down at all until it is collected. So: shut a still-running
    executor down with ``force=True`` (``ray.kill`` of its actors; ``Dataset._current_executor``
    in the pinned ray 2.60), then remove the placement group, which ends every actor in it.
    """
    from ray.util.placement_group import remove_placement_group

    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        # a no-op when the stream ended (or failed) on its own; never masks the stream's own error
        with contextlib.suppress(Exception):
            executor.shutdown(force=True)
    with contextlib.suppress(Exception):
        remove_placement_group(pool)


def _ray_error_message(e: BaseException) -> str:
    """The worker's own error out of Ray's wrappers (UserCodeException → RayTaskError → cause)."""
    chain: list[BaseException] = []
    todo: list[BaseException] = [e]
    while todo:  # follow causes only (a __context__ is whatever was being handled, e.g. StopIteration)
        x = todo.pop()
        if any(x is c for c in chain):
            continue
        chain.append(x)
        for nxt in (getattr(x, "cause", None), x.__cause__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    own = [x for x in chain if not type(x).__module__.startswith("ray") and str(x).strip()]
    if own:
        return f"{type(own[-1]).__name__}: {str(own[-1]).strip().splitlines()[-1]}"[:400]
    lines = [ln.strip() for x in chain for ln in str(x).splitlines()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln) and not ln.startswith("ray.")]
    return (errs[-1] if errs else (lines[0] if lines else type(e).__name__))[:400]


def build_cache_ray(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    store: ActivationStore,
    params: BuildParams | None = None,
    options: RayOptions | None = None,
    address: str | None = None,
    cache_root: Path | None = None,
    rows_per_shard: int | None = None,
    progress: Progress | None = None,
) -> ShardedBuild:
    """Extract ``hooks`` for ``dataset`` on Ray into a sharded entry (same key as a local build).

    Args:
        params: max length, token cap, dtype, batch size, BOS (as :func:`build_cache`; default
            :class:`BuildParams`'s).
        options: workers, resources, write mode, placement wait (default :class:`RayOptions`'s).
        address: a Ray cluster's address (``host:port``); default ``RAY_ADDRESS``, else a local
            cluster started here (reused if this process already joined one).
        cache_root: where workers find converted model weights (default: this machine's).
        rows_per_shard, progress: as :func:`probing_core.store.shards.build_sharded`.
    Returns:
        ShardedBuild (entry, built, ranges computed/reused, forward passes, per-worker counts).
    Raises:
        InputError: ray not installed, cluster unreachable, bad options.
        StoreError: a worker failed, or the cluster had no room for the workers (finished shards
            kept; rerun to resume).
    """
    params, options = params or BuildParams(), options or RayOptions()
    runner = ray_runner(model, cache_root=Path(cache_root) if cache_root else default_cache_root(), options=options)
    existing = store.find(params.match(model, dataset), list(hooks))
    if existing is not None:  # nothing to compute: do not start or join a cluster for it
        return ShardedBuild(existing, False, existing.meta.get("engine", "local"))
    ray = connect(address)
    info = {"address": address or os.environ.get("RAY_ADDRESS") or "local", "workers": options.workers,
            "gpus_per_worker": float(options.gpus_per_worker), "write": options.write, "ray_version": ray.__version__}
    return build_sharded(model, dataset, hooks, store=store, run=runner, engine="ray", params=params,
                         rows_per_shard=rows_per_shard, progress=progress, engine_meta=info)


def build_cache_on(
    model: LoadedModel,
    dataset: Dataset,
    hooks: Sequence[str],
    *,
    store: ActivationStore,
    params: BuildParams | None = None,
    ray_address: str | None = None,
    progress: Progress | None = None,
) -> tuple[StoreEntry, bool]:
    """One build button, two engines (Home): this process (:func:`build_cache`), or the Ray cluster
    at ``ray_address`` with :meth:`RayOptions.from_env`. The same entry and key either way.

    Returns:
        (entry, built now).
    Raises:
        InputError: an unreachable address, ray missing, bad PROBING_RAY_* settings.
        StoreError: the Ray build stopped (finished shards kept), or a store error.
    """
    params = params or BuildParams()
    if not ray_address:
        return build_cache(model, dataset, hooks, store=store, max_len=params.max_len, max_tokens=params.max_tokens,
                           dtype=params.dtype, batch_size=params.batch_size, prepend_bos=params.prepend_bos,
                           progress=progress)
    res = build_cache_ray(model, dataset, hooks, store=store, params=params, options=RayOptions.from_env(),
                          address=ray_address, progress=progress)
    return res.entry, res.built
