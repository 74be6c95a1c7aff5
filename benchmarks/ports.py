"""Time per meta-step of the peers' example scripts and of their diffopt ports (issue 15).

Each case runs the same meta-step (same net, same random stand-in batch, float32, one
thread) with the peer's library and with diffopt's per-task port and batched path,
interleaved in shuffled rounds; it prints the median ms and each path's median paired
ratio to the peer. learn2learn does not install on Python 3.11: its row is the
hand-written ``maml_update`` reference of tests/peers.py (learn2learn's own
``clone_module`` / ``update_module`` walk the module tree and are not faster).

    OMP_NUM_THREADS=1 python benchmarks/ports.py --quick
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _common import fmt_ms, interleave, paired_ratio, set_threads, summarize  # noqa: E402
import peers  # noqa: E402
from diffopt.algorithms import MAML  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"port_{name}", ROOT / "examples" / "ports" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grads(loss: torch.Tensor, net) -> None:
    torch.autograd.grad(loss, list(net.parameters()))


def sine_case():
    port = load("learn2learn_maml_sine")
    torch.manual_seed(0)
    model = port.SineModel(32)
    x, y = port.sine_batch(16, 10, torch.Generator().manual_seed(1))
    tasks = [(x[i, ::2], y[i, ::2], x[i, 1::2], y[i, 1::2]) for i in range(16)]
    maml = port.l2l.algorithms.MAML(model, lr=0.01, allow_unused=True)
    fast = MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=5)
    return "learn2learn maml_sine (16 tasks, 5 steps)", "maml_update by hand", {
        "peer": lambda: grads(peers.learn2learn_reference(model, tasks, 0.01, 5), model),
        "port": lambda: grads(port.meta_train_loss(maml, (x, y), 5), model),
        "batched": lambda: grads(port.batched_meta_loss(fast, (x, y)), model),
    }


def conv_case(name: str, peer_label: str, peer_fn):
    port = load(name)
    torch.manual_seed(0)
    net = port.make_net(5, 32)
    batch = port.random_batch(4, 5, 1, 5, torch.Generator().manual_seed(1))
    fast = MAML(net, F.cross_entropy, inner_lr=0.1, inner_steps=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    step = port.train_step if name == "higher_maml_omniglot" else (lambda n, b, o: port.train_step(n, b, o))
    return f"{name.replace('_', ' ')} (4 tasks, 5 steps, Conv-4 width 32)", peer_label, {
        "peer": lambda: peer_fn(net, batch, n_inner_iter=5, inner_lr=0.1),
        "port": lambda: step(net, batch, opt),
        "batched": lambda: grads(fast.meta_loss(*batch), net),
    }


def imaml_case():
    port = load("torchopt_imaml_omniglot")
    torch.manual_seed(0)
    net = port.make_net(5, 32)
    batch = port.random_batch(4, 5, 1, 5, torch.Generator().manual_seed(1))
    learner = port.make_learner(net)
    return "torchopt iMAML (4 tasks, 5 steps, normal CG 5)", "torchopt", {
        "peer": lambda: peers.imaml_torchopt_gradient(net, *batch, steps=5, inner_lr=0.1, reg=2.0, cg_iterations=5,
                                                      rtol=1e-5),
        "port": lambda: grads(learner.meta_loss(*batch), net),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    args = parser.parse_args()
    set_threads(1)
    cases = [sine_case(), conv_case("higher_maml_omniglot", "higher", peers.higher_maml_gradient),
             conv_case("torchopt_maml_omniglot", "torchopt", peers.torchopt_maml_gradient), imaml_case()]
    print("| example | peer | peer ms | per-task port ms (ratio) | batched ms (ratio) |")
    print("|---|---|---|---|---|")
    for title, peer_label, fns in cases:
        samples = interleave(fns, repeats=5 if args.quick else 15, warmup=1)
        cells = [fmt_ms(summarize(samples["peer"]))]
        for key in ("port", "batched"):
            if key in samples:
                ratio = paired_ratio(samples[key], samples["peer"])["median"]
                cells.append(f"{fmt_ms(summarize(samples[key]))} ({ratio:.2f}x)")
            else:
                cells.append("—")
        print(f"| {title} | {peer_label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
