"""Baseline aggregation rules, each with the defense interface: ``defense(updates, rnd) -> fl.Decision``.

updates: the round's ``[n, d]`` updates; rnd: ``fl.Round``, what the server knows in this round.
"""
import torch

import fl


def fedavg(updates, rnd):
    """No defense: FedAvg over every update (McMahan et al. 2017; the unweighted mean, as the FedREDefense code)."""
    return fl.Decision(update=fl.fedavg(updates), accepted=torch.ones(len(updates), dtype=torch.bool))


def oracle(updates, rnd):
    """FedAvg over the truly benign updates only: the upper bound FedDefuse calls "Best Defense" (Table 2).

    It reads the ground truth ``rnd.malicious`` (the clients attacking this round), which no real server has.
    """
    benign = ~rnd.malicious
    return fl.Decision(update=fl.fedavg(updates[benign.to(updates.device)]), accepted=benign)
