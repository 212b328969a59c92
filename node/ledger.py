"""A node's privacy ledger: every DP-SGD round it has published, kept in its state directory.

``privacy.json`` (docs/PROTOCOL.md 13.2): a JSON map ``{"v": 1, "secret": HEX, "delta":
float, "spent": [{"round", "model_id", "q", "noise", "steps"}, ...]}``. ``spent`` lists the
rounds whose update went on record, oldest first; the node's epsilon is their composition
(``fedmq.privacy.epsilon``) at ``delta`` (1 / n^1.1 of the examples it had when the ledger
was made) or at the node's ``--dp-delta``.

Crash safety, as the error-feedback residual's (node.saved_tensors): the ledger with the
new round waits as ``privacy.next.json`` until that round's update is on record
(node.last_update), then replaces the ledger; at start-up ``settle`` finishes or drops a
pending one. An update is on record before it is published, so every published update is
in the ledger, whatever point a crash hits; one that never went on record was never
published and costs nothing. Nothing but the node writes the ledger: no message resets
it, and a ledger that cannot be read stops DP training (``LedgerError``) rather than
starting from zero.

``secret``: 32 random bytes made with the ledger, never sent. The node's Poisson samples
and noise are drawn from it (``randomness``), with the number of rounds spent so far as a
nonce, so no two published updates share noise, a round trained again after a crash
(nothing published) draws the same, and the aggregator, which knows the plan's seed,
cannot reproduce them.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedmq.files import fsync_directory, write_atomically
from fedmq.privacy import Spend, epsilon

FILE = "privacy.json"
PENDING = "privacy.next.json"
VERSION = 1


class LedgerError(ValueError):
    """The ledger exists but cannot be read: DP training stops rather than reset it."""


@dataclass(frozen=True)
class Entry:
    """One published DP-SGD round: ``steps`` steps at rate ``q`` with noise ``noise``."""

    round: int
    model_id: str
    q: float
    noise: float
    steps: int


@dataclass(frozen=True)
class Ledger:
    secret: bytes
    delta: float  # the delta epsilon is reported at unless the node is given one
    spent: tuple[Entry, ...] = ()

    def epsilon(self, delta: float | None = None, extra: Entry | None = None) -> float:
        """Epsilon spent (with ``extra`` as if it were spent too) at ``delta`` or the
        ledger's own."""
        entries = self.spent if extra is None else (*self.spent, extra)
        return epsilon((Spend(e.q, e.noise, e.steps) for e in entries), delta or self.delta)

    def with_entry(self, entry: Entry) -> "Ledger":
        return replace(self, spent=(*self.spent, entry))

    def randomness(self, round_number: int, model_id: str) -> tuple[np.random.Generator, bytes]:
        """The next round's sampling generator and 8 bytes for its JAX noise key, from the
        secret, the number of rounds spent (a nonce: never repeats once a round is
        published), the round and the model."""
        nonce = f"{len(self.spent)}:{round_number}:{model_id}".encode()
        sample = hashlib.sha256(self.secret + b"sample:" + nonce).digest()
        noise = hashlib.sha256(self.secret + b"noise:" + nonce).digest()
        return np.random.default_rng(int.from_bytes(sample, "big")), noise[:8]


def new(delta: float) -> Ledger:
    """A fresh ledger with its own secret."""
    return Ledger(secret=os.urandom(32), delta=delta)


def save(path: Path, ledger: Ledger) -> None:
    """Write atomically: a crash leaves the old file or the new one."""
    data = {
        "v": VERSION,
        "secret": ledger.secret.hex(),
        "delta": ledger.delta,
        "spent": [vars(e) for e in ledger.spent],
    }
    write_atomically(path, json.dumps(data, indent=1).encode() + b"\n")


def load(path: Path) -> Ledger | None:
    """The ledger, None if there is none; ``LedgerError`` if it exists but is unreadable."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise LedgerError(f"privacy ledger {path} cannot be read: {error}") from None
    try:
        raw = json.loads(text)
        if raw["v"] != VERSION:
            raise ValueError(f"version {raw['v']!r}, this node reads {VERSION}")
        secret = bytes.fromhex(raw["secret"])
        delta = float(raw["delta"])
        spent = tuple(
            Entry(int(e["round"]), str(e["model_id"]), float(e["q"]), float(e["noise"]),
                  int(e["steps"]))
            for e in raw["spent"]
        )  # fmt: skip
        if len(secret) != 32 or not 0 < delta < 1:
            raise ValueError("its secret or delta is malformed")
        if any(not (0 < e.q <= 1 and e.noise > 0 and e.steps >= 0) for e in spent):
            raise ValueError("an entry is malformed")
        if not all(math.isfinite(v) for e in spent for v in (e.q, e.noise)):
            raise ValueError("an entry is not finite")
    except (ValueError, TypeError, KeyError) as error:
        raise LedgerError(
            f"privacy ledger {path} is unreadable ({error}): restore it from a backup; a "
            "node does not start its privacy budget again on its own"
        ) from None
    return Ledger(secret, delta, spent)


def promote(pending: Path, path: Path) -> None:
    """Make the pending ledger the ledger (after its round's update went on record)."""
    pending.replace(path)
    fsync_directory(path.parent)


def settle(pending: Path, path: Path, on_record: tuple[int, str] | None) -> None:
    """At start-up: a pending ledger whose last round is the update on record
    (``on_record``: its round and base model id) was about to be promoted, so promote it;
    any other belongs to an update that never went on record, never published: drop it."""
    if not pending.exists():
        return
    try:
        waiting = load(pending)
    except LedgerError:
        waiting = None
    last = waiting.spent[-1] if waiting is not None and waiting.spent else None
    if last is not None and (last.round, last.model_id) == on_record:
        promote(pending, path)
    else:
        pending.unlink()


def noise_key_words(key: bytes) -> np.ndarray:
    """The two uint32 words of a threefry key from 8 bytes."""
    return np.array([int.from_bytes(key[:4], "big"), int.from_bytes(key[4:8], "big")],
                    dtype=np.uint32)  # fmt: skip
