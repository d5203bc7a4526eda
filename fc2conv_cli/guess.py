"""Guess an FC weight's flatten order from the weights alone.

Trained FC weights are smooth over the spatial positions they read. Reshaped with the
true flatten order, neighbouring positions of one filter and one channel are more alike
than chance, while neighbouring *channels* are no more alike than any two channels
(channel numbering is arbitrary). Under a wrong order the roles mix: the "spatial"
neighbours are really different channels (no better than chance) and the "channel"
neighbours are really adjacent positions (better than chance). :func:`guess_layout`
measures both for every permutation of ``c`` and the spatial axes, against the same
statistics after a random permutation of the inputs (the no-structure null), and
returns the best order with a confidence, or ``best=None`` when it cannot tell (as for
untrained weights).

Orders that differ only by swapping spatial axes of equal size (``hwc``/``whc`` on a
square map) transpose every filter; no statistic of the weights can tell them apart, so
they are scored as one class and reported as a pair (``best`` and ``twin``).

Pure numpy (never torch), deterministic, bounded memory: at most about ``MAX_ELEMENTS``
weights are read, by taking evenly spaced filters (rows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from fc2conv_cli.layout import SPATIAL_AXES, Layout, WeightFormat

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "LayoutGuess",
    "MapCandidate",
    "MapGuess",
    "candidate_layouts",
    "guess_layout",
    "guess_map",
]

# Below this confidence the guess is withheld (best=None, "cannot tell"). Random weights
# score ~0 (structure within noise); the small nets trained in tests/test_guess.py score 1.
CONFIDENCE_THRESHOLD = 0.6
# Bounded memory and time: read at most about this many weights (rows x in_features), as
# float32: 4 MiB per working copy, ~0.3 s for VGG16's (4096, 25088) on one core.
MAX_ELEMENTS = 1 << 20
# ...but never fewer filters than this (when there are that many), so that the bootstrap
# over filters has something to resample.
MIN_ROWS = 16
# A wrong order reads adjacent positions as adjacent channels; its excess channel-
# neighbour correlation counts against it with this weight (the spatial evidence is the
# primary one, so this is less than 1).
CHANNEL_PENALTY = 0.5
# The best order's excess smoothness, in standard deviations of the null (the same score
# on randomly permuted inputs), must reach Z_NONE before it counts at all and Z_FULL to
# count fully: with 2-24 candidates the largest of them reaches 3 sigma by chance only
# rarely, and 6 sigma is unambiguous structure.
Z_NONE = 3.0
Z_FULL = 6.0
# Random input permutations for the null; their spread sets the noise level sigma. More
# draws estimate sigma better; the budget keeps big weights fast (VGG16 gets the minimum).
NULL_DRAWS = (6, 32)
NULL_BUDGET = 1 << 23  # weights scored for the null, in all draws together
# Draws for the null of the best candidate's score (:func:`guess_map`): every class is
# scored per draw, so the budget is shared by the classes, within these bounds.
MAX_NULL_DRAWS = (12, 48)
# guess_map scores many candidates: it reads half as many weights as guess_layout.
MAP_MAX_ELEMENTS = MAX_ELEMENTS // 2
# The best candidate's excess over the best of chance, in standard deviations of that
# maximum, must reach MAP_Z_NONE to count at all and MAP_Z_FULL to count fully. Stricter
# than Z_NONE / Z_FULL: on real weights with their inputs shuffled the maximum's tail is
# heavier than a normal one (3.6 sigma in 24 shuffles of facenet-pytorch's MTCNN FCs),
# while trained maps score 10 sigma and more (54 and 68 on those FCs unshuffled).
MAP_Z_NONE = 4.0
MAP_Z_FULL = 8.0
# Below this many sigma of its own null the best candidate cannot reach MAP_Z_NONE over
# the best of chance either: its null of the maximum is not computed (random weights).
_WORTH_CALIBRATING = 2.0
# Bootstrap resamples of the filters; the share in which the best class stays best is
# its support (a filter-to-filter consistency, the calibrated part of the confidence).
BOOTSTRAP = 256
# Seed of the null permutations and bootstrap: same weights, same guess.
_SEED = 0x5EED


@dataclass(frozen=True)
class LayoutGuess:
    """The outcome of :func:`guess_layout`.

    - ``best``: the guessed order, or ``None`` when ``confidence < CONFIDENCE_THRESHOLD``.
    - ``confidence``: in [0, 1]; bootstrap support of ``best`` over filters, scaled down
      to 0 when the structure is within noise of random weights.
    - ``scores``: every candidate order -> its score (higher = more plausible): excess
      neighbour correlation over the null, less the channel penalty. Orders in one
      class (twins, or orders that give the identical conv weight) have equal scores.
    - ``twin``: the order that swaps ``best``'s equal-sized spatial axes (``hwc`` ->
      ``whc``, ``chw`` -> ``cwh``) and that no statistic can tell from it; ``None``
      when there is none (non-square map) or ``best`` is ``None``.
    - ``equivalent``: every order indistinguishable from ``best`` (``best`` first);
      on a cubic 3-D map more than two. Empty when ``best`` is ``None``.
    - ``reason``: one line for a user.
    - ``z``: the leading class's score in standard deviations of the null (scores of
      randomly permuted inputs): how far its spatial structure is above chance.
    """

    best: Layout | None
    confidence: float
    scores: dict[str, float]
    twin: str | None
    reason: str
    equivalent: tuple[str, ...] = ()
    z: float = 0.0


def candidate_layouts(spatial_ndim: int) -> list[Layout]:
    """Every flatten order of ``c`` and the spatial axes, canonical (``chw``) first."""
    axes = "c" + SPATIAL_AXES[spatial_ndim]
    return [Layout("".join(p)) for p in itertools.permutations(axes)]


def _classes(layouts: list[Layout], channels: int, kernel: tuple[int, ...]) -> list[list[str]]:
    """Group orders whose conv weights are equal up to transposing equal-sized axes."""
    flat = np.arange(channels * math.prod(kernel)).reshape(1, -1)
    spatial = range(1, len(kernel) + 1)
    swaps = [
        (0, *p)
        for p in itertools.permutations(spatial)
        if all(kernel[a - 1] == kernel[b - 1] for a, b in zip(spatial, p, strict=True))
    ]
    keys: dict[bytes, list[str]] = {}
    for layout in layouts:
        index = layout.fc_rows_to_conv(flat, channels, kernel)[0]
        key = min(np.ascontiguousarray(index.transpose(s)).tobytes() for s in swaps)
        keys.setdefault(key, []).append(layout.axes)
    return list(keys.values())


def _neighbour_sums(r: np.ndarray, axis: int) -> np.ndarray:
    """Per filter: sums of a*b, a*a and b*b over neighbour pairs (a, b) along ``axis``.

    Returns (3, O) float64. Two temporaries the size of ``r``.
    """
    n = r.shape[axis]
    lo = [slice(None)] * r.ndim
    hi = [slice(None)] * r.ndim
    lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
    rest = tuple(range(1, r.ndim))
    cross = (r[tuple(lo)] * r[tuple(hi)]).sum(axis=rest, dtype=np.float64)
    square = r * r
    total = square.sum(axis=rest, dtype=np.float64)
    first = np.take(square, 0, axis=axis).sum(axis=rest[:-1], dtype=np.float64)
    last = np.take(square, n - 1, axis=axis).sum(axis=rest[:-1], dtype=np.float64)
    return np.stack([cross, total - last, total - first])


def _evidence(x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per-filter neighbour sums of ``x`` (O, C, *kernel) under one order.

    Spatial: each filter-channel's pattern minus its mean over positions, neighbours
    along each spatial axis of size >= 2. Channel: each filter-position's values minus
    their mean over channels, neighbours along the channel axis (None when C == 1).
    """
    spatial = tuple(range(2, x.ndim))
    r = x - x.mean(axis=spatial, keepdims=True)
    sums = [_neighbour_sums(r, a) for a in spatial if x.shape[a] > 1]
    chan = None
    if x.shape[1] > 1:
        chan = _neighbour_sums(x - x.mean(axis=1, keepdims=True), 1)
    return sums, chan


def _corr(sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pooled correlation from per-filter sums (3, O) under filter weights (B, O)."""
    num, aa, bb = weights @ sums[0], weights @ sums[1], weights @ sums[2]
    den = np.sqrt(aa * bb)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _stats(
    evidence: tuple[list[np.ndarray], np.ndarray | None], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(spatial smoothness, channel-neighbour correlation), each (B,), for filter weights."""
    sums, chan = evidence
    smooth = np.mean([_corr(s, weights) for s in sums], axis=0)
    channel = _corr(chan, weights) if chan is not None else np.zeros(len(weights))
    return smooth, channel


def _rows(
    weight: np.ndarray,
    weight_format: WeightFormat,
    in_features: int,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """Evenly spaced filters of ``weight`` as float32 (O', in_features), each standardised.

    Filters that are constant or hold a NaN or an infinity carry no evidence and are left
    out. Standardising runs in float64: a float32 filter near the largest float32 would
    overflow while its mean is subtracted.
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"an FC weight must be 2-D, got shape {w.shape}")
    if weight_format is WeightFormat.IN_OUT:
        w = w.T
    if w.shape[1] != in_features:
        raise ValueError(
            f"weight has {w.shape[1]} input features ({weight_format.value}), but the map "
            f"C x kernel has {in_features}"
        )
    n_out = w.shape[0]
    keep = min(n_out, max(MIN_ROWS, max_elements // max(in_features, 1)))
    index = np.unique(np.linspace(0, n_out - 1, keep).round().astype(np.int64))
    rows = np.asarray(w[index], dtype=np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)]
    rows -= rows.mean(axis=1, keepdims=True)
    scale = rows.std(axis=1)
    return (rows[scale > 0] / scale[scale > 0, None]).astype(np.float32)


def guess_layout(
    weight: np.ndarray,
    in_channels: int,
    kernel: tuple[int, ...],
    weight_format: WeightFormat = WeightFormat.OUT_IN,
) -> LayoutGuess:
    """Guess the flatten order of an FC weight that reads an ``(in_channels, *kernel)`` map.

    ``weight`` is ``(out, in)`` for ``WeightFormat.OUT_IN`` or ``(in, out)`` for
    ``IN_OUT``, any float dtype numpy can cast to float64 (memory-mapped is fine: only the
    sampled rows are read). ``kernel`` has 1 to 3 spatial sizes. Raises ``ValueError``
    when the shapes disagree. Filters holding NaN or infinity are left out of the
    evidence (with fewer than two usable filters it cannot tell). Deterministic. The
    result never claims one of two h/w twins over the other: see :class:`LayoutGuess`.
    """
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) not in SPATIAL_AXES or in_channels < 1 or min(kernel) < 1:
        raise ValueError(f"need in_channels >= 1 and 1-3 positive kernel sizes, got {kernel}")
    in_features = in_channels * math.prod(kernel)
    rows = _rows(weight, weight_format, in_features)
    layouts = candidate_layouts(len(kernel))
    classes = _classes(layouts, in_channels, kernel)
    if len(classes) == 1:
        return LayoutGuess(
            best=layouts[0],
            confidence=1.0,
            scores={layout.axes: 0.0 for layout in layouts},
            twin=None,
            reason=f"every flatten order gives the same conv weight for {in_channels} x "
            + " x ".join(map(str, kernel)),
            equivalent=tuple(classes[0]),
        )
    n_rows = len(rows)
    if n_rows < 2:
        return _cannot_tell(layouts, "the weight has fewer than two finite, non-constant filters")

    # The null: the same statistics after a random permutation of the inputs.
    rng = np.random.default_rng(_SEED)
    draws = min(max(NULL_DRAWS[0], NULL_BUDGET // rows.size), NULL_DRAWS[1])
    ones = np.ones((1, n_rows))
    null = np.array(
        [
            _stats(
                _evidence(
                    rows[:, rng.permutation(in_features)].reshape(n_rows, in_channels, *kernel)
                ),
                ones,
            )
            for _ in range(draws)
        ]
    )[..., 0]  # (draws, 2)
    null_mean = null.mean(axis=0)

    # Every class, on the full sample and on bootstrap resamples of the filters.
    resample = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=BOOTSTRAP)
    weights = np.vstack([ones, resample.astype(np.float64)])
    class_scores = []
    for members in classes:
        x = Layout(members[0]).fc_rows_to_conv(rows, in_channels, kernel)
        smooth, channel = _stats(_evidence(np.ascontiguousarray(x)), weights)
        class_scores.append(_combine(smooth, channel, null_mean))
    table = np.array(class_scores)  # (classes, 1 + BOOTSTRAP)
    null_scores = _combine(null[:, 0], null[:, 1], null_mean)
    sigma = max(float(null_scores.std(ddof=1)), 1e-12)

    order = np.argsort(-table[:, 0], kind="stable")
    top = int(order[0])
    support = float(np.mean(table[:, 1:].argmax(axis=0) == top))
    z = float(table[top, 0]) / sigma
    ramp = min(max((z - Z_NONE) / (Z_FULL - Z_NONE), 0.0), 1.0)
    confidence = round(support * ramp, 4)
    scores = {
        axes: round(float(table[k, 0]), 6) for k, members in enumerate(classes) for axes in members
    }
    scores = {layout.axes: scores[layout.axes] for layout in layouts}
    if confidence < CONFIDENCE_THRESHOLD:
        runner = classes[int(order[1])][0]
        if z < Z_NONE:
            why = f"no spatial structure beyond chance ({z:.1f} sigma), as for untrained weights"
        elif ramp < 1:
            why = f"weak spatial structure ({z:.1f} sigma; {classes[top][0]} leads)"
        else:
            why = f"{classes[top][0]} leads {runner} in only {support:.0%} of filter resamples"
        return _cannot_tell(layouts, why, confidence, scores, z)
    members = classes[top]
    best = Layout(members[0])
    twin = next((m for m in members[1:] if _is_twin(best.axes, m, in_channels, kernel)), None)
    if twin is None:
        reason = f"{best}, confidence {confidence:.2f}"
    else:
        others = " or ".join(m for m in members[1:])
        label = "h/w twin" if len(kernel) == 2 else "axis-swapped twin"
        reason = (
            f"{best} (or its {label} {others}: a square map cannot tell them apart), "
            f"confidence {confidence:.2f}"
        )
    return LayoutGuess(best, confidence, scores, twin, reason, tuple(members), round(z, 2))


def _combine(smooth: np.ndarray, channel: np.ndarray, null_mean: np.ndarray) -> np.ndarray:
    """Score: excess spatial smoothness minus a penalty for a smooth channel axis."""
    return (smooth - null_mean[0]) - CHANNEL_PENALTY * np.maximum(channel - null_mean[1], 0.0)


def _is_twin(a: str, b: str, channels: int, kernel: tuple[int, ...]) -> bool:
    """True when ``b``'s conv weight is not identical to ``a``'s (only a transpose of it)."""
    flat = np.arange(channels * math.prod(kernel)).reshape(1, -1)
    return not np.array_equal(
        Layout(a).fc_rows_to_conv(flat, channels, kernel),
        Layout(b).fc_rows_to_conv(flat, channels, kernel),
    )


def _cannot_tell(
    layouts: list[Layout],
    why: str,
    confidence: float = 0.0,
    scores: dict[str, float] | None = None,
    z: float = 0.0,
) -> LayoutGuess:
    return LayoutGuess(
        best=None,
        confidence=confidence,
        scores=scores if scores is not None else {layout.axes: 0.0 for layout in layouts},
        twin=None,
        reason=f"cannot tell the flatten order (confidence {confidence:.2f} < "
        f"{CONFIDENCE_THRESHOLD}): {why}",
        z=round(z, 2),
    )


# -- Shape and order together ------------------------------------------------------------


@dataclass(frozen=True)
class MapCandidate:
    """One (map shape, flatten order) class scored by :func:`guess_map`.

    ``members`` are every (shape, layout) pair giving the same conv weight up to a
    transpose of the spatial axes (``3x12 chw`` and ``12x3 cwh``): no statistic of the
    weights tells them apart. ``shape`` / ``layout`` are the first member (the caller's
    preference order). ``support`` is the share of filter resamples in which this class
    scores highest; ``confidence`` is support scaled by how far ``z`` is above chance.
    """

    shape: tuple[int, ...]
    layout: str
    score: float
    z: float
    support: float
    confidence: float
    members: tuple[tuple[tuple[int, ...], str], ...]


@dataclass(frozen=True)
class MapGuess:
    """The outcome of :func:`guess_map`: ``best`` (None: cannot tell) and every candidate,
    highest score first, with a one-line ``reason``."""

    best: MapCandidate | None
    candidates: tuple[MapCandidate, ...]
    reason: str


def guess_map(
    weight: np.ndarray,
    in_channels: int,
    shapes: list[tuple[int, ...]],
    weight_format: WeightFormat = WeightFormat.OUT_IN,
    layouts: list[str] | None = None,
) -> MapGuess:
    """Score every (shape, flatten order) of an FC weight reading ``in_channels`` x shape.

    ``shapes`` are the candidate map shapes (same rank, same product), in preference
    order; ``layouts`` restricts the orders (default: all, in preference order). Scores
    are comparable across shapes (excess neighbour correlation over each shape's own
    null). The best class must lead in at least ``CONFIDENCE_THRESHOLD`` of the filter
    resamples, far enough above chance, or ``best`` is None. Deterministic.
    """
    if not shapes or len({math.prod(s) for s in shapes}) != 1 or len({len(s) for s in shapes}) != 1:
        raise ValueError(f"candidate shapes must share rank and size, got {shapes}")
    ndim = len(shapes[0])
    orders = layouts or [layout.axes for layout in candidate_layouts(ndim)]
    in_features = in_channels * math.prod(shapes[0])
    rows = _rows(weight, weight_format, in_features, MAP_MAX_ELEMENTS)
    classes = _map_classes(shapes, orders, in_channels)
    if len(classes) == 1:
        only = MapCandidate(*classes[0][0], 0.0, 0.0, 1.0, 1.0, tuple(classes[0]))
        return MapGuess(only, (only,), "every candidate gives the same conv weight")
    if len(rows) < 2:
        return _no_map(classes, "the weight has fewer than two finite, non-constant filters")
    rng = np.random.default_rng(_SEED)
    ones = np.ones((1, len(rows)))
    resample = rng.multinomial(len(rows), np.full(len(rows), 1.0 / len(rows)), size=BOOTSTRAP)
    weights = np.vstack([ones, resample.astype(np.float64)])
    nulls = {shape: _null(rows, in_channels, shape, rng) for shape in shapes}
    table, sigmas = [], []
    for members in classes:
        shape, axes = _row_major(members)
        null_mean, sigma = nulls[shape]
        x = Layout(axes).fc_rows_to_conv(rows, in_channels, shape)
        smooth, channel = _map_stats(np.ascontiguousarray(x), weights)
        table.append(_combine(smooth, channel, null_mean))
        sigmas.append(sigma)
    scores = np.array(table)
    leads = scores[:, 1:].argmax(axis=0)
    candidates = []
    for k, members in enumerate(classes):
        z = float(scores[k, 0]) / sigmas[k]
        support = float(np.mean(leads == k))
        ramp = min(max((z - Z_NONE) / (Z_FULL - Z_NONE), 0.0), 1.0)
        candidates.append(
            MapCandidate(
                *members[0],
                round(float(scores[k, 0]), 6),
                round(z, 2),
                round(support, 4),
                round(support * ramp, 4),
                tuple(members),
            )
        )
    candidates.sort(key=lambda c: -c.score)
    top = candidates[0]
    if top.z >= _WORTH_CALIBRATING:
        top = candidates[0] = _calibrated(top, rows, in_channels, classes, nulls, rng)
    else:  # within chance of one candidate's null, and so of the best one's: no confidence
        top = candidates[0] = MapCandidate(
            top.shape, top.layout, top.score, top.z, top.support, 0.0, top.members
        )
    if top.confidence >= CONFIDENCE_THRESHOLD:
        return MapGuess(top, tuple(candidates), f"{_label(top)}, confidence {top.confidence:.2f}")
    if top.z < MAP_Z_NONE:
        why = f"no spatial structure beyond chance ({top.z:.1f} sigma), as for untrained weights"
    elif top.z < MAP_Z_FULL:
        why = f"weak spatial structure ({top.z:.1f} sigma; {_label(top)} leads)"
    else:
        why = f"{_label(top)} leads {_label(candidates[1])} in only {top.support:.0%} of resamples"
    reason = f"cannot tell (confidence {top.confidence:.2f} < {CONFIDENCE_THRESHOLD}): {why}"
    return MapGuess(None, tuple(candidates), reason)


def _calibrated(
    top: MapCandidate,
    rows: np.ndarray,
    channels: int,
    classes: list,
    nulls: dict,
    rng: np.random.Generator,
) -> MapCandidate:
    """``top`` with ``z`` measured against the *best* candidate's score on randomly
    permuted inputs (every class scored per draw, the maximum kept).

    Real trained filters have a few strongly correlated input pairs; a random order
    that happens to put some of them side by side scores far above a normal tail, and
    the best of many candidates is the one that did. Against the null of that maximum,
    a real map stands out and such luck does not.
    """
    views = [(_row_major(members), nulls[_row_major(members)[0]][0]) for members in classes]
    ones = np.ones((1, len(rows)))
    draws = min(max(MAX_NULL_DRAWS[0], NULL_BUDGET // (rows.size * len(views))), MAX_NULL_DRAWS[1])
    best = []
    for _ in range(draws):
        permuted = rows[:, rng.permutation(rows.shape[1])]
        scores = []
        for (shape, axes), null_mean in views:
            x = np.ascontiguousarray(Layout(axes).fc_rows_to_conv(permuted, channels, shape))
            scores.append(float(_combine(*_map_stats(x, ones), null_mean)[0]))
        best.append(max(scores))
    spread = max(float(np.std(best, ddof=1)), 1e-12)
    z = (top.score - float(np.mean(best))) / spread
    ramp = min(max((z - MAP_Z_NONE) / (MAP_Z_FULL - MAP_Z_NONE), 0.0), 1.0)
    return MapCandidate(
        top.shape, top.layout, top.score, round(z, 2), top.support,
        round(top.support * ramp, 4), top.members,
    )  # fmt: skip


def _row_major(members: list[tuple[tuple[int, ...], str]]) -> tuple[tuple[int, ...], str]:
    """The member whose spatial axes flatten slowest first (``chw``, ``hwc``): its row
    wraps are neighbours in the flat order, as the shape term assumes."""
    for shape, axes in members:
        spatial = [a for a in axes if a != "c"]
        if spatial == sorted(spatial, key="dhwl".index):
            return shape, axes
    return members[0]


def _label(candidate: MapCandidate) -> str:
    return f"{'x'.join(map(str, candidate.shape))} {candidate.layout}"


def _null(
    rows: np.ndarray, channels: int, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """(mean of (smoothness, channel correlation), sigma of the score) on permuted inputs."""
    draws = min(max(NULL_DRAWS[0], NULL_BUDGET // rows.size), NULL_DRAWS[1])
    ones = np.ones((1, len(rows)))
    null = np.array(
        [
            _map_stats(
                rows[:, rng.permutation(rows.shape[1])].reshape(len(rows), channels, *shape), ones
            )
            for _ in range(draws)
        ]
    )[..., 0]
    null_mean = null.mean(axis=0)
    sigma = max(float(_combine(null[:, 0], null[:, 1], null_mean).std(ddof=1)), 1e-12)
    return null_mean, sigma


def _map_classes(
    shapes: list[tuple[int, ...]], orders: list[str], channels: int
) -> list[list[tuple[tuple[int, ...], str]]]:
    """Group (shape, layout) pairs whose conv weights are equal up to a spatial transpose."""
    keys: dict[tuple, list[tuple[tuple[int, ...], str]]] = {}
    for shape in shapes:
        flat = np.arange(channels * math.prod(shape)).reshape(1, -1)
        for axes in orders:
            index = Layout(axes).fc_rows_to_conv(flat, channels, shape)[0]
            key = min(
                (
                    index.transpose(0, *p).shape,
                    np.ascontiguousarray(index.transpose(0, *p)).tobytes(),
                )
                for p in itertools.permutations(range(1, len(shape) + 1))
            )
            keys.setdefault(key, []).append((shape, axes))
    return list(keys.values())


def _no_map(classes: list[list[tuple[tuple[int, ...], str]]], why: str) -> MapGuess:
    candidates = tuple(
        MapCandidate(*members[0], 0.0, 0.0, 0.0, 0.0, tuple(members)) for members in classes
    )
    return MapGuess(
        None, candidates, f"cannot tell (confidence 0.00 < {CONFIDENCE_THRESHOLD}): {why}"
    )


def _map_stats(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(smoothness with shape evidence, channel-neighbour correlation), each (B,).

    ``x`` is ``(O, C, *shape)`` in an order whose last spatial axis is the fastest. The
    mean neighbour correlation alone favours long thin views (a ``3x12`` map read as
    ``1x36`` keeps 33 of its 35 neighbour pairs), so a view with two axes of size >= 2
    scores ``along + across - wraps``: its rows' neighbour correlation, plus its columns',
    less that of its row wraps (the last position of one row with the first of the next).
    Under the true width the rows hold only true neighbours (a thin view's "row" also
    holds the wraps), the columns are neighbours and the wraps are not; under a wrong
    width some claimed neighbours are far apart and some wraps are neighbours. A view
    with one such axis scores its neighbour correlation.
    """
    smooth, channel = _stats(_evidence(x), weights)
    if x.ndim < 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        return smooth, channel
    r = x - x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        rest = tuple(range(1, a.ndim))
        sums = np.stack(
            [
                (a * b).sum(axis=rest, dtype=np.float64),
                (a * a).sum(axis=rest, dtype=np.float64),
                (b * b).sum(axis=rest, dtype=np.float64),
            ]
        )
        return _corr(sums, weights)

    along = corr(r[..., :, :-1], r[..., :, 1:])
    across = corr(r[..., :-1, :], r[..., 1:, :])
    wraps = corr(r[..., :-1, -1], r[..., 1:, 0])
    return along + across - wraps, channel
