"""Tests of diffopt.tasks: sinusoid regression, N-way K-shot episodes, the Omniglot folder loader,
the PNG codec and the synthetic families."""
from __future__ import annotations

import base64
import math
import statistics
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffopt.tasks import (
    Episode,
    FewShotDataset,
    OmniglotLayoutError,
    PngError,
    SinusoidTasks,
    load_omniglot,
    mean_ci95,
    omniglot_splits,
    read_png,
    read_png_gray,
    scan_omniglot,
    sinusoid,
    synthetic_glyphs,
    synthetic_vectors,
    write_png,
)
from diffopt.tasks.png import PNG_SIGNATURE, _chunk

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class GlobalRngUntouched:
    """Context manager asserting that the global torch RNG state is unchanged."""

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        assert torch.equal(self.state, torch.random.get_rng_state()), "the global torch RNG was used"


def prototype_accuracy(ep: Episode, feature=lambda x: x) -> float:
    """Nearest-prototype (mean of the support per label) accuracy on the query, raw or through ``feature``."""
    T, N, K = ep.num_tasks, ep.ways, ep.shots
    s = feature(ep.support_x.reshape(T * N * K, -1)).reshape(T, N, K, -1).mean(2)
    q = feature(ep.query_x.reshape(T * ep.query_x.shape[1], -1)).reshape(T, ep.query_x.shape[1], -1)
    return (torch.cdist(q, s).argmin(-1) == ep.query_y).double().mean().item()


# ============================================================================ sinusoid


def test_sinusoid_shapes_ranges_and_exact_formula():
    tasks = SinusoidTasks(seed=3, dtype=torch.float64)
    b = tasks.sample(meta_batch=500, shots=10, query=7)
    assert b.support_x.shape == (500, 10, 1) and b.support_y.shape == (500, 10, 1)
    assert b.query_x.shape == (500, 7, 1) and b.query_y.shape == (500, 7, 1)
    assert b.amplitude.shape == (500,) and b.phase.shape == (500,)
    for t in (b.support_x, b.support_y, b.query_x, b.query_y, b.amplitude, b.phase):
        assert t.dtype == torch.float64
    assert 0.1 <= b.amplitude.min() and b.amplitude.max() <= 5.0
    assert 0.0 <= b.phase.min() and b.phase.max() <= math.pi
    xs = torch.cat([b.support_x, b.query_x], 1)
    assert -5.0 <= xs.min() and xs.max() <= 5.0
    A, ph = b.amplitude[:, None, None], b.phase[:, None, None]
    assert torch.equal(b.support_y, A * torch.sin(b.support_x - ph))
    assert torch.equal(b.query_y, A * torch.sin(b.query_x - ph))
    # the ranges are covered, not just respected
    assert b.amplitude.min() < 0.3 and b.amplitude.max() > 4.8
    assert b.phase.min() < 0.1 and b.phase.max() > math.pi - 0.1
    assert xs.min() < -4.9 and xs.max() > 4.9


def test_sinusoid_distributions_are_uniform():
    from scipy import stats

    b = SinusoidTasks(seed=0, dtype=torch.float64).sample(meta_batch=4000, shots=5)
    assert stats.kstest(b.amplitude.numpy(), stats.uniform(0.1, 4.9).cdf).pvalue > 1e-3
    assert stats.kstest(b.phase.numpy(), stats.uniform(0, math.pi).cdf).pvalue > 1e-3
    assert stats.kstest(b.support_x.reshape(-1).numpy(), stats.uniform(-5, 10).cdf).pvalue > 1e-3


def test_sinusoid_float32_default_and_query_defaults_to_shots():
    b = SinusoidTasks().sample(meta_batch=25, shots=5)
    assert b.support_x.dtype == torch.float32 and b.query_x.shape == (25, 5, 1)
    assert torch.equal(b.query_y, b.amplitude[:, None, None] * torch.sin(b.query_x - b.phase[:, None, None]))
    assert sinusoid(b.query_x, b.amplitude, b.phase).equal(b.query_y)
    assert len(b) == 25 and next(iter(SinusoidTasks())).support_x.shape == (25, 10, 1)


@SETTINGS
@given(meta_batch=st.integers(1, 40), shots=st.integers(0, 20), query=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_sinusoid_reproducible_and_global_rng_untouched(meta_batch, shots, query, seed):
    with GlobalRngUntouched():
        a = SinusoidTasks(seed=seed, dtype=torch.float64)
        b = SinusoidTasks(seed=seed, dtype=torch.float64)
        first = [a.sample(meta_batch, shots, query) for _ in range(2)]
    torch.manual_seed(seed + 1)  # the global seed must not matter
    with GlobalRngUntouched():
        second = [b.sample(meta_batch, shots, query) for _ in range(2)]
    for x, y in zip(first, second):
        assert x.support_x.shape == (meta_batch, shots, 1) and x.query_y.shape == (meta_batch, query, 1)
        for name in ("support_x", "support_y", "query_x", "query_y", "amplitude", "phase"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    assert not torch.equal(first[0].amplitude, first[1].amplitude)  # the stream advances
    other = SinusoidTasks(seed=seed + 1, dtype=torch.float64).sample(meta_batch, shots, query)
    assert not torch.equal(other.amplitude, first[0].amplitude)
    gen = torch.Generator().manual_seed(7)
    via_gen = a.sample(meta_batch, shots, query, generator=gen)
    again = a.sample(meta_batch, shots, query, generator=torch.Generator().manual_seed(7))
    assert torch.equal(via_gen.phase, again.phase)


def test_sinusoid_test_set_fixed_and_grid():
    tasks = SinusoidTasks(seed=1)
    tasks.sample(10)
    ts = tasks.test_set()
    assert ts.num_tasks == 600 and ts.support_x.shape == (600, 10, 1) and ts.query_x.shape == (600, 10, 1)
    again = SinusoidTasks(seed=99).test_set()
    assert torch.equal(ts.query_y, again.query_y) and torch.equal(ts.amplitude, again.amplitude)
    train = SinusoidTasks(seed=0).sample(600)
    assert not torch.equal(train.amplitude, ts.amplitude)
    x, y = ts[:3].grid(num_points=101)
    assert x.shape == (3, 101, 1) and y.shape == (3, 101, 1)
    assert torch.allclose(x[0, :, 0], torch.linspace(-5, 5, 101))
    assert torch.equal(y, ts.amplitude[:3, None, None] * torch.sin(x - ts.phase[:3, None, None]))
    one = ts[5]
    assert one.num_tasks == 1 and one.amplitude.item() == ts.amplitude[5].item()
    assert ts.to(dtype=torch.float64).support_x.dtype == torch.float64


def test_sinusoid_argument_errors():
    tasks = SinusoidTasks()
    with pytest.raises(ValueError, match="meta_batch=0"):
        tasks.sample(0)
    with pytest.raises(TypeError, match="shots must be an int"):
        tasks.sample(2, shots=2.5)
    with pytest.raises(TypeError, match="dtype"):
        SinusoidTasks(dtype=torch.int64)
    with pytest.raises(ValueError, match="amplitude_range"):
        SinusoidTasks(amplitude_range=(5.0, 0.1))


def t975_closed_form(dof: int) -> float:
    """Student's t 0.975 quantile in closed form for 1, 2 and 4 degrees of freedom (Hill 1970;
    Shaw 2006, "Sampling Student's T distribution"), independent of scipy."""
    p = 0.975
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    alpha = 4 * p * (1 - p)  # dof == 4
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    return 2 * math.sqrt(q - 1)


T975 = {n: t975_closed_form(n - 1) for n in (2, 3, 5)}


@pytest.mark.parametrize("n", sorted(T975))
def test_mean_ci95_is_the_student_t_interval_with_the_sample_sd(n):
    values = [float(v) for v in torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)]
    mean, ci = mean_ci95(torch.tensor(values, dtype=torch.float64))
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-14)
    assert ci == pytest.approx(T975[n] * statistics.stdev(values) / math.sqrt(n), rel=1e-12)


def test_mean_ci95_of_one_value_has_no_interval_and_600_tasks_match_the_official_formula():
    # one task: no interval (the old 1.96·population-sd formula gave ±0.0)
    mean, ci = mean_ci95([0.7])
    assert mean == 0.7 and math.isnan(ci)
    with pytest.raises(ValueError, match="empty"):
        mean_ci95([])
    # MAML's 600 test tasks: within 0.3% of 1.96·np.std/√600, the official evaluation's
    v = np.random.default_rng(0).normal(size=600)
    _, ci = mean_ci95(torch.tensor(v))
    assert ci == pytest.approx(1.96 * np.std(v) / math.sqrt(600), rel=3e-3)
    assert ci > 1.96 * np.std(v) / math.sqrt(600)


# ============================================================================ episodes


def coded_dataset(num_classes: int, counts=None, size: int = 4) -> FewShotDataset:
    """Examples (1, size, size) whose value codes (class, example) and whose marker pixel reveals rotations."""
    classes = {}
    for c in range(num_classes):
        n = counts[c] if counts is not None else 6 + (c % 3)
        x = torch.zeros(n, 1, size, size, dtype=torch.float64)
        for e in range(n):
            x[e] = c * 1000 + e
            x[e, 0, 0, 0] += 0.5  # marker at the top-left corner
        classes[f"c{c}"] = x
    return FewShotDataset(classes)


def decode(example: Tensor) -> tuple[int, int, int]:
    """(source class, example index, quarter turns) of a coded example."""
    value = int(example.min().item())
    marker = (example[0] != value).to(torch.int64)
    size = marker.shape[-1]
    reference = torch.zeros(size, size, dtype=torch.int64)
    reference[0, 0] = 1
    k = next(k for k in range(4) if torch.equal(torch.rot90(reference, k, dims=(-2, -1)), marker))
    return value // 1000, value % 1000, k


@SETTINGS
@given(
    ways=st.integers(1, 8),
    shots=st.integers(0, 3),
    query=st.integers(1, 3),
    meta_batch=st.integers(1, 6),
    rotate=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_episode_invariants(ways, shots, query, meta_batch, rotate, shuffle, seed):
    data = coded_dataset(10)
    if rotate:
        data = data.with_rotations()
    with GlobalRngUntouched():
        ep = data.sample(meta_batch, ways, shots, query, generator=torch.Generator().manual_seed(seed), shuffle=shuffle)
    T, N, K, Q = meta_batch, ways, shots, query
    assert ep.support_x.shape == (T, N * K, 1, 4, 4) and ep.support_y.shape == (T, N * K)
    assert ep.query_x.shape == (T, N * Q, 1, 4, 4) and ep.query_y.shape == (T, N * Q)
    assert ep.classes.shape == (T, N) and (ep.ways, ep.shots, ep.query) == (N, K, Q)
    assert ep.support_y.dtype == torch.int64 and ep.query_y.dtype == torch.int64
    for t in range(T):
        assert len(set(ep.classes[t].tolist())) == N  # N distinct classes
        assert torch.equal(torch.bincount(ep.support_y[t], minlength=N), torch.full((N,), K))
        assert torch.equal(torch.bincount(ep.query_y[t], minlength=N), torch.full((N,), Q))
        seen = set()
        for x, y in zip(torch.cat([ep.support_x[t], ep.query_x[t]]), torch.cat([ep.support_y[t], ep.query_y[t]])):
            source, index, turns = decode(x)
            c = int(ep.classes[t, y])
            # support and query of label y both come from the class that label stands for
            assert (source, turns) == (int(data.groups[c]), int(data.rotations[c]) // 90)
            assert (source, turns, index) not in seen  # no example is used twice in a task
            seen.add((source, turns, index))
        if not shuffle:
            assert torch.equal(ep.support_y[t], torch.arange(N).repeat_interleave(K))


def test_label_permutation_changes_between_tasks():
    data = coded_dataset(5)
    ep = data.sample(200, 5, 1, 1)
    # every task uses all 5 classes; the class -> label assignment is a random permutation
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in ep.classes.tolist())
    perms = {tuple(row) for row in ep.classes.tolist()}
    assert len(perms) > 50
    label_of_class0 = (ep.classes == 0).int().argmax(1)
    assert torch.bincount(label_of_class0, minlength=5).min() > 15  # roughly uniform over labels


def test_episode_sampling_reproducible_and_independent_of_global_rng():
    data = coded_dataset(12).with_rotations()
    with GlobalRngUntouched():
        initial = data.sample(4, 5, 2, 3)  # the data set's own generator starts from seed=0
        data.reseed(0)
        first = [data.sample(4, 5, 2, 3) for _ in range(3)]
    torch.manual_seed(123)
    with GlobalRngUntouched():
        data.reseed(0)
        second = [data.sample(4, 5, 2, 3) for _ in range(3)]
    for x, y in zip(first, second):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
        assert torch.equal(x.classes, y.classes)
    assert torch.equal(initial.classes, first[0].classes)
    assert not torch.equal(first[0].classes, first[1].classes)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(data.sample(3, 5, 1, 1, generator=g1).query_x, data.sample(3, 5, 1, 1, generator=g2).query_x)


def test_sampling_does_not_depend_on_the_default_dtype():
    data = coded_dataset(12).with_rotations()
    sin = SinusoidTasks(seed=2).sample(5)
    ep = data.sample(3, 4, 1, 2, generator=torch.Generator().manual_seed(1), shuffle=True)
    vec, gly = synthetic_vectors(4, 3, seed=1), synthetic_glyphs(2, 2, seed=1)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sin64 = SinusoidTasks(seed=2).sample(5)
        ep64 = data.sample(3, 4, 1, 2, generator=torch.Generator().manual_seed(1), shuffle=True)
        vec64, gly64 = synthetic_vectors(4, 3, seed=1), synthetic_glyphs(2, 2, seed=1)
    finally:
        torch.set_default_dtype(saved)
    assert torch.equal(sin.query_y, sin64.query_y) and sin64.query_y.dtype == torch.float32
    assert torch.equal(ep.support_x, ep64.support_x) and torch.equal(ep.query_y, ep64.query_y)
    assert torch.equal(vec[3], vec64[3]) and torch.equal(gly[1], gly64[1])


def test_fixed_evaluation_episodes_are_deterministic_and_batch_independent():
    data = coded_dataset(10)
    es = data.episodes(num_tasks=23, ways=4, shots=1, query=2, meta_batch=5, seed=9)
    assert len(es) == 5
    first = Episode.cat(list(es))
    assert first.num_tasks == 23
    again = Episode.cat(list(data.episodes(23, 4, 1, 2, meta_batch=7, seed=9)))
    assert torch.equal(first.query_x, again.query_x) and torch.equal(first.classes, again.classes)
    other = Episode.cat(list(data.episodes(23, 4, 1, 2, meta_batch=5, seed=10)))
    assert not torch.equal(first.classes, other.classes)
    assert torch.equal(es.task(4).support_x, first[4].support_x)


def test_split_is_class_disjoint_seeded_and_exact():
    data = coded_dataset(20)
    train, val, test = data.split((12, 3, None), seed=4)
    assert (train.num_classes, val.num_classes, test.num_classes) == (12, 3, 5)
    sets = [set(d.groups.tolist()) for d in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(range(20))
    again = data.split((12, 3, None), seed=4)
    assert [d.class_names for d in again] == [d.class_names for d in (train, val, test)]
    assert data.split((12, 3, None), seed=5)[0].class_names != train.class_names
    half = data.split((0.5, 0.5))
    assert [d.num_classes for d in half] == [10, 10]
    # examples come only from the split's classes
    ep = test.sample(20, 5, 1, 1)
    assert set(ep.support_x[:, :, 0, 1, 1].reshape(-1).div(1000).floor().long().tolist()) <= sets[2]
    with pytest.raises(ValueError, match="only 20"):
        data.split((15, 10))
    with pytest.raises(ValueError, match="at most one entry may be None"):
        data.split((None, None))


@pytest.mark.parametrize("rotate_first", [True, False])
def test_rotation_classes_stay_in_their_source_split(rotate_first):
    data = coded_dataset(9)
    if rotate_first:
        parts = data.with_rotations().split((5, None), seed=2)
    else:
        parts = [d.with_rotations() for d in data.split((5, None), seed=2)]
    assert [d.num_classes for d in parts] == [20, 16] and [d.num_groups for d in parts] == [5, 4]
    for d in parts:
        for g in d.groups.unique().tolist():
            rots = sorted(d.rotations[d.groups == g].tolist())
            assert rots == [0, 90, 180, 270]
    assert set(parts[0].groups.tolist()).isdisjoint(parts[1].groups.tolist())
    # the same characters go to the same split whichever order is used
    plain = data.split((5, None), seed=2)
    assert set(plain[0].groups.tolist()) == set(parts[0].groups.tolist())


def test_rotated_class_examples_are_rotated_sources():
    data = coded_dataset(3, size=5)
    rot = data.with_rotations((0, 90, 270))
    assert rot.num_classes == 9 and rot.class_names[:3] == ["c0", "c0@rot90", "c0@rot270"]
    assert torch.equal(rot[1], torch.rot90(data[0], 1, dims=(-2, -1)))
    assert torch.equal(rot[2], torch.rot90(data[0], 3, dims=(-2, -1)))
    with pytest.raises(ValueError, match="already holds rotated"):
        rot.with_rotations()
    with pytest.raises(ValueError, match="multiples of 90"):
        data.with_rotations((0, 45))
    with pytest.raises(ValueError, match="square"):
        FewShotDataset([torch.zeros(2, 3, 4)]).with_rotations()


def test_from_labelled_groups_by_label():
    x = torch.arange(10.0)[:, None]
    y = torch.tensor([2, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    data = FewShotDataset.from_labelled(x, y)
    assert data.class_names == ["0", "1", "2"] and data.counts.tolist() == [3, 3, 4]
    assert data[2][:, 0].tolist() == [0.0, 2.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="do not match"):
        FewShotDataset.from_labelled(x, y[:5])
    with pytest.raises(TypeError, match="from_labelled"):
        FewShotDataset(x)


def test_sampling_errors_name_the_numbers():
    data = coded_dataset(6, counts=[5, 5, 3, 5, 5, 5])
    with pytest.raises(ValueError, match=r"ways=7 but this split has only 6 classes"):
        data.sample(2, 7, 1, 1)
    with pytest.raises(ValueError, match=r"shots \+ query = 2 \+ 2 = 4 .*class 'c2' has 3"):
        data.sample(2, 3, 2, 2)
    assert data.filter(min_examples=4).num_classes == 5
    data.filter(min_examples=4).sample(2, 5, 2, 2)
    with pytest.raises(ValueError, match="shapes|share one shape"):
        FewShotDataset({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="meta_batch=0"):
        data.sample(0, 2, 1, 1)


def test_episode_helpers():
    ep = coded_dataset(6).sample(4, 3, 2, 1)
    assert ep[1].num_tasks == 1 and torch.equal(ep[1].query_x[0], ep.query_x[1])
    e32 = ep.to(dtype=torch.float32)
    assert e32.support_x.dtype == torch.float32 and e32.support_y.dtype == torch.int64
    assert torch.equal(Episode.cat([ep[:2], ep[2:]]).support_x, ep.support_x)


# ============================================================================ PNG codec

FORMATS = [
    ("gray1-bool", lambda r, h, w: r.integers(0, 2, (h, w)).astype(bool), {}),
    ("gray1", lambda r, h, w: r.integers(0, 2, (h, w), dtype=np.uint8), {"bit_depth": 1}),
    ("gray2", lambda r, h, w: r.integers(0, 4, (h, w), dtype=np.uint8), {"bit_depth": 2}),
    ("gray4", lambda r, h, w: r.integers(0, 16, (h, w), dtype=np.uint8), {"bit_depth": 4}),
    ("gray8", lambda r, h, w: r.integers(0, 256, (h, w), dtype=np.uint8), {}),
    ("gray16", lambda r, h, w: r.integers(0, 65536, (h, w), dtype=np.uint16), {}),
    ("gray-alpha8", lambda r, h, w: r.integers(0, 256, (h, w, 2), dtype=np.uint8), {}),
    ("rgb8", lambda r, h, w: r.integers(0, 256, (h, w, 3), dtype=np.uint8), {}),
    ("rgba8", lambda r, h, w: r.integers(0, 256, (h, w, 4), dtype=np.uint8), {}),
    ("rgb16", lambda r, h, w: r.integers(0, 65536, (h, w, 3), dtype=np.uint16), {}),
    ("rgba16", lambda r, h, w: r.integers(0, 65536, (h, w, 4), dtype=np.uint16), {}),
]


@pytest.mark.parametrize("name,make,options", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4, "cycle"])
def test_png_round_trip(name, make, options, filter_type, tmp_path):
    rng = np.random.default_rng(hash((name, str(filter_type))) % 2**32)
    for h, w in [(1, 1), (7, 13), (105, 105)]:
        arr = make(rng, h, w)
        data = write_png(arr, tmp_path / "x.png", filter_type=filter_type, **options)
        assert data[:8] == PNG_SIGNATURE and (tmp_path / "x.png").read_bytes() == data
        back = read_png(tmp_path / "x.png")
        expected = arr.astype(np.uint8) if arr.dtype == bool else arr
        assert back.dtype == expected.dtype and back.shape == expected.shape
        np.testing.assert_array_equal(back, expected)


@SETTINGS
@given(h=st.integers(1, 20), w=st.integers(1, 20), filter_type=st.sampled_from([0, 1, 2, 3, 4, "cycle"]),
       seed=st.integers(0, 1000), kind=st.integers(0, len(FORMATS) - 1))
def test_png_round_trip_any_size(h, w, filter_type, seed, kind):
    _, make, options = FORMATS[kind]
    arr = make(np.random.default_rng(seed), h, w)
    back = read_png(write_png(arr, filter_type=filter_type, **options))
    np.testing.assert_array_equal(back, arr.astype(np.uint8) if arr.dtype == bool else arr)


def test_png_reads_an_externally_encoded_file():
    # the widely used 1x1 RGBA PNG (written by another encoder, Sub-filtered)
    data = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    )
    np.testing.assert_array_equal(read_png(data), [[[0, 0, 255, 127]]])


def _png(width, height, depth, color, rows: bytes, extra=(), interlace=0) -> bytes:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))
    return PNG_SIGNATURE + ihdr + b"".join(extra) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def test_png_palette_and_hand_filtered_rows():
    plte = _chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255]))
    rows = bytes([0, 0b00011000]) + bytes([0, 0b10000000])  # 2-bit indices: [0,1,2,0] / [2,0,0,0]
    arr = read_png(_png(4, 2, 2, 3, rows, [plte]))
    np.testing.assert_array_equal(arr[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 0]])
    trns = _chunk(b"tRNS", bytes([10]))
    rgba = read_png(_png(4, 2, 2, 3, rows, [plte, trns]))
    assert rgba.shape == (2, 4, 4) and rgba[0, 0, 3] == 10 and rgba[0, 1, 3] == 255
    # an 8-bit gray image, 3x2, whose second row is Paeth-filtered and third Average-filtered, by hand
    raw = np.array([[10, 20, 30], [15, 25, 5], [200, 0, 100]], dtype=np.int64)
    paeth_row = [raw[1, 0] - raw[0, 0]]  # first byte: a=0, c=0 -> predictor b (up)
    for i in (1, 2):
        a, b, c = raw[1, i - 1], raw[0, i], raw[0, i - 1]
        p = a + b - c
        pred = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
        paeth_row.append(raw[1, i] - pred)
    avg_row = [raw[2, 0] - raw[1, 0] // 2] + [raw[2, i] - (raw[2, i - 1] + raw[1, i]) // 2 for i in (1, 2)]
    data = bytes([0, 10, 20, 30, 4, *[v % 256 for v in paeth_row], 3, *[v % 256 for v in avg_row]])
    np.testing.assert_array_equal(read_png(_png(3, 3, 8, 0, data)), raw)


def test_png_gray_conversion():
    bits = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(read_png_gray(write_png(bits)), bits.astype(np.float32))
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    gray = read_png_gray(write_png(rgba))
    assert gray[0, 0] == pytest.approx(0.299, abs=1e-6) and gray[0, 1] == pytest.approx(1.0)  # transparent -> white
    g16 = read_png_gray(write_png(np.array([[0, 65535]], dtype=np.uint16)))
    np.testing.assert_array_equal(g16, [[0.0, 1.0]])
    g4 = read_png_gray(write_png(np.array([[0, 5, 15]], dtype=np.uint8), bit_depth=4))
    np.testing.assert_allclose(g4, [[0.0, 5 / 15, 1.0]])


def test_png_errors(tmp_path):
    good = write_png(np.zeros((3, 3), dtype=np.uint8))
    with pytest.raises(PngError, match="signature"):
        read_png(b"GIF89a" + good)
    corrupt = bytearray(good)
    corrupt[20] ^= 0xFF  # inside IHDR
    with pytest.raises(PngError, match="CRC mismatch"):
        read_png(bytes(corrupt))
    with pytest.raises(PngError, match="interlaced"):
        read_png(_png(1, 1, 8, 0, b"\x00\x00", interlace=1))
    with pytest.raises(PngError, match="bit depth 4 is not valid for RGB"):
        read_png(_png(1, 1, 4, 2, b"\x00\x00"))
    with pytest.raises(PngError, match="truncated"):
        read_png(_png(4, 4, 8, 0, b"\x00" * 9))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_png(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="bit_depth=1 holds values below 2"):
        write_png(np.array([[0, 2]], dtype=np.uint8), bit_depth=1)
    with pytest.raises(ValueError, match="dtype float64"):
        write_png(np.zeros((2, 2)))


# ============================================================================ Omniglot

ALPHABETS = {
    "images_background": {"Alphabet_of_the_Magi": 3, "Latin": 2},
    "images_evaluation": {"Angelic": 2},
}
DRAWINGS = 4


def character_image(k: int, drawing: int) -> np.ndarray:
    """A 105x105 1-bit image, white background (True) with a black bar whose place encodes the character."""
    img = np.ones((105, 105), dtype=bool)
    top = 5 + 12 * k
    img[top:top + 10, 10 + 3 * drawing:60 + 3 * drawing] = False
    return img


def make_omniglot(root: Path, alphabets=ALPHABETS, drawings: int = DRAWINGS) -> list[tuple[str, int]]:
    """Write a small Omniglot folder in the published layout; return (class name, k) in sorted order."""
    names = []
    k = 0
    for subset, alphas in alphabets.items():
        for alphabet, n_chars in alphas.items():
            for c in range(1, n_chars + 1):
                folder = root / subset / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(drawings):
                    write_png(character_image(k, d), folder / f"{1000 + k:04d}_{d + 1:02d}.png", filter_type="cycle")
                names.append((f"{subset}/{alphabet}/character{c:02d}", k))
                k += 1
    return names


@pytest.fixture
def omniglot_root(tmp_path) -> Path:
    root = tmp_path / "omniglot"
    make_omniglot(root)
    return root


def test_omniglot_written_in_published_format(omniglot_root):
    f = next((omniglot_root / "images_background" / "Latin" / "character01").glob("*.png"))
    data = f.read_bytes()
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    assert (width, height, depth, color, interlace) == (105, 105, 1, 0, 0)


def test_load_omniglot_end_to_end(omniglot_root):
    data = load_omniglot(omniglot_root)
    names = sorted(name for name, _ in make_omniglot(omniglot_root.parent / "again"))
    assert data.class_names == names and data.num_classes == 7
    assert data.example_shape == (1, 28, 28) and data.dtype == torch.float32
    assert data.counts.tolist() == [DRAWINGS] * 7
    x = data[0]
    assert 0.0 <= x.min() and x.max() <= 1.0
    # strokes are 1, background 0, and the resize is area averaging of the inverted image
    src = torch.from_numpy(1.0 - character_image(0, 0).astype(np.float32))[None, None]
    expected = F.interpolate(src, size=(28, 28), mode="area")[0]
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    assert x[0].sum() > 10 and x[0][:, 20:, :].abs().sum() == 0  # the bar sits at the top for k = 0
    full = load_omniglot(omniglot_root, image_size=None, subsets=("images_evaluation",), dtype=torch.float64)
    assert full.example_shape == (1, 105, 105) and full.num_classes == 2 and full.dtype == torch.float64
    assert set(full[0].unique().tolist()) == {0.0, 1.0}
    raw = load_omniglot(omniglot_root, invert=False, image_size=None)
    assert raw[0][0, 0, 0, 0] == 1.0  # white background in the file's own convention
    bil = load_omniglot(omniglot_root, resize="bilinear", image_size=14)
    assert bil.example_shape == (1, 14, 14) and 0 <= bil[0].min() and bil[0].max() <= 1


def test_omniglot_cache(omniglot_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "omni.pt"
    first = load_omniglot(omniglot_root, cache=cache)
    assert cache.is_file()
    assert isinstance(torch.load(cache, weights_only=True)["images"], torch.Tensor)
    import diffopt.tasks.omniglot as om

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(om, "read_png_gray", no_decoding)
    second = load_omniglot(omniglot_root, cache=cache)
    assert second.class_names == first.class_names
    assert all(torch.equal(first[i], second[i]) for i in range(first.num_classes))
    monkeypatch.undo()
    # a change of options or of the files rebuilds the cache
    assert load_omniglot(omniglot_root, cache=cache, image_size=20).example_shape == (1, 20, 20)
    write_png(character_image(0, 9), omniglot_root / "images_background" / "Latin" / "character01" / "extra.png")
    assert load_omniglot(omniglot_root, cache=cache).counts.max() == DRAWINGS + 1
    assert load_omniglot(omniglot_root, cache=True).num_classes == 7
    assert (omniglot_root / "omniglot_28_area.pt").is_file()


def test_omniglot_splits_protocol(omniglot_root):
    splits = omniglot_splits(omniglot_root, num_train=4, num_val=1, split_seed=1)
    train, val, test = splits
    assert (train.num_groups, val.num_groups, test.num_groups) == (4, 1, 2)
    assert (train.num_classes, val.num_classes, test.num_classes) == (16, 4, 8)  # rotations as new classes
    names = [set(n.split("@")[0] for n in d.class_names) for d in splits]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for d in splits:
        for g in d.groups.unique().tolist():
            assert sorted(d.rotations[d.groups == g].tolist()) == [0, 90, 180, 270]
    ep = train.sample(3, 5, 1, 2)
    assert ep.support_x.shape == (3, 5, 1, 28, 28) and ep.query_x.shape == (3, 10, 1, 28, 28)
    again = omniglot_splits(omniglot_root, num_train=4, num_val=1, split_seed=1)
    assert again.train.class_names == train.class_names
    assert torch.equal(again.train.sample(2, 5, 1, 1).support_x, omniglot_splits(
        omniglot_root, num_train=4, num_val=1, split_seed=1).train.sample(2, 5, 1, 1).support_x)
    plain = omniglot_splits(load_omniglot(omniglot_root), num_train=5, rotations=None)
    assert plain.train.num_classes == 5 and plain.val.num_classes == 0 and plain.test.num_classes == 2
    with pytest.raises(ValueError, match=r"num_train=1200 \+ num_val=0 = 1200 characters requested, .* only 7"):
        omniglot_splits(omniglot_root)
    with pytest.raises(ValueError, match="ways=5 but this split has only 0 classes"):
        plain.val.sample(1, 5, 1, 1)


def test_omniglot_missing_folder(tmp_path):
    with pytest.raises(OmniglotLayoutError) as info:
        load_omniglot(tmp_path / "nowhere")
    msg = str(info.value)
    assert "does not exist" in msg and str(tmp_path / "nowhere") in msg
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert "<Alphabet>/<character01>/<drawing>.png" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_omniglot_layout_errors(tmp_path):
    root = tmp_path / "r"
    make_omniglot(root, {"images_background": {"Latin": 1}})
    with pytest.raises(OmniglotLayoutError, match=r"no images_evaluation/ folder; found: images_background/"):
        load_omniglot(root)
    assert load_omniglot(root, subsets=("images_background",)).num_classes == 1
    (root / "images_evaluation.zip").write_bytes(b"PK")
    with pytest.raises(OmniglotLayoutError, match="unzip it there"):
        load_omniglot(root)
    # the real root is one level deeper
    outer = tmp_path / "outer"
    make_omniglot(outer / "omniglot-py", {"images_background": {"Latin": 1}, "images_evaluation": {"Angelic": 1}})
    with pytest.raises(OmniglotLayoutError, match=r"pass root=.*omniglot-py"):
        load_omniglot(outer)
    # PNGs directly in the alphabet folder: character folders at the wrong depth
    flat = tmp_path / "flat"
    (flat / "images_background" / "Latin").mkdir(parents=True)
    write_png(character_image(0, 0), flat / "images_background" / "Latin" / "a.png")
    with pytest.raises(OmniglotLayoutError, match="directly in the alphabet folder .*wrong depth"):
        scan_omniglot(flat, ("images_background",))
    # PNGs directly in images_background
    flatter = tmp_path / "flatter"
    (flatter / "images_background").mkdir(parents=True)
    write_png(character_image(0, 0), flatter / "images_background" / "a.png")
    with pytest.raises(OmniglotLayoutError, match="no alphabet folders.*two folder levels deeper"):
        scan_omniglot(flatter, ("images_background",))
    # a character folder without PNGs, and one with an extra level of folders
    empty = tmp_path / "empty"
    (empty / "images_background" / "Latin" / "character01").mkdir(parents=True)
    (empty / "images_background" / "Latin" / "character01" / "notes.txt").write_text("x")
    with pytest.raises(OmniglotLayoutError, match="holds no PNG files. Found: notes.txt"):
        scan_omniglot(empty, ("images_background",))
    deep = tmp_path / "deep"
    make_omniglot(deep / "images_background", {"Latin": {"X": 1}})  # .../Latin/X/character01/*.png
    with pytest.raises(OmniglotLayoutError, match="extra folder level"):
        scan_omniglot(deep, ("images_background",))
    # an alphabet folder without characters
    bare = tmp_path / "bare"
    (bare / "images_background" / "Latin").mkdir(parents=True)
    with pytest.raises(OmniglotLayoutError, match="holds no character folders"):
        scan_omniglot(bare, ("images_background",))
    with pytest.raises(OmniglotLayoutError, match="holds 1 characters; the published data has 964"):
        load_omniglot(root, subsets=("images_background",), strict=True)
    with pytest.raises(ValueError, match="not an Omniglot subset"):
        scan_omniglot(root, ("images_test",))


# ============================================================================ synthetic families


def test_synthetic_vectors_learnable_and_meta_learning_helps():
    data = synthetic_vectors(num_classes=120, examples_per_class=20, seed=0)
    assert data.num_classes == 120 and data.example_shape == (32,)
    train, test = data.split((80, None), seed=0)
    gen = torch.Generator().manual_seed(1)
    ep = test.sample(300, 5, 1, 10, generator=gen)
    raw = prototype_accuracy(ep)
    assert 0.3 < raw < 0.65  # clearly above chance (0.2), clearly imperfect
    # a feature map learned on the meta-training classes only (LDA) transfers to new classes
    xs = [train[i].double() for i in range(train.num_classes)]
    within = sum((x - x.mean(0)).T @ (x - x.mean(0)) for x in xs) / sum(len(x) for x in xs)
    between = torch.cov(torch.stack([x.mean(0) for x in xs]).T)
    evals, evecs = torch.linalg.eigh(torch.linalg.solve(within, between) + torch.linalg.solve(within, between).T)
    proj = evecs[:, -8:].float()
    learned = prototype_accuracy(ep, lambda x: x @ proj)
    assert learned > raw + 0.2
    five = prototype_accuracy(test.sample(300, 5, 5, 10, generator=gen))
    assert raw < five < 0.9
    assert torch.equal(synthetic_vectors(10, 3, seed=4)[7], synthetic_vectors(10, 3, seed=4)[7])
    assert not torch.equal(synthetic_vectors(10, 3, seed=4)[7], synthetic_vectors(10, 3, seed=5)[7])


def test_synthetic_glyphs_learnable_images():
    with GlobalRngUntouched():
        data = synthetic_glyphs(num_classes=60, examples_per_class=12, seed=0)
    assert data.example_shape == (1, 28, 28) and data.num_classes == 60 and data.dtype == torch.float32
    x = torch.stack([data[i] for i in range(60)])
    assert 0.0 <= x.min() and x.max() <= 1.0
    ink = (x > 0.5).double().mean()
    assert 0.03 < ink < 0.3  # thin strokes on a dark background
    ep = data.sample(200, 5, 1, 5, generator=torch.Generator().manual_seed(0))
    acc = prototype_accuracy(ep)
    assert 0.4 < acc < 0.92
    ep20 = data.sample(50, 20, 1, 5, generator=torch.Generator().manual_seed(0))
    assert 0.2 < prototype_accuracy(ep20) < 0.85  # chance 0.05
    assert torch.equal(synthetic_glyphs(3, 2, seed=1)[2], synthetic_glyphs(3, 2, seed=1)[2])
    assert not torch.equal(synthetic_glyphs(3, 2, seed=1)[2], synthetic_glyphs(3, 2, seed=2)[2])
    rotated = data.with_rotations().sample(2, 5, 1, 1)
    assert rotated.support_x.shape == (2, 5, 1, 28, 28)


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="informative_dim=40 must not exceed dim=32"):
        synthetic_vectors(informative_dim=40)
    with pytest.raises(ValueError, match="num_classes=0"):
        synthetic_glyphs(num_classes=0)
    with pytest.raises(ValueError, match="strokes"):
        synthetic_glyphs(strokes=(3, 2))


# -- decompression bombs (issue #17 item 9) -------------------------------------------------------------
def _zeros_deflate(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, built without ever holding them: 1 MiB blocks ended by a full
    flush compress to the same bytes every time, so one is repeated; the checksum is computed in blocks."""
    block = bytes(2**20)
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH) == repeated
    full, rest = divmod(n, len(block))
    tail = zlib.compressobj(9)
    tail_bytes = tail.compress(bytes(rest)) + tail.flush(zlib.Z_FINISH)
    body = tail_bytes[2:-4]  # the tail's deflate blocks, without its zlib header and checksum
    checksum = 1
    for _ in range(full):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(bytes(rest), checksum)
    stream = first + repeated * (full - 1) + body + checksum.to_bytes(4, "big")
    if full == 0:
        stream = tail_bytes
    return stream


def _bomb(width: int, height: int, inflated: int) -> bytes:
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", _zeros_deflate(inflated)) + _chunk(b"IEND", b""))


def test_png_decompression_bombs_are_refused_without_allocating(tmp_path):
    import subprocess
    import sys
    import textwrap

    assert zlib.decompress(_zeros_deflate(3 * 2**20 + 5)) == bytes(3 * 2**20 + 5)  # the generator is right
    huge = _bomb(20000, 20000, 20000 * 20001)  # declares 20000x20000 (400 MB of pixels), all data present
    deep = _bomb(1, 1, 2**30)  # declares 1x1, its data inflate to 1 GiB
    assert len(huge) < 500_000 and len(deep) < 1_200_000
    (tmp_path / "huge.png").write_bytes(huge)
    (tmp_path / "deep.png").write_bytes(deep)
    # read in a process that may grow by 256 MiB only: the old reader inflated both in full
    root = str(Path(__file__).resolve().parents[1])
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {root!r})
        from diffopt.tasks import png
        size = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 2**20, resource.RLIM_INFINITY))
        for name in ("huge.png", "deep.png"):
            try:
                png.read_png_gray({str(tmp_path)!r} + "/" + name)
                print(name, "read")
            except png.PngError as error:
                print(name, "refused", error)
            except BaseException as error:
                print(name, "failed", type(error).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["huge.png"].startswith("refused") and "20000x20000" in lines["huge.png"], out
    assert lines["deep.png"].startswith("refused") and "inflate to more than the 2 bytes" in lines["deep.png"], out
    # a large image can still be read on purpose, and the Omniglot-sized ones as before
    wide = write_png(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(PngError, match="max_pixels=99"):
        read_png(wide, max_pixels=99)
    assert read_png(wide, max_pixels=None).shape == (10, 10)
