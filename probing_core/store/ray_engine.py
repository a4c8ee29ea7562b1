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

import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from probing_core.data.datasets import Dataset, TokenBatch
from probing_core.errors import InputError, ModelError, ProbingError
from probing_core.models import LoadedModel, ModelSpec, default_cache_root, load_model
from probing_core.store.activations import Progress, _match_fields
from probing_core.store.entries import ActivationStore
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

__all__ = ["build_cache_ray", "ray_runner", "connect", "WRITE_MODES"]

WRITE_MODES = ("worker", "driver")
RAY_PIN = "ray==2.60.0"


def import_ray() -> Any:
    """``import ray``, or an error saying how to get it."""
    try:
        import ray
        import ray.data  # noqa: F401
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


def ray_runner(
    model: LoadedModel,
    *,
    cache_root: Path,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    write: str = "worker",
    fault: Mapping[str, int] | None = None,
) -> RangeRunner:
    """The Ray engine as a :data:`~probing_core.store.shards.RangeRunner` (call :func:`connect` first).

    Args:
        model: the driver's model (its spec is loaded by every actor; its key checks their weights).
        cache_root: where actors find converted model weights (shared path on a cluster).
        workers: actors in the pool.
        gpus_per_worker: GPUs reserved per actor (0 = CPU actors).
        cpus_per_worker: CPUs reserved per CPU actor; default leaves half a CPU of the cluster
            for Ray Data's own tasks (at 1 CPU per actor a 2-CPU cluster starves them and hangs).
        threads_per_worker: torch threads in each actor (default: this machine's cores / workers
            on a local cluster, torch's default on a remote one).
        write: "worker" (actors write shards into the store) or "driver" (arrays come back).
        fault: test faults injected into every actor: ``{"fail_after_ranges": n}`` or
            ``{"die_mid_range_after_passes": k}``.
    """
    if write not in WRITE_MODES:
        raise InputError(f"write mode must be one of {', '.join(WRITE_MODES)}; got {write!r}.")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    if gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker must be ≥ 0, got {gpus_per_worker}.")

    def run(job: RangeJob) -> Iterator[RangeDone]:
        if not job.ranges:
            return
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        n_actors = max(1, min(int(workers), len(job.ranges)))
        remote: dict[str, Any] = {}
        if gpus_per_worker > 0:
            remote["num_gpus"] = float(gpus_per_worker)
            remote["num_cpus"] = cpus_per_worker if cpus_per_worker is not None else 1.0
        else:
            remote["num_cpus"] = cpus_per_worker if cpus_per_worker is not None else max(0.25, min(1.0, (cluster_cpus - 0.5) / n_actors))
        local_cluster = all(n.get("NodeManagerHostname") == socket.gethostname() for n in ray.nodes() if n.get("Alive"))
        threads = threads_per_worker or (max(1, (os.cpu_count() or 1) // n_actors) if local_cluster and not gpus_per_worker else None)
        b = job.batch
        batch_ref = ray.put({"tokens": b.tokens, "lengths": b.lengths, "doc_index": b.doc_index,
                             "has_bos": b.has_bos, "pad_id": b.pad_id})
        ds = ray.data.from_items([{"start": r[0], "stop": r[1]} for r in job.ranges], override_num_blocks=len(job.ranges))
        ds = ds.map_batches(
            _RangeWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs={
                "spec": model.spec.to_json(), "cache_root": str(cache_root), "model_key": model.key,
                "batch_ref": batch_ref, "hooks": list(job.hooks), "dtype": job.dtype, "batch_size": job.batch_size,
                "shards_dir": str(job.shards_dir), "write": write, "threads": threads, "fault": dict(fault or {}),
            },
            **remote,
        )
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(out["start"])):
                    r = (int(out["start"][i]), int(out["stop"][i]))
                    if write == "driver":
                        tokens = (int(job.offsets[r[0]]), int(job.offsets[r[1]]))
                        arrays = {h: np.asarray(out[f"h{k}"][i]) for k, h in enumerate(job.hooks)}
                        nonfinite = {h: int(x) for h, x in zip(job.hooks, out["nonfinite"][i])}
                        write_shard(job.shards_dir, r, tokens, arrays,
                                    {"nonfinite": nonfinite, "forward_passes": int(out["passes"][i]),
                                     "forward_seconds": float(out["fwd_s"][i])})
                    yield RangeDone(r, int(out["passes"][i]), str(out["worker"][i]))
        except ProbingError:
            raise
        except Exception as e:
            raise RuntimeError(_ray_error_message(e)) from e

    return run


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
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    write: str = "worker",
    cache_root: Path | None = None,
    max_len: int = 128,
    max_tokens: int | None = 20_000,
    dtype: str = "float32",
    batch_size: int = 16,
    prepend_bos: bool = True,
    rows_per_shard: int | None = None,
    progress: Progress | None = None,
    fault: Mapping[str, int] | None = None,
) -> ShardedBuild:
    """Extract ``hooks`` for ``dataset`` on Ray into a sharded entry (same key as a local build).

    Args:
        address: a Ray cluster's address (``host:port``); default ``RAY_ADDRESS``, else a local
            cluster started here (reused if this process already joined one).
        workers, gpus_per_worker, cpus_per_worker, threads_per_worker, write, fault: see :func:`ray_runner`.
        cache_root: where workers find converted model weights (default: this machine's).
        other args: as :func:`probing_core.store.activations.build_cache`.
    Returns:
        ShardedBuild (entry, built, ranges computed/reused, forward passes, per-worker counts).
    Raises:
        InputError: ray not installed, cluster unreachable, bad options.
        StoreError: a worker failed (finished shards kept; rerun to resume).
    """
    runner = ray_runner(model, cache_root=Path(cache_root) if cache_root else default_cache_root(), workers=workers,
                        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                        threads_per_worker=threads_per_worker, write=write, fault=fault)
    existing = store.find(_match_fields(model, dataset, max_len, max_tokens, dtype, prepend_bos), list(hooks))
    if existing is not None:  # nothing to compute: do not start or join a cluster for it
        return ShardedBuild(existing, False, existing.meta.get("engine", "local"))
    ray = connect(address)
    info = {"address": address or os.environ.get("RAY_ADDRESS") or "local", "workers": int(workers),
            "gpus_per_worker": float(gpus_per_worker), "write": write, "ray_version": ray.__version__}
    return build_sharded(model, dataset, hooks, store=store, run=runner, engine="ray", max_len=max_len,
                         max_tokens=max_tokens, dtype=dtype, batch_size=batch_size, prepend_bos=prepend_bos,
                         rows_per_shard=rows_per_shard, progress=progress, engine_meta=info)
