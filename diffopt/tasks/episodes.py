"""N-way K-shot episodes over any labelled data set.

Protocol (Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017):

* Classes are split into **class-disjoint** meta-train / meta-validation /
  meta-test sets (:meth:`FewShotDataset.split`, seeded).
* An episode (task) draws ``N`` distinct classes of one split and, from each,
  ``K`` support and ``Q`` query examples without replacement (the support and
  query of a task never share an example).
* The class → label assignment is a fresh random permutation of ``0..N−1`` in
  every task, so a label carries no information across tasks.
* Rotation augmentation (Omniglot): every class rotated by 90°, 180° and 270°
  is a **new class** (:meth:`FewShotDataset.with_rotations`). A rotated class
  remembers its source class (:attr:`FewShotDataset.groups`), and splits are
  made over source classes, so rotations always stay in the split of their
  source, whichever of ``split`` and ``with_rotations`` is applied first.
  Rotations are applied lazily at sampling time (no 4× copy of the data).

Randomness comes only from :class:`torch.Generator` objects: each data set owns
one (seeded at construction, ``seed=``), every sampling method also accepts an
explicit ``generator=``, and the global RNG is never touched.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import check_count, derive_seed

__all__ = ["Episode", "EpisodeSet", "FewShotDataset", "ROTATION_ANGLES"]

ROTATION_ANGLES = (0, 90, 180, 270)
# Above this many random keys per sampling call, example indices are drawn task by task.
_MAX_KEYS = 1 << 24


@dataclass(frozen=True)
class Episode:
    """A meta-batch of ``T`` N-way K-shot classification tasks.

    Layout is label-major (unless sampled with ``shuffle=True``): in task ``t``,
    ``support_x[t].reshape(N, K, ...)[l]`` are the ``K`` examples of label ``l``,
    and likewise for the query with ``Q``.

    Attributes:
        support_x: ``(T, N·K, *example_shape)``.
        support_y: ``(T, N·K)`` int64 labels in ``0..N−1``.
        query_x: ``(T, N·Q, *example_shape)``.
        query_y: ``(T, N·Q)`` int64 labels in ``0..N−1``.
        classes: ``(T, N)`` int64: ``classes[t, l]`` is the index, in the sampled
            data set, of the class that carries label ``l`` in task ``t``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    @property
    def num_tasks(self) -> int:
        """``T``."""
        return self.classes.shape[0]

    @property
    def ways(self) -> int:
        """``N``, classes per task."""
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        """``K``, support examples per class."""
        return self.support_y.shape[1] // max(self.ways, 1)

    @property
    def query(self) -> int:
        """``Q``, query examples per class."""
        return self.query_y.shape[1] // max(self.ways, 1)

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Episode":
        """A copy on ``device``; ``dtype`` casts the inputs only (labels stay int64)."""
        return Episode(
            support_x=self.support_x.to(device=device, dtype=dtype),
            support_y=self.support_y.to(device=device),
            query_x=self.query_x.to(device=device, dtype=dtype),
            query_y=self.query_y.to(device=device),
            classes=self.classes.to(device=device),
        )

    def __getitem__(self, index: int | slice | Tensor) -> "Episode":
        """The tasks selected by ``index`` (an int keeps a task dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Episode(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(episodes: Sequence["Episode"]) -> "Episode":
        """Concatenate episodes along the task dimension."""
        if not episodes:
            raise ValueError("episodes is empty")
        return Episode(**{f.name: torch.cat([getattr(e, f.name) for e in episodes]) for f in fields(Episode)})


@dataclass(frozen=True)
class _Storage:
    """Examples of all source classes, concatenated: class ``s`` is ``examples[offsets[s]:offsets[s]+counts[s]]``."""

    examples: Tensor
    offsets: Tensor  # (S,) int64, CPU
    counts: Tensor  # (S,) int64, CPU
    names: tuple[str, ...]


Classes = Union[Mapping[Hashable, Any], Sequence[Any]]


class FewShotDataset:
    """Labelled examples grouped by class, for N-way K-shot episode sampling.

    Args:
        classes: a mapping ``class name → examples`` or a sequence of examples
            per class; each entry is a tensor (or array) of shape
            ``(n_c, *example_shape)`` with the same ``example_shape`` for all
            classes (``n_c`` may differ). Use :meth:`from_labelled` for
            ``(inputs, labels)``.
        seed: seed of the data set's own :class:`torch.Generator` used by
            :meth:`sample` when no ``generator`` is passed.
        dtype: cast the examples (default: keep the given dtype).

    Example::

        data = FewShotDataset.from_labelled(x, y)
        train, val, test = data.split((60, 20, None), seed=0)
        train = train.with_rotations()                  # 4 classes per source class
        ep = train.sample(meta_batch=32, ways=5, shots=1, query=15)
        ep.support_x.shape                              # (32, 5, *x.shape[1:])
    """

    def __init__(self, classes: Classes, *, seed: int = 0, dtype: torch.dtype | None = None) -> None:
        if isinstance(classes, Mapping):
            items = list(classes.items())
        elif isinstance(classes, (Tensor, np.ndarray)) or not isinstance(classes, Sequence):
            raise TypeError(
                "classes must be a mapping {class name: examples tensor} or a list of per-class tensors; "
                "for one inputs tensor with a labels tensor use FewShotDataset.from_labelled(inputs, labels)"
            )
        else:
            items = list(enumerate(classes))
        if not items:
            raise ValueError("classes is empty: a few-shot data set needs at least one class")
        tensors = []
        shape = None
        for name, value in items:
            t = torch.as_tensor(value)
            if t.dim() < 1:
                raise ValueError(f"class {name!r}: examples must have shape (n, *example_shape), got a scalar")
            if t.shape[0] == 0:
                raise ValueError(f"class {name!r} has no examples; drop it or give it at least one example")
            if shape is None:
                shape = tuple(t.shape[1:])
            elif tuple(t.shape[1:]) != shape:
                raise ValueError(
                    f"class {name!r} has examples of shape {tuple(t.shape[1:])}, but earlier classes have {shape}; "
                    "all examples must share one shape (resize them first)"
                )
            tensors.append(t if dtype is None else t.to(dtype))
        counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        offsets = torch.cumsum(counts, 0) - counts
        storage = _Storage(torch.cat(tensors), offsets, counts, tuple(str(name) for name, _ in items))
        n = len(tensors)
        self._init(storage, torch.arange(n), torch.zeros(n, dtype=torch.int64), seed)

    def _init(self, storage: _Storage, source: Tensor, rotation: Tensor, seed: int) -> None:
        self._storage = storage
        self._source = source.to(torch.int64)
        self._rotation = rotation.to(torch.int64)  # quarter turns, 0..3
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def _view(cls, storage: _Storage, source: Tensor, rotation: Tensor, seed: int) -> "FewShotDataset":
        obj = cls.__new__(cls)
        obj._init(storage, source, rotation, seed)
        return obj

    @classmethod
    def from_labelled(
        cls, inputs: Any, labels: Any, *, seed: int = 0, dtype: torch.dtype | None = None
    ) -> "FewShotDataset":
        """Group ``inputs`` ``(n, *example_shape)`` by integer ``labels`` ``(n,)``; classes sorted by label.

        Class names are the label values as strings; within a class the input order is kept.
        """
        x = torch.as_tensor(inputs)
        y = torch.as_tensor(labels)
        if y.dim() != 1 or x.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} and labels of shape {tuple(y.shape)} do not match: "
                "expected inputs (n, *example_shape) and labels (n,)"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got dtype {y.dtype}")
        order = torch.sort(y, stable=True).indices
        values, counts = torch.unique_consecutive(y[order], return_counts=True)
        chunks = torch.split(x[order], counts.tolist())
        return cls({int(v): c for v, c in zip(values.tolist(), chunks)}, seed=seed, dtype=dtype)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        """Number of classes (rotations count as classes)."""
        return int(self._source.numel())

    def __len__(self) -> int:
        return self.num_classes

    @property
    def num_groups(self) -> int:
        """Number of distinct source classes (a class and its rotations count once)."""
        return int(torch.unique(self._source).numel())

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)``."""
        return tuple(self._storage.examples.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.examples.dtype

    @property
    def device(self) -> torch.device:
        return self._storage.examples.device

    @property
    def counts(self) -> Tensor:
        """``(C,)`` number of examples of each class."""
        return self._storage.counts[self._source]

    @property
    def groups(self) -> Tensor:
        """``(C,)`` source-class id of each class; a rotated class has its source's id."""
        return self._source.clone()

    @property
    def rotations(self) -> Tensor:
        """``(C,)`` rotation of each class in degrees (0, 90, 180 or 270, counter-clockwise)."""
        return self._rotation * 90

    @property
    def class_names(self) -> list[str]:
        """Names: the source class's name, with ``@rot90`` etc. for rotated classes."""
        names = self._storage.names
        return [
            names[s] + (f"@rot{90 * r}" if r else "") for s, r in zip(self._source.tolist(), self._rotation.tolist())
        ]

    def __repr__(self) -> str:
        return (
            f"FewShotDataset({self.num_classes} classes from {self.num_groups} sources, "
            f"example_shape={self.example_shape}, dtype={self.dtype}, examples per class "
            f"{int(self.counts.min()) if self.num_classes else 0}..{int(self.counts.max()) if self.num_classes else 0})"
        )

    def __getitem__(self, index: int) -> Tensor:
        """All examples of class ``index``, rotated as the class defines: ``(n_c, *example_shape)``."""
        c = check_count("index", int(index) if isinstance(index, (int, np.integer)) else index, -self.num_classes)
        if c >= self.num_classes:
            raise IndexError(f"class index {c} out of range for {self.num_classes} classes")
        s = int(self._source[c])
        start, n = int(self._storage.offsets[s]), int(self._storage.counts[s])
        x = self._storage.examples[start:start + n]
        k = int(self._rotation[c])
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    # ------------------------------------------------------------------ derived data sets
    def reseed(self, seed: int) -> None:
        """Restart the data set's generator from ``seed``."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed)

    def subset(self, indices: Sequence[int] | Tensor, *, seed: int | None = None) -> "FewShotDataset":
        """The classes at ``indices`` (sharing storage, no copy)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_classes):
            raise IndexError(f"subset indices must lie in 0..{self.num_classes - 1}")
        return self._view(self._storage, self._source[idx], self._rotation[idx], self.seed if seed is None else seed)

    def filter(self, min_examples: int) -> "FewShotDataset":
        """Only the classes with at least ``min_examples`` examples (e.g. ``shots + query``)."""
        check_count("min_examples", min_examples, 0)
        return self.subset(torch.nonzero(self.counts >= min_examples).reshape(-1))

    def with_rotations(self, angles: Sequence[int] = ROTATION_ANGLES) -> "FewShotDataset":
        """Each class rotated by each of ``angles`` (degrees, counter-clockwise) as a new class.

        The default ``(0, 90, 180, 270)`` multiplies the number of classes by 4 (the
        Omniglot protocol). Rotated classes keep their source's group, so
        :meth:`split` keeps them in their source's split. Requires examples with
        at least 2 dimensions, square in the last two for 90° and 270°.
        """
        turns = []
        for a in angles:
            if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or int(a) % 90 or not 0 <= int(a) < 360:
                raise ValueError(f"angles must be multiples of 90 in 0..270, got {a!r} in {tuple(angles)}")
            turns.append(int(a) // 90)
        if not turns or len(set(turns)) != len(turns):
            raise ValueError(f"angles={tuple(angles)} must be non-empty and without repeats, e.g. (0, 90, 180, 270)")
        shape = self.example_shape
        if len(shape) < 2:
            raise ValueError(f"rotations need examples with at least 2 dimensions (..., H, W); got shape {shape}")
        if any(t % 2 for t in turns) and shape[-1] != shape[-2]:
            raise ValueError(f"90° and 270° rotations need square examples; got {shape[-2]}x{shape[-1]}")
        turn = torch.tensor(turns, dtype=torch.int64)
        source = self._source.repeat_interleave(len(turns))
        rotation = (self._rotation[:, None] + turn[None, :]).reshape(-1) % 4
        key = source * 4 + rotation
        if torch.unique(key).numel() != key.numel():
            raise ValueError(
                "with_rotations would create the same rotated class twice: this data set already holds rotated "
                "classes; apply with_rotations once, to the unrotated data set"
            )
        return self._view(self._storage, source, rotation, self.seed)

    def split(
        self, sizes: Sequence[int | float | None], *, seed: int = 0
    ) -> tuple["FewShotDataset", ...]:
        """Class-disjoint splits (e.g. meta-train / meta-validation / meta-test).

        Args:
            sizes: number of **source** classes in each split (a class and its
                rotations count once); one entry may be ``None`` for "all the
                rest". Floats are fractions of the source classes (floored; if
                they sum to 1 the last split takes the remainder).
            seed: seed of the shuffle of the source classes before they are cut.

        Returns one :class:`FewShotDataset` per entry, sharing storage. Every
        class of a source class lands in the same split. Split ``i`` samples
        from its own generator, seeded from this data set's seed and ``i``.
        """
        sizes = list(sizes)
        if not sizes:
            raise ValueError("sizes is empty: give one size per split, e.g. (1200, None)")
        groups = torch.unique(self._source)  # sorted, so the result does not depend on class order
        total = int(groups.numel())
        counts: list[int | None] = []
        if any(isinstance(s, float) for s in sizes):
            if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1 for s in sizes):
                raise ValueError(f"sizes={tuple(sizes)}: fractions must all be numbers in [0, 1]")
            counts = [int(math.floor(float(s) * total + 1e-9)) for s in sizes]
            if abs(sum(float(s) for s in sizes) - 1.0) < 1e-9:
                counts[-1] = total - sum(counts[:-1])
        else:
            if sum(s is None for s in sizes) > 1:
                raise ValueError(f"sizes={tuple(sizes)}: at most one entry may be None (the rest)")
            for s in sizes:
                counts.append(None if s is None else check_count("sizes entry", s, 0))
            known = sum(c for c in counts if c is not None)
            counts = [total - known if c is None else c for c in counts]
        if sum(counts) > total or any(c < 0 for c in counts):  # type: ignore[operator]
            raise ValueError(
                f"sizes={tuple(sizes)} ask for {sum(c for c in counts if c is not None and c > 0)} source classes, "
                f"but this data set has only {total}; lower the sizes"
            )
        gen = torch.Generator().manual_seed(int(seed))
        order = groups[torch.randperm(total, generator=gen)]
        parts = []
        start = 0
        for i, c in enumerate(counts):
            chosen = order[start:start + c]  # type: ignore[operator]
            start += c  # type: ignore[operator]
            mask = torch.isin(self._source, chosen)
            idx = torch.nonzero(mask).reshape(-1)
            parts.append(self.subset(idx, seed=derive_seed(self.seed, i + 1)))
        return tuple(parts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FewShotDataset":
        """The same classes with the examples moved to ``device`` and/or cast to ``dtype``."""
        st = self._storage
        storage = _Storage(st.examples.to(device=device, dtype=dtype), st.offsets, st.counts, st.names)
        return self._view(storage, self._source, self._rotation, self.seed)

    # ------------------------------------------------------------------ sampling
    def _check_request(self, ways: int, shots: int, query: int) -> None:
        check_count("ways", ways, 1)
        check_count("shots", shots, 0)
        check_count("query", query, 0)
        if shots + query == 0:
            raise ValueError("shots + query must be at least 1")
        if ways > self.num_classes:
            raise ValueError(
                f"ways={ways} but this split has only {self.num_classes} classes "
                f"({self.num_groups} source classes); lower ways, add rotations, or give this split more classes"
            )
        need = shots + query
        counts = self.counts
        small = torch.nonzero(counts < need).reshape(-1)
        if small.numel():
            c = int(small[torch.argmin(counts[small])])
            raise ValueError(
                f"shots + query = {shots} + {query} = {need} examples per class are needed, but "
                f"{small.numel()} of {self.num_classes} classes have fewer (class {self.class_names[c]!r} has "
                f"{int(counts[c])}); lower shots or query, or drop small classes with "
                f"dataset.filter(min_examples={need})"
            )

    def sample(
        self,
        meta_batch: int,
        ways: int,
        shots: int,
        query: int,
        *,
        generator: Optional[torch.Generator] = None,
        shuffle: bool = False,
    ) -> Episode:
        """Draw ``meta_batch`` N-way K-shot tasks.

        Args:
            meta_batch: number of tasks ``T``.
            ways: classes per task ``N``.
            shots: support examples per class ``K``.
            query: query examples per class ``Q``.
            generator: a CPU :class:`torch.Generator` to use instead of the data set's own.
            shuffle: randomly order the examples within each task's support and
                query (default: label-major order, see :class:`Episode`).

        Raises:
            ValueError: too few classes for ``ways``, or a class with fewer than
                ``shots + query`` examples.
        """
        check_count("meta_batch", meta_batch, 1)
        self._check_request(ways, shots, query)
        gen = self.generator if generator is None else generator
        T, N, need = meta_batch, ways, shots + query
        C = self.num_classes
        st = self._storage
        # Classes: a uniformly random ordered selection; position l gets label l, so the
        # class -> label map is a fresh random permutation in every task.
        chosen = torch.rand((T, C), generator=gen, dtype=torch.float32).topk(N, dim=1).indices
        src = self._source[chosen]
        counts = st.counts[src]  # (T, N)
        maxc = int(counts.max())
        # examples: the first `need` of a random ordering of each class's examples (without replacement)
        if T * N * maxc <= _MAX_KEYS:
            keys = torch.rand((T, N, maxc), generator=gen, dtype=torch.float32)
            keys.masked_fill_(torch.arange(maxc) >= counts[..., None], 2.0)
            pick = keys.topk(need, dim=-1, largest=False).indices
        else:
            rows = []
            for t in range(T):
                keys = torch.rand((N, maxc), generator=gen, dtype=torch.float32)
                keys.masked_fill_(torch.arange(maxc) >= counts[t, :, None], 2.0)
                rows.append(keys.topk(need, dim=-1, largest=False).indices)
            pick = torch.stack(rows)
        flat = st.offsets[src][..., None] + pick  # (T, N, need)
        rot = self._rotation[chosen]
        shape = self.example_shape
        support_x = self._gather(flat[:, :, :shots], rot).reshape(T, N * shots, *shape)
        query_x = self._gather(flat[:, :, shots:], rot).reshape(T, N * query, *shape)
        dev = support_x.device
        support_y = torch.arange(N).repeat_interleave(shots).expand(T, N * shots)
        query_y = torch.arange(N).repeat_interleave(query).expand(T, N * query)
        if shuffle:
            ps = torch.rand((T, N * shots), generator=gen, dtype=torch.float32).argsort(dim=1)
            pq = torch.rand((T, N * query), generator=gen, dtype=torch.float32).argsort(dim=1)
            support_y, query_y = support_y.gather(1, ps), query_y.gather(1, pq)
            ar = torch.arange(T, device=dev)[:, None]
            support_x = support_x[ar, ps.to(dev)]
            query_x = query_x[ar, pq.to(dev)]
        return Episode(
            support_x=support_x,
            support_y=support_y.contiguous().to(dev),
            query_x=query_x,
            query_y=query_y.contiguous().to(dev),
            classes=chosen.to(dev),
        )

    def _gather(self, flat: Tensor, rot: Tensor) -> Tensor:
        """Examples at storage rows ``flat`` ``(T, N, M)``, rotated by ``rot`` ``(T, N)`` quarter turns.

        One gather: element ``j`` of a rotated example is element ``perm_k[j]`` of its
        source, with ``perm_k`` the flattened ``rot90`` of ``arange`` (so no flip copies).
        """
        T, N, M = flat.shape
        examples = self._storage.examples
        dev = examples.device
        if not bool(rot.any()):
            return examples[flat.to(dev)]
        shape = tuple(examples.shape[1:])
        size = math.prod(shape)
        base = torch.arange(size).reshape(shape)
        table = torch.stack([torch.rot90(base, k, dims=(-2, -1)).reshape(-1) for k in range(4)])
        perm = table[rot.reshape(T * N)]  # (T*N, size)
        rows = flat.reshape(T * N, M, 1)
        out = examples.reshape(examples.shape[0], size)[rows.to(dev), perm[:, None, :].to(dev)]
        return out.reshape(T, N, M, *shape)

    def episodes(
        self,
        num_tasks: int = 600,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        *,
        meta_batch: int = 32,
        seed: int = 0,
        shuffle: bool = False,
    ) -> "EpisodeSet":
        """A fixed, re-iterable set of ``num_tasks`` evaluation tasks (600 in MAML), in meta-batches.

        Task ``i`` is drawn from its own generator seeded by ``(seed, i)``, so the
        tasks do not depend on ``meta_batch`` nor on this data set's generator,
        and every iteration yields the same tasks.
        """
        return EpisodeSet(self, num_tasks, ways, shots, query, meta_batch=meta_batch, seed=seed, shuffle=shuffle)


class EpisodeSet:
    """A fixed collection of evaluation tasks, yielded as :class:`Episode` meta-batches.

    Created by :meth:`FewShotDataset.episodes`; ``len()`` is the number of
    meta-batches; iteration re-creates the same tasks every time (nothing is
    held in memory), the last meta-batch holding the remainder.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        num_tasks: int,
        ways: int,
        shots: int,
        query: int,
        *,
        meta_batch: int = 32,
        seed: int = 0,
        shuffle: bool = False,
    ) -> None:
        self.dataset = dataset
        self.num_tasks = check_count("num_tasks", num_tasks, 1)
        self.meta_batch = check_count("meta_batch", meta_batch, 1)
        dataset._check_request(ways, shots, query)
        self.ways, self.shots, self.query = ways, shots, query
        self.seed = int(seed)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return -(-self.num_tasks // self.meta_batch)

    def task(self, i: int) -> Episode:
        """Task ``i`` alone (an :class:`Episode` with ``T = 1``)."""
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task index {i} out of range for {self.num_tasks} tasks")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, i))
        return self.dataset.sample(1, self.ways, self.shots, self.query, generator=gen, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[Episode]:
        for start in range(0, self.num_tasks, self.meta_batch):
            stop = min(start + self.meta_batch, self.num_tasks)
            yield Episode.cat([self.task(i) for i in range(start, stop)])
