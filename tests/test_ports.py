"""The ports of the peers' example scripts (examples/ports/) run, and compute the peers' meta-gradients.

Each port is run at small sizes on random stand-in data, in float64, and its meta-gradient is
compared with the peer library's own on the same net and tensors (higher, torchopt) or with a
hand-written reference of the peer's update (learn2learn, which does not install on Python
3.11): to ``1e-12 * max(1, |reference|)`` per element. The batched diffopt path of each
example is checked against the per-task port the same way.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import peers
from strategies import F64, record

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:We've integrated functorch:FutureWarning")]  # torchopt 0.7

PORTS = Path(__file__).resolve().parent.parent / "examples" / "ports"
TOL = 1e-12


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"port_{name}", PORTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def close_all(name: str, ours, reference) -> None:
    ours, reference = list(ours), list(reference)
    assert len(ours) == len(reference)
    worst = 0.0
    for a, b in zip(ours, reference):
        assert a is not None and b is not None, name
        worst = max(worst, float(((a - b).abs() / b.abs().clamp(min=1.0)).max()))
    record("ports", name, worst)
    assert worst <= TOL, f"{name}: {worst:.3e}"


def grads_after(step, net) -> list[torch.Tensor]:
    """The gradients one meta-step leaves in ``net``'s ``.grad`` (an outer SGD with lr 0 keeps θ)."""
    meta_opt = torch.optim.SGD(net.parameters(), lr=0.0)
    step(meta_opt)
    return [p.grad.clone() for p in net.parameters()]


def test_every_port_is_covered() -> None:
    assert {p.stem for p in PORTS.glob("*.py")} == {
        "higher_maml_omniglot", "learn2learn_maml_sine", "learn2learn_maml_omniglot", "torchopt_maml_omniglot",
        "torchopt_imaml_omniglot", "torchopt_l2r"}


@pytest.mark.parametrize("name", ["higher_maml_omniglot", "learn2learn_maml_sine", "learn2learn_maml_omniglot",
                                  "torchopt_maml_omniglot", "torchopt_imaml_omniglot", "torchopt_l2r"])
def test_port_runs_and_reports_finite_losses(name, capsys) -> None:
    losses = load(name).main(iterations=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert capsys.readouterr().out


def conv_setting(module: ModuleType, seed: int = 0):
    torch.manual_seed(seed)
    net = module.make_net(n_way=3, channels=4).double()
    batch = module.random_batch(2, 3, 1, 2, torch.Generator().manual_seed(seed + 1), dtype=F64)
    return net, batch


def test_higher_maml_omniglot_port_matches_higher() -> None:
    port = load("higher_maml_omniglot")
    net, batch = conv_setting(port)
    reference = peers.higher_maml_gradient(net, batch, n_inner_iter=5, inner_lr=0.1)
    ours = grads_after(lambda opt: port.train_step(net, batch, opt), net)
    close_all("higher maml-omniglot port vs higher", ours, reference)
    from diffopt.algorithms import MAML
    learner = MAML(net, F.cross_entropy, inner_lr=0.1, inner_steps=5)
    batched = grads_after(lambda opt: port.train_step_batched(learner, batch, opt), net)
    close_all("higher maml-omniglot batched path vs higher", batched, reference)


def test_torchopt_maml_omniglot_port_matches_torchopt() -> None:
    pytest.importorskip("torchopt")
    port = load("torchopt_maml_omniglot")
    net, batch = conv_setting(port)
    reference = peers.torchopt_maml_gradient(net, batch, n_inner_iter=5, inner_lr=0.1)
    close_all("torchopt few-shot MAML port vs torchopt", grads_after(lambda o: port.train_step(net, batch, o), net),
              reference)
    from diffopt.algorithms import MAML
    learner = MAML(net, F.cross_entropy, inner_lr=0.1, inner_steps=5)
    close_all("torchopt few-shot MAML batched path vs torchopt",
              grads_after(lambda o: port.train_step_batched(learner, batch, o), net), reference)


@pytest.mark.parametrize("tol", [0.0, 1e-5], ids=["every iteration", "torchopt's rtol"])
def test_torchopt_imaml_port_matches_torchopt(tol) -> None:
    pytest.importorskip("torchopt")
    port = load("torchopt_imaml_omniglot")
    net, batch = conv_setting(port)
    xs, ys, xq, yq = batch
    reference = peers.imaml_torchopt_gradient(net, xs, ys, xq, yq, steps=5, inner_lr=0.1, reg=2.0,
                                              cg_iterations=5, rtol=tol)
    learner = port.make_learner(net, cg_tol=tol)
    close_all(f"torchopt iMAML port vs torchopt (rtol {tol})",
              grads_after(lambda o: port.train_step(learner, batch, o), net), reference)


def test_torchopt_l2r_port_matches_torchopts_example_weights() -> None:
    pytest.importorskip("torchopt")
    port = load("torchopt_l2r")
    torch.manual_seed(0)
    model = port.LeNet5().double()
    g = torch.Generator().manual_seed(1)
    train_x, train_label = port.imbalanced_batch(12, 0.2, g, dtype=F64)
    valid_x, valid_label = port.imbalanced_batch(8, 0.5, g, dtype=F64)
    reference = peers.torchopt_l2r_weights(model, 1e-3, port.inner_loss, port.outer_loss, train_x, train_label,
                                           valid_x, valid_label)
    before = copy.deepcopy(model.state_dict())
    ours = port.example_weights(model, 1e-3, train_x, train_label, valid_x, valid_label)
    assert float(reference.abs().max()) > 0
    close_all("torchopt L2R port vs torchopt (example weights)", [ours], [reference])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing to recover


def sine_tasks(port: ModuleType, tasks: int = 3):
    x, y = port.sine_batch(tasks, 5, torch.Generator().manual_seed(3), dtype=F64)
    return x, y, [(x[i, ::2], y[i, ::2], x[i, 1::2], y[i, 1::2]) for i in range(tasks)]


def test_learn2learn_maml_sine_port_matches_maml_update_and_the_batched_path() -> None:
    port = load("learn2learn_maml_sine")
    torch.manual_seed(0)
    model = port.SineModel(dim=8).double()
    x, y, tasks = sine_tasks(port)
    maml = port.l2l.algorithms.MAML(model, lr=0.01, first_order=False, allow_unused=True)
    ours = torch.autograd.grad(port.meta_train_loss(maml, (x, y), adapt_steps=5), list(model.parameters()))
    reference = torch.autograd.grad(peers.learn2learn_reference(model, tasks, 0.01, 5), list(model.parameters()))
    close_all("learn2learn maml_sine port vs maml_update", ours, reference)
    from diffopt.algorithms import MAML
    batched = port.batched_meta_loss(MAML(model, F.mse_loss, inner_lr=0.01, inner_steps=5), (x, y))
    close_all("learn2learn maml_sine batched path vs maml_update",
              torch.autograd.grad(batched, list(model.parameters())), reference)


def test_learn2learn_maml_omniglot_port_matches_maml_update() -> None:
    port = load("learn2learn_maml_omniglot")
    torch.manual_seed(0)
    ways, shots = 3, 1
    model = port.omniglot_fc(28 ** 2, ways, sizes=(6, 5)).double()
    g = torch.Generator().manual_seed(2)
    tasks = [port.sample_task(ways, shots, g, dtype=F64) for _ in range(3)]
    maml = port.l2l.algorithms.MAML(model, lr=0.5, first_order=False)
    ours = grads_after(lambda _: port.accumulate_meta_gradient(maml, tasks, 2, shots, ways), model)
    split = [(d[::2], l[::2], d[1::2], l[1::2]) for d, l in tasks]  # fast_adapt's even / odd split
    reference = torch.autograd.grad(peers.learn2learn_reference(model, split, 0.5, 2, loss_fn=F.cross_entropy),
                                    list(model.parameters()))
    close_all("learn2learn vision maml_omniglot port vs maml_update", ours, reference)


def test_readme_and_examples_never_bind_the_optimizer_as_diffopt() -> None:
    """higher's ``as (fnet, diffopt)`` shadows the module (UnboundLocalError in a function that
    also calls ``diffopt.innerloop``): diffopt's own examples must not teach it."""
    import re
    root = PORTS.parent.parent
    files = [root / "README.md", *root.glob("examples/**/*.py")]
    pattern = re.compile(r"as \([^)]*\bdiffopt\)")
    offenders = [str(f.relative_to(root)) for f in files if pattern.search(f.read_text())]
    assert not offenders, offenders
