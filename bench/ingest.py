"""The aggregator's cost to ingest one dense update (decode + validate + accumulate)
against a plain numpy add of the same array, measured in the same run.

    .venv/bin/python bench/ingest.py

Ingest goes through ``Aggregator.handle`` exactly as a message from the broker does
(under plain FedAvg that folds the update into the round's sum), plus the round close's
mean (``aggregator.combine.Held.combine``).
The baseline is ``acc += delta`` on a float32 array of the same size: the least any
aggregator must do per update.
"""

import statistics
import time
import timeit

import numpy as np

from fedmq import logs
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.server import Aggregator, RoundSettings
from fedmq.models import MLP
from fedmq.schemas import NodeUpdate, TrainingPlan, encode, model_id_of

UPDATES = 20  # distinct nodes per measured round
REPEATS = 7


def make_case(params: dict[str, np.ndarray]) -> tuple[RoundSettings, list[tuple[str, bytes]]]:
    settings = RoundSettings(
        federation="bench", model_name="bench", model=MLP((1, 1)), rounds=10**6,
        policy=RoundPolicy(expected_nodes=10**6, min_nodes=1),
        plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
        max_update_bytes=64 * 1024 * 1024,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    model_id = model_id_of(params)
    payloads = []
    for i in range(UPDATES):
        delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in params.items()}
        update = NodeUpdate(federation="bench", node_id=f"n{i}", round=1, base_model_id=model_id,
                            num_examples=150, train_loss=1.0, train_seconds=0.0, delta=delta)  # fmt: skip
        payloads.append((f"fedmq/bench/updates/n{i}", encode(update)))
    return settings, payloads


def time_ingest(params: dict[str, np.ndarray]) -> tuple[float, int]:
    settings, payloads = make_case(params)
    per_update = []
    for _ in range(REPEATS):
        aggregator = Aggregator(settings, params, publish=lambda *_: None)
        aggregator.start()
        started = time.perf_counter()
        for topic, payload in payloads:
            aggregator.handle(topic, payload)  # decode + validate + fold in
        aggregator.held.combine()  # as the round close does
        per_update.append((time.perf_counter() - started) / UPDATES)
        assert len(aggregator.held) == UPDATES, "an update was rejected"
    return statistics.median(per_update), len(payloads[0][1])


def time_numpy_add(params: dict[str, np.ndarray]) -> float:
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in params.items()}
    acc = {k: np.zeros(v.shape, np.float32) for k, v in params.items()}

    def add() -> None:
        for k in acc:
            acc[k] += delta[k]

    runs = timeit.repeat(add, number=UPDATES, repeat=REPEATS)
    return statistics.median(runs) / UPDATES


def main() -> None:
    logs.configure(json=True, level="error")
    from fedmq.models import get_model

    cases = {
        "digits-mlp (2,410 params, 4 tensors)": get_model("digits-mlp").init(0),
        "1,000,000 params (1 tensor)": {"w": np.zeros((1000, 1000), np.float32)},
    }
    print(f"{'case':<38} {'bytes':>9} {'ingest us':>10} {'numpy add us':>13} {'ratio':>6}")
    for name, params in cases.items():
        ingest, size = time_ingest(params)
        baseline = time_numpy_add(params)
        print(
            f"{name:<38} {size:>9} {ingest * 1e6:>10.1f} {baseline * 1e6:>13.1f} {ingest / baseline:>6.2f}"
        )


if __name__ == "__main__":
    main()
