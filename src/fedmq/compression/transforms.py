"""Which numbers of a delta survive, and in what form: small pure stages.

A stage has the shape of optax's ``GradientTransformation``: a pair of pure functions,
``init(shapes) -> state`` and ``update(delta, state, rng) -> (delta, new_state)``, over a
whole delta (tensor name -> dense float32 array, or the form an earlier stage made).
``chain`` composes stages; ``error_feedback`` wraps one with the residual state that
carries what was not sent into the next round. Nothing here does I/O or reads a clock;
randomness comes only from the seeded generator passed in, drawn tensor after tensor in
the delta's order, so a run replays bit for bit. How each form becomes bytes is the wire
format's business (``schemas.encodings``).
"""

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fedmq.schemas.encodings import Encoded, Quantized, Sparse, encoding_of, to_dense
from fedmq.schemas.tensors import Shapes

Delta = dict[str, Encoded]


class Stage(NamedTuple):
    """``init(shapes) -> state``; ``update(delta, state, rng) -> (delta, new_state)``."""

    init: Callable[[Shapes], Any]
    update: Callable[[Mapping[str, Encoded], Any, np.random.Generator], tuple[Delta, Any]]


class EmptyState(NamedTuple):
    """The state of a stage that keeps none."""


# One tensor to its new form; ``per_tensor`` makes a stateless stage of it.
TensorFn = Callable[[Encoded, np.random.Generator], Encoded]


def per_tensor(fn: TensorFn) -> Stage:
    """A stateless stage applying ``fn`` to each tensor, in the delta's order."""

    def init(_shapes: Shapes) -> EmptyState:
        return EmptyState()

    def update(
        delta: Mapping[str, Encoded], state: Any, rng: np.random.Generator
    ) -> tuple[Delta, Any]:
        return {name: fn(tensor, rng) for name, tensor in delta.items()}, state

    return Stage(init, update)


def identity() -> Stage:
    return per_tensor(lambda x, _rng: x)


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction {fraction} is not in (0, 1]")


def _dense_flat(x: Encoded) -> np.ndarray:
    # isinstance on purpose: choosing positions is defined on dense float32 only
    if not isinstance(x, np.ndarray):
        raise TypeError("top-k works on a dense tensor")
    return x.reshape(-1)


def _largest(flat: np.ndarray, fraction: float) -> np.ndarray:
    """The positions, ascending, of the ``ceil(fraction * size)`` largest magnitudes."""
    k = min(flat.size, max(1, math.ceil(fraction * flat.size)))
    return np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])


def top_k(fraction: float) -> Stage:
    """Keep the ``ceil(fraction * size)`` largest magnitudes of each dense tensor."""
    _check_fraction(fraction)

    def apply(x: Encoded, _rng: np.random.Generator) -> Encoded:
        flat = _dense_flat(x)
        chosen = _largest(flat, fraction)
        return Sparse(shape=x.shape, indices=chosen.astype(np.int64), values=flat[chosen])

    return per_tensor(apply)


def top_k_pooled(fraction: float) -> Stage:
    """Keep the ``ceil(fraction * N)`` largest magnitudes of the whole delta, N its element
    count over all tensors, the tensors laid end to end in the delta's order; each tensor
    becomes sparse with the positions that fell in it (possibly none). The same budget
    as ``top_k`` goes where the delta is large: on digits-mlp-large a round's delta is
    several times larger per element in the output layer and biases than in the hidden
    weights, which per-tensor top-k gives the same fraction."""
    _check_fraction(fraction)

    def init(_shapes: Shapes) -> EmptyState:
        return EmptyState()

    def update(
        delta: Mapping[str, Encoded], state: Any, rng: np.random.Generator
    ) -> tuple[Delta, Any]:
        flats = {name: _dense_flat(x) for name, x in delta.items()}
        pooled = np.concatenate(list(flats.values())) if flats else np.zeros(0, np.float32)
        chosen = _largest(pooled, fraction)
        out: Delta = {}
        start = 0
        for name, flat in flats.items():
            mine = chosen[
                np.searchsorted(chosen, start) : np.searchsorted(chosen, start + flat.size)
            ]
            at = (mine - start).astype(np.int64)
            out[name] = Sparse(shape=np.shape(delta[name]), indices=at, values=flat[at])
            start += flat.size
        return out, state

    return Stage(init, update)


ValueCoder = Callable[[np.ndarray, np.random.Generator], "np.ndarray | Quantized"]


def _on_values(fn: ValueCoder) -> Stage:
    """A stage applying ``fn`` to the dense values each tensor holds (a sparse tensor's
    kept values); TypeError if they are coded already."""
    return per_tensor(lambda x, rng: encoding_of(x).map_values(x, lambda values: fn(values, rng)))


def to_float16() -> Stage:
    # clipped to float16's range: an Inf sent would be rejected, an Inf kept in the
    # error-feedback residual would poison every later round
    largest = float(np.finfo(np.float16).max)
    return _on_values(
        lambda values, _rng: np.asarray(np.clip(values, -largest, largest), dtype=np.float16)
    )  # np.asarray: a 0-d tensor stays an array, not a numpy scalar


def quantize_values(
    values: np.ndarray, bits: int, chunk: int, rng: np.random.Generator
) -> Quantized:
    """Uniform symmetric quantization with stochastic (unbiased) rounding.

    Per chunk, scale = max|x| / (2**(bits-1) - 1); code = floor(x / scale + u) with
    u ~ U[0, 1), so E[code * scale] = x and |x - code * scale| < scale.
    """
    limit = (1 << (bits - 1)) - 1
    flat = values.reshape(-1).astype(np.float32)
    n = flat.size
    chunks = -(-n // chunk)
    padded = np.zeros(chunks * chunk, dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(chunks, chunk)
    scales = (np.abs(blocks).max(axis=1) / limit).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = blocks / safe[:, None]
    noise = rng.random(scaled.shape, dtype=np.float32)
    codes = np.clip(np.floor(scaled + noise), -limit, limit).astype(np.int8).reshape(-1)[:n]
    return Quantized(shape=values.shape, bits=bits, chunk=chunk, scales=scales, codes=codes)


def sign_values(values: np.ndarray, chunk: int) -> Quantized:
    """Scaled sign, one bit per value: per chunk, scale = mean |x| (float32) and code =
    +1 for x >= 0, -1 otherwise. Biased per element, deterministic; error feedback
    carries what it gets wrong into the next round."""
    flat = values.reshape(-1).astype(np.float32)
    n = flat.size
    chunks = -(-n // chunk)
    padded = np.zeros(chunks * chunk, dtype=np.float32)
    padded[:n] = flat
    counts = np.minimum(chunk, n - chunk * np.arange(chunks)).astype(np.float32)
    scales = (np.abs(padded.reshape(chunks, chunk)).sum(axis=1) / counts).astype(np.float32)
    codes = np.where(flat >= 0, 1, -1).astype(np.int8)
    return Quantized(shape=values.shape, bits=1, chunk=chunk, scales=scales, codes=codes)


def scaled_sign(chunk: int = 256) -> Stage:
    return _on_values(lambda values, _rng: sign_values(values, chunk))


def quantize(bits: int, chunk: int = 256) -> Stage:
    if bits not in (8, 4):
        raise ValueError("quantization has 8 or 4 bits")
    return _on_values(lambda values, rng: quantize_values(values, bits, chunk, rng))


def chain(*stages: Stage) -> Stage:
    """The stages one after the other; the state is the tuple of theirs."""

    def init(shapes: Shapes) -> tuple[Any, ...]:
        return tuple(stage.init(shapes) for stage in stages)

    def update(
        delta: Mapping[str, Encoded], state: tuple[Any, ...], rng: np.random.Generator
    ) -> tuple[Delta, tuple[Any, ...]]:
        out: Delta = dict(delta)
        new_state = []
        for stage, inner in zip(stages, state, strict=True):
            out, inner = stage.update(out, inner, rng)
            new_state.append(inner)
        return out, tuple(new_state)

    return Stage(init, update)


def as_float32(delta: Mapping[str, np.ndarray]) -> Delta:
    """What a pipeline compresses: each tensor as a float32 array (0-d stays an array)."""
    return {name: np.asarray(tensor).astype(np.float32) for name, tensor in delta.items()}


class ErrorFeedbackState(NamedTuple):
    """What earlier rounds computed but did not send, per tensor (float32), and the
    wrapped stage's state (None: its ``init``, as after a restart: the node keeps only
    the residual on disk, node/residual.py, and today's stages keep no state)."""

    residual: dict[str, np.ndarray]
    inner: Any = None


def error_feedback_init(layout: Mapping[str, tuple[int, ...]]) -> ErrorFeedbackState:
    return ErrorFeedbackState({name: np.zeros(shape, np.float32) for name, shape in layout.items()})


def error_feedback(inner: Stage) -> Stage:
    """``inner`` applied to delta + residual; the new residual is what it did not send:
    sent + new residual == delta + old residual (up to rounding)."""

    def init(shapes: Shapes) -> ErrorFeedbackState:
        return ErrorFeedbackState(error_feedback_init(shapes).residual, inner.init(shapes))

    def update(
        delta: Mapping[str, Encoded], state: ErrorFeedbackState, rng: np.random.Generator
    ) -> tuple[Delta, ErrorFeedbackState]:
        # np.asarray: numpy turns arithmetic on 0-d arrays into scalars; keep arrays
        corrected = {
            name: np.asarray(tensor + state.residual[name]) for name, tensor in delta.items()
        }
        inner_state = state.inner
        if inner_state is None:
            inner_state = inner.init({name: t.shape for name, t in corrected.items()})
        sent, inner_state = inner.update(as_float32(corrected), inner_state, rng)
        residual = {name: np.asarray(corrected[name] - to_dense(sent[name])) for name in sent}
        return sent, ErrorFeedbackState(residual, inner_state)

    return Stage(init, update)


def compress_tree(
    stage: Stage,
    delta: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    state: ErrorFeedbackState | None = None,
) -> tuple[Delta, ErrorFeedbackState | None]:
    """``stage`` over a delta; with ``state``, wrapped in error feedback from it."""
    if state is None:
        shapes = {name: np.shape(tensor) for name, tensor in delta.items()}
        sent, _ = stage.update(as_float32(delta), stage.init(shapes), rng)
        return sent, None
    sent, new_state = error_feedback(stage).update(delta, state, rng)
    return sent, new_state
