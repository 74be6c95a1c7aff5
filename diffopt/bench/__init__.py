r"""Benchmarks of the inner-loop modes against plain PyTorch: time, memory and accuracy.

For each problem (MAML's sinusoid MLP, the Conv-4 network on synthetic glyphs,
or a user's model), each number of inner steps K and each engine mode
(``first_order``, ``second_order``, ``truncated``, ``checkpointed``,
``implicit``, ``forward``, ``es``, ``pes``) this measures

* the **time per meta-step** (meta-loss and ``backward()`` to every
  meta-parameter): median and interquartile range over rounds in which every
  implementation runs once, in a freshly shuffled order (``interleave`` of
  :mod:`diffopt._measure`), so that the drifts of a shared machine hit all
  alike. The same rounds time the **baselines**: a plain PyTorch loop over
  tasks (``torch.func.functional_call`` + ``torch.autograd.grad``), a
  ``higher.innerloop_ctx`` loop, ``torch.func.vmap`` over tasks of
  ``torch.func.grad`` steps (each second and first order) and torchopt's
  ``MetaSGD`` loop when torchopt is installed. Every figure is also given as a
  ratio to the plain loop of the same order measured in the same rounds
  (first order against the first-order loop, every other mode against the
  second-order loop, the exact meta-gradient's reference);
* the **peak memory** of one meta-step: the peak of CPU tensor memory
  allocated during the call above what was allocated when it started, from
  ``torch.profiler.profile(profile_memory=True)`` allocation and free events
  summed in time order (``_measure.peak_tensor_bytes``), taken in the
  timing process after a warm-up call (``memory="profiler"``), or in a fresh
  Python process per configuration together with the peak resident-set
  increase (``memory="subprocess"``);
* how far each mode's meta-gradient is from the exact one: the cosine and
  relative error against the plain loop's second-order meta-gradient on the
  same meta-batch, and the first- versus second-order **meta-gradient
  discrepancy** of :func:`diffopt.diagnostics.metagradient_discrepancy`
  (cosine and relative error per task, mean and 95% CI) at the initial weights
  and at the weights second-order training reached;
* the **meta-test loss or accuracy** (mean and 95% CI over the test tasks,
  after K test-time steps) after a fixed budget of meta-training *time* and
  after a fixed budget of meta-*iterations*, for every mode and for the plain
  loop, and its paired difference to second order on the same test tasks:
  every run starts from the same weights and sees the same meta-batches
  (iteration ``i`` draws from a generator seeded by ``(seed, i)``); the runs
  advance in interleaved rounds of one meta-iteration each, so that the load
  of a shared machine hits every run's clock alike; the clock counts the
  meta-steps and the outer optimizer's steps, not data sampling, snapshots or
  evaluation.

Matplotlib is optional: :func:`plot` says so (a warning) and returns no files
without it. The command line is ``diffopt bench`` (:mod:`diffopt.cli.bench`) and
``python benchmarks/modes.py``.

One module per concern: :mod:`.problems` (what is trained), :mod:`.settings`
(what is measured, with what budgets), :mod:`.baselines` (the PyTorch loops,
shared with ``benchmarks/``), :mod:`.implementations` (a mode or a baseline on
its own model copy), :mod:`.measuring` (time, memory, gradient agreement),
:mod:`.training_runs` (accuracy after a time or iteration budget),
:mod:`.running` (the whole run) and :mod:`.reporting` (markdown, JSON, plots).
"""
from .. import _measure as common
from .baselines import (
    BASELINE_BUILDERS,
    Batch,
    baseline_available,
    func_vmap_step,
    higher_step,
    plain_loop_step,
    torchopt_step,
)
from .implementations import Implementation, make_learner, truncate_window
from .measuring import discrepancy, fixed_batch, measure, subprocess_worker, worker
from .problems import (
    PROBLEM_DEFAULTS,
    PROBLEMS,
    TASKS,
    Problem,
    RegressionSource,
    build_problem,
    load_factory,
    problem_spec,
)
from .reporting import MATPLOTLIB_MISSING, MiB, markdown, plot, problem_markdown, write_json
from .running import HELPERS, memory_method, run, targets
from .settings import BASELINES, MODES, QUICK_STEPS, STEPS, Settings, implementations, reference_for
from .training_runs import accuracy, initial_metrics, train_interleaved

__all__ = [
    "BASELINES", "BASELINE_BUILDERS", "Batch", "HELPERS", "Implementation", "MATPLOTLIB_MISSING", "MODES", "MiB",
    "PROBLEMS", "PROBLEM_DEFAULTS", "Problem", "QUICK_STEPS", "RegressionSource", "STEPS", "Settings", "TASKS",
    "accuracy", "baseline_available", "build_problem", "common", "discrepancy", "fixed_batch", "func_vmap_step",
    "higher_step", "implementations", "initial_metrics", "load_factory", "make_learner", "markdown", "measure",
    "memory_method", "plain_loop_step", "plot", "problem_markdown", "problem_spec", "reference_for", "run",
    "subprocess_worker", "targets", "torchopt_step", "train_interleaved", "truncate_window", "worker", "write_json",
]
