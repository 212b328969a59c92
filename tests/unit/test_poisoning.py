"""Issue 5's poisoning test: 2 of 10 nodes send poisoned updates (their delta x -10, or
noise of large norm). A robust aggregator keeps digits-mlp's final test accuracy within
3 points of the clean run; plain FedAvg visibly degrades.

In-process (``bench.poisoning.simulate``): real local training, real encoded
``NodeUpdate`` messages, the real ``Aggregator``; no broker, so it runs in seconds.
"""

import pytest
from structlog.testing import capture_logs

from bench.poisoning import ATTACKS, Fleet, simulate

ROUNDS = 30


@pytest.mark.slow
def test_robust_rules_keep_accuracy_while_fedavg_degrades() -> None:
    fleet = Fleet()
    with capture_logs():  # poisoned runs reject updates by the hundred
        clean = simulate(fleet, "fedavg", None, rounds=ROUNDS).final
        final = {
            (rule, attack): simulate(fleet, rule, ATTACKS[attack], rounds=ROUNDS).final
            for rule in ("fedavg", "median", "trimmed-mean:0.2")
            for attack in ("scale", "noise")
        }
    print(f"\nclean fedavg: {100 * clean:.1f} %")
    for (rule, attack), accuracy in final.items():
        print(f"{rule:18s} {attack:6s} {100 * accuracy:5.1f} % ({100 * (accuracy - clean):+.1f})")
    assert clean > 0.9
    for attack in ("scale", "noise"):
        assert final["fedavg", attack] < clean - 0.10, attack  # visibly worse
        for rule in ("median", "trimmed-mean:0.2"):
            assert final[rule, attack] >= clean - 0.03, (rule, attack)
