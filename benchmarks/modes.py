"""Every inner-loop mode against PyTorch baselines: time, memory and accuracy against K (issue "Benchmarks:
first versus second order, and every other mode").

Problems: MAML's sinusoid MLP (1-40-40-1, 25 tasks, 10 + 10 points, inner SGD lr 0.01), the
Conv-4 network on synthetic glyphs (5-way 1-shot, 15 query per class, meta-batch 4, transductive
BatchNorm, inner lr 0.4), and optionally your model (``--model module:factory --task ...``).
Modes: first_order, second_order, truncated (k = max(1, K//2)), checkpointed (⌈√K⌉), implicit
(iMAML, proximal λ = 1, 20 CG iterations), forward (w.r.t. the tensor inner learning rate),
es and pes (4 antithetic pairs, σ = 1e-3, PES truncation min(10, K)). Baselines, timed in the
same interleaved rounds: a plain PyTorch loop over tasks, a higher ``innerloop_ctx`` loop,
torch.func ``vmap(grad)`` (each second and first order), torchopt ``MetaSGD`` when installed.

The runner is :mod:`diffopt.bench` (the same as ``diffopt bench``, :mod:`diffopt.cli.bench`); the
timing, machine and memory helpers are those of ``diffopt/_measure.py``. See the docstring of
``diffopt/bench/__init__.py`` for the method.

    python benchmarks/modes.py [--quick] [--json PATH] [--markdown PATH] [--plots DIR]

Plots go to ``benchmarks/`` unless ``--plots`` says otherwise (``--plots ''`` for none).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffopt.cli.bench import main as bench_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """``diffopt bench`` with the plots written next to this script unless ``--plots`` says where
    (``--plots ''``: none). A ``--quick`` run writes none by default: the committed figures are the
    full run's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" not in argv and not any(a == "--plots" or a.startswith("--plots=") for a in argv):
        argv += ["--plots", str(Path(__file__).resolve().parent)]
    if "--plots" in argv and argv[argv.index("--plots") + 1:argv.index("--plots") + 2] == [""]:
        i = argv.index("--plots")
        del argv[i:i + 2]
    return bench_command(argv)


if __name__ == "__main__":
    sys.exit(main())
