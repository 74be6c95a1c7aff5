"""Meta-batch data parallelism on torch.distributed (gloo, CPU, spawned processes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from diffopt import distributed
from diffopt.algorithms import MAML, Reptile
from diffopt.recipes import SinusoidSource, sinusoid_mlp
from diffopt.training import Trainer, load_checkpoint

ITERATIONS = 5
META_BATCH = 6


def make_trainer(checkpoint: Path | None, context=None, callbacks=(), resume=False, algorithm="maml"):
    torch.manual_seed(0)
    model = sinusoid_mlp(hidden=8).double()
    if algorithm == "maml":
        learner = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2, vectorize=True)
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    else:
        learner = Reptile(model, F.mse_loss, inner_lr=0.05, inner_steps=2, outer_lr=0.5)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
    source = SinusoidSource(meta_batch=META_BATCH, shots=5, query=5, test_tasks=8, test_shots=5, test_query=5,
                            dtype=torch.float64)
    return Trainer(learner, source, optimizer, iterations=ITERATIONS, seed=3, checkpoint=checkpoint,
                   checkpoint_every=1, progress=False, log_every=1, eval_steps=(0, 1), callbacks=callbacks,
                   resume=resume, distributed=context)


def _worker(rank: int, world_size: int, port: int, folder: str, die_at: int, timeout: float, algorithm: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = distributed.initialize("gloo", timeout=timeout, rank=rank, world_size=world_size)

    def die(trainer: Trainer, iteration: int):
        if rank == 1 and iteration == die_at:
            os._exit(3)  # a crash, no clean-up
        return None

    checkpoint = Path(folder) / "checkpoint.pt"
    trainer = make_trainer(checkpoint, context, callbacks=[die], algorithm=algorithm)
    started = time.monotonic()
    try:
        trainer.fit()
        outcome = "finished"
    except distributed.PeerFailure as error:
        outcome = f"peer-failure after {time.monotonic() - started:.1f}s: {error}"
    torch.save({"weights": [p.detach() for p in trainer.learner.parameters()], "outcome": outcome,
                "losses": [r["meta_loss"] for r in trainer.history if "meta_loss" in r]},
               Path(folder) / f"rank{rank}.pt")
    distributed.shutdown()


def spawn(world_size: int, folder: Path, die_at: int = -1, timeout: float = 30.0, algorithm: str = "maml") -> None:
    port = distributed.free_port()
    context = mp.start_processes(_worker, args=(world_size, port, str(folder), die_at, timeout, algorithm),
                                 nprocs=world_size, join=False, start_method="spawn")
    context.join(timeout=180) if die_at < 0 else _join_allowing_crash(context)


def _join_allowing_crash(context) -> None:
    deadline = time.monotonic() + 180
    while not all(not p.is_alive() for p in context.processes) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_two_processes_equal_one_process(tmp_path: Path, algorithm: str) -> None:
    single = make_trainer(tmp_path / "single.pt", algorithm=algorithm)
    single.fit()
    spawn(2, tmp_path, algorithm=algorithm)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["outcome"] == rank1["outcome"] == "finished"
    for a, b, c in zip(single.learner.parameters(), rank0["weights"], rank1["weights"]):
        assert torch.equal(b, c), "ranks must take identical outer steps"
        assert (a.detach() - b).abs().max() <= 1e-12
    losses = [r["meta_loss"] for r in single.history if "meta_loss" in r]
    assert max(abs(x - y) for x, y in zip(losses, rank0["losses"])) <= 1e-12
    # the checkpoint written by rank 0 loads in a single process and matches its weights
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    restored = make_trainer(None, algorithm=algorithm)  # its optimizer too (Reptile's is SGD, lr 0.5)
    restored.restore(payload)
    for a, b in zip(restored.learner.parameters(), rank0["weights"]):
        assert torch.equal(a.detach(), b)


def test_killed_rank_stops_the_other_and_resume_reproduces_the_run(tmp_path: Path) -> None:
    timeout = 20.0
    started = time.monotonic()
    spawn(2, tmp_path, die_at=3, timeout=timeout)
    assert time.monotonic() - started < timeout + 90
    survivor = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert survivor["outcome"].startswith("peer-failure"), survivor["outcome"]
    assert "--resume" in survivor["outcome"]
    assert not (tmp_path / "rank1.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no half-written checkpoint"
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["iteration"] == 3  # the last complete iteration before the crash
    resumed = make_trainer(tmp_path / "checkpoint.pt", resume=True)
    resumed.fit()
    uninterrupted = make_trainer(tmp_path / "fresh.pt")
    uninterrupted.fit()
    for a, b in zip(resumed.learner.parameters(), uninterrupted.learner.parameters()):
        assert (a - b).abs().max() <= 1e-12


def _mismatch_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = distributed.initialize("gloo", timeout=20, rank=rank, world_size=2)
    try:
        context.check_consistent({"seed": rank, "shots": 5})
        outcome = "no error"
    except distributed.DistributedError as error:
        outcome = str(error)
    Path(folder, f"mismatch{rank}.txt").write_text(outcome)
    distributed.shutdown()


def test_mismatched_seed_between_ranks_is_an_error(tmp_path: Path) -> None:
    mp.start_processes(_mismatch_worker, args=(distributed.free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    message = (tmp_path / "mismatch0.txt").read_text()
    assert "different configuration" in message and "seed" in message


def test_shards_cover_the_meta_batch_exactly() -> None:
    for world in range(1, 5):
        for tasks in range(world, 12):
            shards = [distributed.DistributedContext(r, world, 1.0).shard(tasks) for r in range(world)]
            assert shards[0].start == 0 and shards[-1].stop == tasks
            assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
            assert abs(sum(s.weight for s in shards) - 1) < 1e-15
    with pytest.raises(distributed.DistributedError, match="cannot be split"):
        distributed.DistributedContext(0, 4, 1.0).shard(3)


def test_unavailable_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: on a machine with NCCL and GPUs, NCCL is made to look absent (no skip)."""
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    assert not distributed.backend_available("nccl")
    with pytest.raises(distributed.DistributedError, match="nccl.*not available.*gloo"):
        distributed.choose_backend("nccl")
    with pytest.raises(distributed.DistributedError, match="not supported"):
        distributed.choose_backend("mpi-ish")


def test_checkpoint_from_another_configuration_names_the_field(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "c.pt")
    trainer.iterations = 2
    trainer.config["iterations"] = 2
    trainer.fit()
    other = make_trainer(tmp_path / "c.pt", resume=True)
    other.config["seed"] = 4
    with pytest.raises(ValueError, match="seed differs"):
        other.fit()


def test_cli_launch_two_processes(tmp_path: Path) -> None:
    from diffopt.cli import main

    code = main(["train", "--task", "sinusoid", "--iterations", "3", "--test-tasks", "4", "--no-progress",
                 "--nproc", "2", "--threads", "1", "--checkpoint", str(tmp_path / "c.pt"), "--timeout", "60"])
    assert code == 0
    assert load_checkpoint(tmp_path / "c.pt")["iteration"] == 3


def _hang_worker(rank: int, port: int, folder: str, timeout: float) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    context = distributed.initialize("gloo", timeout=timeout, rank=rank, world_size=2)

    def hang(trainer: Trainer, iteration: int):
        if rank == 1 and iteration == 2:
            time.sleep(3 * timeout)  # alive but silent
            os._exit(0)
        return None

    trainer = make_trainer(None, context, callbacks=[hang])
    started = time.monotonic()
    try:
        trainer.fit()
        outcome = "finished"
    except distributed.PeerFailure:
        outcome = f"peer-failure {time.monotonic() - started:.2f}"
    Path(folder, f"hang{rank}.txt").write_text(outcome)
    os._exit(0)


def test_hung_rank_is_detected_within_the_timeout(tmp_path: Path) -> None:
    timeout = 4.0
    mp.start_processes(_hang_worker, args=(distributed.free_port(), str(tmp_path), timeout), nprocs=2,
                       start_method="spawn")
    outcome = (tmp_path / "hang0.txt").read_text()
    assert outcome.startswith("peer-failure"), outcome
    assert float(outcome.split()[1]) < timeout + 10


# -- issue #17: signals, a connection reset, a hung rank ------------------------------------------------
def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_rank_and_leaves_one_checkpoint(tmp_path: Path, signum) -> None:
    checkpoint = tmp_path / "c.pt"
    command = [sys.executable, "-m", "diffopt", "train", "--nproc", "2", "--iterations", "1000000", "--meta-batch",
               "2", "--test-tasks", "2", "--eval-steps", "0", "--checkpoint", str(checkpoint), "--checkpoint-every",
               "2", "--no-progress", "--threads", "1", "--timeout", "30"]
    launcher = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert checkpoint.exists(), "the run never wrote a checkpoint"
        workers = _children(launcher.pid)
        assert len(workers) == 2
        launcher.send_signal(signum)
        code = launcher.wait(60)
        assert code == 128 + signum
        time.sleep(0.5)
        assert not [pid for pid in workers if _running(pid)], "a rank survived its launcher"
        before = checkpoint.read_bytes()
        time.sleep(1.0)
        assert checkpoint.read_bytes() == before  # nobody writes it any more
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert load_checkpoint(checkpoint)["iteration"] >= 2
        from diffopt.training.experiment import rebuild

        rebuild(str(checkpoint), tasks=2)  # the learner's weights load into a rebuilt learner
        err = launcher.stderr.read()
        assert "Traceback" not in err and "--resume" in err
    finally:
        for pid in [launcher.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("message,expected,not_expected", [
    ("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:1234", "closed its connection",
     "did not respond"),
    ("Connection reset by peer", "closed its connection", "did not respond"),
    ("[gloo] Timed out waiting 4000ms for recv operation to complete", "did not respond within 4 s",
     "closed its connection"),
])
def test_the_peer_failure_message_says_what_happened(message, expected, not_expected) -> None:
    context = distributed.DistributedContext(0, 2, timeout=4.0)

    def fail():
        raise RuntimeError(message)

    with pytest.raises(distributed.PeerFailure, match=expected) as info:
        context._guard("the gradient all-reduce", 7, fail)
    assert not_expected not in str(info.value) and "at iteration 7" in str(info.value)


def test_a_hung_rank_is_cleared_soon_after_the_other_gives_up(monkeypatch) -> None:
    """Rank 0 fails (as after its collective timed out); rank 1 hangs: it is killed after the grace period,
    not after a second full --timeout."""
    real_popen = subprocess.Popen
    started = []

    def fake_popen(command, env, **kwargs):
        script = "import sys; sys.exit(2)" if env["RANK"] == "0" else "import time; time.sleep(600)"
        process = real_popen([sys.executable, "-c", script], env=env, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(distributed.subprocess, "Popen", fake_popen)
    begin = time.monotonic()
    assert distributed.launch(["train"], 2, timeout=60.0, grace=1.0) == 2
    assert time.monotonic() - begin < 20  # not the 60 s timeout again
    assert all(p.poll() is not None for p in started)


def test_ranks_compare_the_outer_and_inner_optimizers_hyperparameters() -> None:
    """Through the Python API a rank with another outer or inner learning rate would have averaged its
    gradients in silently (the configuration held only the optimizer's class name): the start-up check
    now compares every group's hyperparameters of both optimizers."""
    from diffopt import recipes
    from diffopt.training import Trainer
    from diffopt.training.trainer import optimizer_settings, outer_adam

    class Seen(Exception):
        pass

    class Recording:
        is_main, rank, world_size = True, 0, 2

        def check_consistent(self, settings):
            self.settings = settings
            raise Seen

    def started(inner_lr: float, outer_lr: float) -> dict:
        torch.manual_seed(0)
        learner = recipes.make_learner("maml", recipes.sinusoid_mlp(hidden=8), classification=False,
                                       inner_lr=inner_lr)
        context = Recording()
        trainer = Trainer(learner, recipes.SinusoidSource(2, 3, 3, test_tasks=2), outer_adam(learner.parameters(),
                          lr=outer_lr), iterations=1, progress=False, distributed=context)
        with pytest.raises(Seen):
            trainer.fit()
        return context.settings

    base = started(0.01, 1e-3)
    assert base["outer optimizer"] == optimizer_settings(outer_adam([torch.zeros(1)], lr=1e-3))
    assert base["outer optimizer"][0]["lr"] == 1e-3 and base["inner optimizer"][0]["lr"] == 0.01
    assert started(0.02, 1e-3)["inner optimizer"] != base["inner optimizer"]
    assert started(0.01, 2e-3)["outer optimizer"] != base["outer optimizer"]
    assert started(0.01, 1e-3) == base


def test_the_gradient_all_reduce_leaves_frozen_parameters_without_a_gradient(monkeypatch) -> None:
    """A frozen parameter (requires_grad=False) given a zero gradient by the all-reduce would be moved by
    an outer optimizer's weight decay or momentum; a trainable one without a gradient still takes part."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(distributed.free_port()))
    context = distributed.initialize("gloo", timeout=30.0, rank=0, world_size=1)
    try:
        frozen, trained, unused = torch.ones(2), torch.ones(3, requires_grad=True), torch.ones(1, requires_grad=True)
        trained.grad = torch.full((3,), 2.0)
        context.all_reduce_gradients([frozen, trained, unused], weight=0.5)
        assert frozen.grad is None
        assert torch.equal(trained.grad, torch.ones(3)) and torch.equal(unused.grad, torch.zeros(1))
    finally:
        distributed.shutdown()
