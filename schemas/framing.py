"""How an update's ``delta`` is framed on the wire, as its SPEC says (docs/PROTOCOL.md
section 12): ``flat`` (all tensors as one sparse run, ``schemas.flat``) and ``zlib``
(the delta map msgpack-packed and deflated, last).

The framing is the part of a SPEC the wire format itself depends on: the decoder must
frame a delta by the SPEC the update names (whatever it is; the aggregator compares it
with its own afterwards, ``wrong_compression``). ``Framing.named_by`` is the one reading
of those stages: ``fedmq.compression.parse_spec`` takes its framing from it too, and the
parsed pipeline hands it on as ``Pipeline.framing``.
"""

import functools
from dataclasses import dataclass

STAGE_SEPARATOR = "+"


@dataclass(frozen=True)
class Framing:
    flat: bool = False  # one flat map for the whole delta (needs every tensor sparse)
    zlib: bool = False  # the (flat) map packed and deflated: ``delta`` is bin

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def named_by(spec: str) -> "Framing":
        """The framing stages of ``spec`` (any string of SPEC characters: an invalid SPEC
        frames its delta as its stages say, and is refused later as the wrong one)."""
        stages = spec.split(STAGE_SEPARATOR)
        return Framing(flat="flat" in stages, zlib="zlib" in stages)
