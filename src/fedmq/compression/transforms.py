"""Which numbers of a delta survive, and in what form: small pure transforms.

A transform maps one tensor (dense float32, or the output of an earlier transform) and a
seeded generator to a new form; ``chain`` composes them. ``error_feedback`` wraps a
transform with the residual state that carries what was not sent into the next round.
Nothing here does I/O or reads a clock; randomness comes only from the generator passed in.
"""

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from fedmq.schemas.encodings import Encoded, Quantized, Sparse, to_dense

Transform = Callable[[Encoded, np.random.Generator], Encoded]


def identity() -> Transform:
    return lambda x, _rng: x


def top_k(fraction: float) -> Transform:
    """Keep the ``ceil(fraction * size)`` largest magnitudes of a dense tensor."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction {fraction} is not in (0, 1]")

    def apply(x: Encoded, _rng: np.random.Generator) -> Encoded:
        if not isinstance(x, np.ndarray):
            raise TypeError("top-k works on a dense tensor")
        flat = x.reshape(-1)
        k = min(flat.size, max(1, math.ceil(fraction * flat.size)))
        chosen = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        return Sparse(shape=x.shape, indices=chosen.astype(np.int64), values=flat[chosen])

    return apply


ValueCoder = Callable[[np.ndarray, np.random.Generator], "np.ndarray | Quantized"]


def _on_values(fn: ValueCoder) -> Transform:
    """Apply ``fn`` to a dense tensor, or to the values of a sparse one."""

    def apply(x: Encoded, rng: np.random.Generator) -> Encoded:
        if isinstance(x, Sparse):
            if not isinstance(x.values, np.ndarray):
                raise TypeError("values are already coded")
            return Sparse(shape=x.shape, indices=x.indices, values=fn(x.values, rng))
        if isinstance(x, np.ndarray):
            return fn(x, rng)
        raise TypeError("values are already coded")

    return apply


def to_float16() -> Transform:
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


def scaled_sign(chunk: int = 256) -> Transform:
    return _on_values(lambda values, _rng: sign_values(values, chunk))


def quantize(bits: int, chunk: int = 256) -> Transform:
    if bits not in (8, 4):
        raise ValueError("quantization has 8 or 4 bits")
    return _on_values(lambda values, rng: quantize_values(values, bits, chunk, rng))


def chain(*transforms: Transform) -> Transform:
    def apply(x: Encoded, rng: np.random.Generator) -> Encoded:
        for transform in transforms:
            x = transform(x, rng)
        return x

    return apply


class ErrorFeedbackState(NamedTuple):
    """What earlier rounds computed but did not send, per tensor (float32)."""

    residual: dict[str, np.ndarray]


def error_feedback_init(layout: Mapping[str, tuple[int, ...]]) -> ErrorFeedbackState:
    return ErrorFeedbackState({name: np.zeros(shape, np.float32) for name, shape in layout.items()})


def compress_tree(
    transform: Transform,
    delta: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    state: ErrorFeedbackState | None = None,
) -> tuple[dict[str, Encoded], ErrorFeedbackState | None]:
    """Compress every tensor of a delta; with ``state``, add the residual first and keep
    what was not sent: sent + new residual == delta + old residual (up to rounding)."""
    encoded: dict[str, Encoded] = {}
    residual: dict[str, np.ndarray] = {}
    for name, tensor in delta.items():
        # np.asarray: numpy turns arithmetic on 0-d arrays into scalars; keep arrays
        corrected = np.asarray(tensor if state is None else tensor + state.residual[name])
        encoded[name] = transform(corrected.astype(np.float32), rng)
        if state is not None:
            residual[name] = np.asarray(corrected - to_dense(encoded[name]))
    return encoded, (None if state is None else ErrorFeedbackState(residual))
