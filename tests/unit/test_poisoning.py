"""Issue 5's poisoning test: 2 of 10 nodes send poisoned updates (their delta x -10, or
noise of large norm). A robust aggregator keeps digits-mlp's final test accuracy within
3 points of the clean run; plain FedAvg visibly degrades.

In-process (``bench.poisoning.simulate``): real local training, real encoded
``NodeUpdate`` messages, the real ``Aggregator``; no broker, so it runs in seconds.
"""

import pytest
from structlog.testing import capture_logs

from bench.poisoning import ATTACKS, HOSTILE, Fleet, simulate
from fedmq.aggregator.robust import DEFAULT

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


@pytest.mark.slow
def test_the_default_keeps_one_hostile_node_of_ten_within_three_points() -> None:
    """Issue 11: one node claims 2**24 examples and sends, every round, its delta flipped,
    a flip x 1e6, the fleet's last step reversed at the schema's limit, or values at the
    limit. Plain FedAvg is ruined by each; the default stays within 3 points and never
    stalls, and an honest run under it is bitwise plain FedAvg's."""
    fleet = Fleet()
    with capture_logs():
        clean = simulate(fleet, "fedavg", None, rounds=ROUNDS)
        assert simulate(fleet, str(DEFAULT), None, rounds=ROUNDS).model_id == clean.model_id
        for name, attack in HOSTILE.items():
            if attack is None:
                continue
            plain = simulate(fleet, "fedavg", attack, rounds=ROUNDS, poisoned=1)
            bounded = simulate(fleet, str(DEFAULT), attack, rounds=ROUNDS, poisoned=1)
            print(
                f"\n{name:9s} fedavg {100 * plain.final:5.1f} % default {100 * bounded.final:5.1f} %"
            )
            assert plain.final < clean.final - 0.5, name
            assert bounded.diverged_at is None, name
            assert bounded.final >= clean.final - 0.03, name
