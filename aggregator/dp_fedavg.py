"""User-level differential privacy at the aggregator: DP-FedAvg (McMahan et al. 2018).

With ``--dp-fedavg noise=Z,clip=C`` a model version is made from its held updates by:

1. clipping each update's delta (as decoded: what the node's compression produced) to L2
   norm C over all tensors together;
2. summing them in node-id order, in float64, with one vote per node (not weighted by
   examples: a node's claimed example count would change how much it can move the sum);
3. adding N(0, (Z C)^2) to every coordinate, from a generator seeded with the
   aggregator's secret (never the plan's seed, which nodes know);
4. dividing by the round's expected participants (the nodes it sampled, or
   ``--nodes``), a number that does not depend on who reported.

Adding or removing one node moves the sum by at most C, so each version is the Gaussian
mechanism on the nodes' data with noise multiplier Z (add/remove-one-node adjacency). No
amplification by sampling is claimed: a round's selection is published (``selected``) and
drawn from the public plan seed, and nodes that drop out are simply absent from the sum,
which the bound covers. The run's epsilon after v versions is v such mechanisms composed
(``fedmq.privacy``, RDP), at delta 1 / N^1.1 for a fleet of N nodes.

What this protects: the models and metrics the aggregator publishes, against anyone who
reads them. Not the updates themselves, which travel to the aggregator (and through the
broker) as the nodes made them: that needs the nodes' own DP-SGD (``plan.dp_sgd``).

Pure: no MQTT, no files, no logging.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.privacy import Spend, epsilon
from fedmq.schemas import NodeUpdate
from fedmq.schemas.encodings import to_dense
from fedmq.schemas.tensors import Params, Shapes


@dataclass(frozen=True)
class DpFedAvg:
    noise: float  # Z: the noise's standard deviation over clip
    clip: float  # C: the L2 bound of one node's delta


def private_mean(
    updates: Mapping[str, NodeUpdate],
    layout: Shapes,
    dp: DpFedAvg,
    denominator: int,
    rng: np.random.Generator,
) -> tuple[Params, int]:
    """(the noised mean delta in float64, how many deltas were clipped): ``updates`` by
    key, read in key order."""
    if denominator < 1:
        raise ValueError(f"the expected number of participants must be >= 1, not {denominator}")
    total = {name: np.zeros(shape, np.float64) for name, shape in layout.items()}
    clipped = 0
    for key in sorted(updates):
        dense = {name: to_dense(t).astype(np.float64) for name, t in updates[key].delta.items()}
        norm = float(np.sqrt(sum(float(np.sum(np.square(a))) for a in dense.values())))
        factor = 1.0 if norm <= dp.clip else dp.clip / norm
        clipped += factor < 1.0
        for name, array in dense.items():
            total[name] += array * factor
    scale = dp.noise * dp.clip
    mean = {
        name: (array + rng.normal(0.0, scale, array.shape)) / denominator
        for name, array in total.items()
    }
    return mean, clipped


def fleet_delta(fleet: int) -> float:
    """delta = 1 / N^1.1 for N nodes: below 1/N, as user-level DP needs."""
    return 1.0 / max(fleet, 1) ** 1.1


def run_epsilon(dp: DpFedAvg, versions: int, delta: float) -> float:
    """The epsilon of ``versions`` DP-FedAvg versions at ``delta`` (each one Gaussian
    mechanism with noise multiplier Z, no sampling amplification)."""
    return epsilon([Spend(1.0, dp.noise, versions)], delta)
