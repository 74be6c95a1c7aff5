"""Meta-batch data parallelism on ``torch.distributed``.

Tasks are independent, so a meta-batch shards across processes: every rank
draws the same global meta-batch (from the iteration's seeded generator),
adapts its own slice of the tasks, and the meta-gradients (and the gradients of
learnable hyperparameters) are all-reduced with weights ``n_rank / n_global``,
so every rank takes the same outer step and the result does not depend on the
number of processes (up to floating-point summation order). One exception: implicit
differentiation (iMAML) solves the meta-batch's linear systems as one, with one stopping rule,
so where its conjugate gradients stop before converging (the defaults on the benchmarks) a shard's
solve stops elsewhere than the whole batch's: 5e-7 to 1.3e-6 relative apart on the sinusoid,
4e-11 with 300 iterations. Give iMAML enough solver iterations to converge for equal results.

Launch with ``torchrun --nproc-per-node N -m diffopt train ...`` or
``diffopt train --nproc N ...``. A rank that dies or hangs makes the others stop
with :class:`PeerFailure` within ``timeout`` seconds instead of waiting forever;
the message says which it was (a closed connection, or no answer within the
timeout). :func:`launch` forwards SIGINT and SIGTERM to its processes and waits
for them, so ``kill``, ``timeout`` and job schedulers stop the whole group and
leave the last checkpoint (written atomically by rank 0) as the one to resume from.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from .errors import DistributedError, PeerFailure

BACKENDS = ("gloo", "nccl")


def backend_available(backend: str) -> bool:
    if backend == "gloo":
        return dist.is_available() and dist.is_gloo_available()
    if backend == "nccl":
        return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()
    return False


def choose_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if backend_available("nccl") else "gloo"
    if backend not in BACKENDS:
        raise DistributedError(f"backend={backend!r} is not supported; choose one of {BACKENDS} or 'auto'")
    if not backend_available(backend):
        hint = "it needs CUDA GPUs and a CUDA build of PyTorch" if backend == "nccl" else "this PyTorch lacks it"
        raise DistributedError(f"the {backend!r} backend is not available here ({hint}); use backend='gloo' on CPU")
    return backend


@dataclass
class Shard:
    start: int
    stop: int
    total: int

    @property
    def weight(self) -> float:
        """This rank's share of the global meta-batch."""
        return (self.stop - self.start) / self.total


class DistributedContext:
    """One process's view of the group: sharding, gradient all-reduce, failure detection."""

    def __init__(self, rank: int, world_size: int, timeout: float) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.bytes_communicated = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- sharding ----------------------------------------------------------------------
    def shard(self, tasks: int) -> Shard:
        if tasks < self.world_size:
            raise DistributedError(
                f"a global meta-batch of {tasks} tasks cannot be split over {self.world_size} processes; use at "
                f"least one task per process"
            )
        base, extra = divmod(tasks, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return Shard(start, stop, tasks)

    def shard_batch(self, batch: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], Shard]:
        shard = self.shard(batch[0].shape[0])
        return tuple(t[shard.start:shard.stop] for t in batch), shard

    # -- collectives -----------------------------------------------------------------
    def _guard(self, what: str, iteration: int | None, operation: Any) -> Any:
        started = time.monotonic()
        try:
            return operation()
        except RuntimeError as error:  # gloo raises RuntimeError on timeouts and closed peers
            at = "" if iteration is None else f" at iteration {iteration}"
            waited = time.monotonic() - started
            raise PeerFailure(
                f"rank {self.rank}: {what}{at} failed after {waited:.1f} s because {peer_problem(error, self.timeout)}. "
                "Restart the run with --resume to continue from the last checkpoint."
            ) from error

    def all_reduce_gradients(self, parameters: Sequence[Tensor], weight: float, iteration: int | None = None) -> None:
        """Replace every ``.grad`` by the weighted sum over ranks (one flat all-reduce). A frozen
        parameter (``requires_grad=False``) keeps no gradient: given a zero one, an outer optimizer with
        weight decay or momentum would move it."""
        parameters = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads]) * weight
        self.bytes_communicated += flat.numel() * flat.element_size()
        self._guard("the gradient all-reduce", iteration, lambda: dist.all_reduce(flat))
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def all_reduce_scalar(self, value: float, weight: float, iteration: int | None = None) -> float:
        tensor = torch.tensor([value * weight], dtype=torch.float64)
        self._guard("the loss all-reduce", iteration, lambda: dist.all_reduce(tensor))
        return float(tensor)

    def check_consistent(self, settings: dict[str, Any]) -> None:
        """Every rank must run the same configuration, seed and world size."""
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        mine = {"world_size": self.world_size, "digest": digest, "settings": settings}
        gathered: list[Any] = [None] * self.world_size
        self._guard("the start-up check", None, lambda: dist.all_gather_object(gathered, mine))
        for rank, other in enumerate(gathered):
            if other["world_size"] != self.world_size:
                raise DistributedError(
                    f"rank {rank} believes the world size is {other['world_size']}, rank {self.rank} believes "
                    f"{self.world_size}; launch every process with the same WORLD_SIZE"
                )
            if other["digest"] != digest:
                differing = sorted(k for k in set(settings) | set(other["settings"])
                                   if settings.get(k) != other["settings"].get(k))
                raise DistributedError(
                    f"rank {rank} runs a different configuration from rank {self.rank} (differs in: "
                    f"{', '.join(differing)}); every rank needs the same arguments and seed"
                )


_CLOSED = ("connection reset", "connection closed", "broken pipe", "connection refused", "econnreset", "epipe",
           "end of file", "socket closed")
_TIMED_OUT = ("timed out", "timeout", "deadline")


def peer_problem(error: BaseException, timeout: float) -> str:
    """What a failed collective says about the other ranks, in words: closed connection or silence."""
    text = str(error)
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    lowered = text.lower()
    if any(word in lowered for word in _CLOSED):
        return f"another rank closed its connection (it died or was stopped) ({first})"
    if any(word in lowered for word in _TIMED_OUT):
        return f"another rank did not respond within {timeout:g} s (it hangs or is too slow) ({first})"
    return f"another rank died or stopped responding ({first})"


def initialize(backend: str = "auto", timeout: float = 300.0, rank: int | None = None,
               world_size: int | None = None) -> DistributedContext:
    """Join the process group described by the environment (torchrun's variables) or the arguments."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    backend = choose_backend(backend)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    if dist.get_world_size() != world_size:
        raise DistributedError(
            f"this process was told WORLD_SIZE={world_size} but the group has {dist.get_world_size()} processes"
        )
    return DistributedContext(dist.get_rank(), world_size, timeout)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], nproc: int, timeout: float = 300.0, grace: float | None = None) -> int:
    """Run ``python -m diffopt <argv>`` in ``nproc`` local processes (gloo on loopback).

    When a process fails, the others have ``grace`` seconds (default ``min(timeout, 5)``) to
    stop by themselves (they do, through :class:`PeerFailure`, within their own ``timeout``)
    before they are killed: a hung rank is cleared ``timeout + grace`` seconds after the
    start of the collective it never joined, not ``2 × timeout``.

    SIGINT and SIGTERM sent to this process are forwarded to every process, which stop
    (an interrupted save leaves the previous checkpoint in place); they are waited for
    (killed after ``timeout`` seconds) and ``128 + signal`` is returned. Otherwise returns
    the first non-zero exit code, or 0.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise DistributedError(f"--nproc must be an integer >= 1, got {nproc!r}")
    grace = min(timeout, 5.0) if grace is None else grace
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, forward)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
    try:
        for rank in range(nproc):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
            # a session of their own: a terminal's Ctrl-C reaches them once, forwarded by this process
            processes.append(subprocess.Popen([sys.executable, "-m", "diffopt", *argv], env=env,
                                              start_new_session=True))
        deadline: float | None = None
        code = 0
        while any(p.poll() is None for p in processes):
            if received and deadline is None:
                deadline = time.monotonic() + timeout
            for p in processes:
                if p.poll() not in (None, 0) and code == 0:
                    code = int(p.returncode)
                    if deadline is None:
                        deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                for p in processes:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for p in processes:
            if p.poll() is None:  # an exception in this loop: never leave a rank behind
                p.kill()
                p.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        return 128 + received[0]
    for p in processes:
        if p.returncode != 0 and code == 0:
            code = int(p.returncode)
    return code
