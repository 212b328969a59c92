"""Compression of parameter deltas: pure transforms (``transforms``) chained into a
pipeline named by a SPEC string (``spec``). How compressed tensors become bytes is the
wire format's business (``schemas.encodings``)."""

from fedmq.compression.spec import Pipeline, parse_spec

__all__ = ["Pipeline", "parse_spec"]
