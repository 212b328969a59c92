"""The SPEC grammar that names a compression pipeline (docs/PROTOCOL.md, "Compression").

    SPEC    := "dense" | STAGE ("+" STAGE)*
    STAGE   := "topk:" FRACTION | "gtopk:" FRACTION | "fp16" | "int8" | "int4" | "sign"
             | "ef" | "flat" | "zlib"

At most one of topk (per tensor) and gtopk (over the whole delta), at most one value
coding (fp16/int8/int4/sign); each stage at most once. Stages always run in the order
topk/gtopk, value coding, and the lossless ``zlib`` last; ``ef`` (error feedback) wraps
the lossy part. ``flat`` (needs topk or gtopk) changes only the encoding: the
kept elements of all tensors travel as one run with Elias-Fano coded positions, so the
same numbers arrive in fewer bytes and decode in fewer steps. ``str(pipeline)`` is the
canonical SPEC, which travels.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmq.compression.transforms import (
    ErrorFeedbackState,
    Stage,
    chain,
    compress_tree,
    error_feedback,
    identity,
    quantize,
    scaled_sign,
    to_float16,
    top_k,
    top_k_pooled,
)
from fedmq.schemas.encodings import Encoded, Quantized, Sparse
from fedmq.schemas.framing import STAGE_SEPARATOR, Framing

VALUE_CODINGS = ("fp16", "int8", "int4", "sign")
QUANT_BITS = {"int8": 8, "int4": 4, "sign": 1}  # value codings sent in the quantized form
QUANT_CHUNK = 256


@dataclass(frozen=True)
class Pipeline:
    top_k: float | None = None
    pooled: bool = False  # gtopk: top_k's fraction of the whole delta, not of each tensor
    values: str | None = None  # one of VALUE_CODINGS, None = float32
    error_feedback: bool = False
    # encoding only (schemas.framing): flat, the whole delta as one sparse run
    # (schemas.flat); zlib, the delta map deflated. What encode and decode follow.
    framing: Framing = field(default_factory=Framing)

    def __str__(self) -> str:
        stages = []
        if self.top_k is not None:
            name = "gtopk" if self.pooled else "topk"
            stages.append(f"{name}:{self.top_k:.6f}".rstrip("0").rstrip("."))  # no exponent
        if self.values:
            stages.append(self.values)
        if self.error_feedback:
            stages.append("ef")
        if self.framing.flat:
            stages.append("flat")
        if self.framing.zlib:
            stages.append("zlib")
        return STAGE_SEPARATOR.join(stages) or "dense"

    @property
    def transform(self) -> Stage:
        """The lossy stages (topk, value coding), chained, without error feedback."""
        stages = []
        if self.top_k is not None:
            stages.append((top_k_pooled if self.pooled else top_k)(self.top_k))
        if self.values == "fp16":
            stages.append(to_float16())
        elif self.values == "sign":
            stages.append(scaled_sign(QUANT_CHUNK))
        elif self.values in QUANT_BITS:
            stages.append(quantize(QUANT_BITS[self.values], QUANT_CHUNK))
        return chain(*stages) if stages else identity()

    @property
    def stage(self) -> Stage:
        """The whole pipeline as one stage: ``transform``, wrapped in error feedback with
        ``ef`` (its state is then an ``ErrorFeedbackState``)."""
        return error_feedback(self.transform) if self.error_feedback else self.transform

    def compress(
        self,
        delta: Mapping[str, np.ndarray],
        rng: np.random.Generator,
        state: ErrorFeedbackState | None,
    ) -> tuple[dict[str, Encoded], ErrorFeedbackState | None]:
        return compress_tree(self.transform, delta, rng, state if self.error_feedback else None)

    def form_problem(self, tensor: Encoded) -> str | None:
        """Why ``tensor`` is not what this pipeline produces, or None. (isinstance on
        purpose: the rule is which forms this SPEC allows.)"""
        values = tensor
        if self.top_k is not None:
            if not isinstance(tensor, Sparse):
                return "expected a sparse tensor"
            values = tensor.values
        elif isinstance(tensor, Sparse):
            return "unexpected sparse tensor"
        if self.values in QUANT_BITS:
            bits = QUANT_BITS[self.values]
            if not isinstance(values, Quantized) or values.bits != bits:
                return f"expected {bits}-bit quantized values"
            return None
        if not isinstance(values, np.ndarray):
            return "unexpected quantized values"
        wanted = "<f2" if self.values == "fp16" else "<f4"
        if values.dtype.str != wanted:
            return f"expected {wanted} values, got {values.dtype.str}"
        return None


def parse_spec(text: str) -> Pipeline:
    """The pipeline a SPEC names; ValueError with the offending stage otherwise."""
    if text == "dense":
        return Pipeline()
    top: float | None = None
    pooled = False
    values: str | None = None
    seen: set[str] = set()
    for stage in text.split(STAGE_SEPARATOR):
        kind, _, argument = stage.partition(":")
        if kind in seen:
            raise ValueError(f"compression {text!r}: stage {kind!r} appears twice")
        seen.add(kind)
        if kind in ("topk", "gtopk"):
            if top is not None:
                raise ValueError(f"compression {text!r}: choose one of topk, gtopk")
            pooled = kind == "gtopk"
            try:
                top = float(argument)
            except ValueError:
                top = -1.0
            if not 1e-6 <= top <= 1:
                raise ValueError(f"compression {text!r}: {kind} needs a fraction in [1e-6, 1]")
        elif kind in VALUE_CODINGS and not argument:
            if values is not None:
                raise ValueError(f"compression {text!r}: choose one of {', '.join(VALUE_CODINGS)}")
            values = kind
        elif kind not in ("ef", "flat", "zlib") or argument:
            raise ValueError(
                f"compression {text!r}: unknown stage {stage!r} (dense, topk:F, gtopk:F, "
                "fp16, int8, int4, sign, ef, flat, zlib)"
            )
    if "flat" in seen and top is None:
        raise ValueError(
            f"compression {text!r}: flat encodes a sparse delta, it needs topk:F or gtopk:F"
        )
    # The framing stages as the wire reads them in any update (one reading, schemas.framing)
    return Pipeline(
        top_k=top,
        pooled=pooled,
        values=values,
        error_feedback="ef" in seen,
        framing=Framing.named_by(text),
    )
