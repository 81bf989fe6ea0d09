"""One measure for the trainer tests' 'a few steps from this model, far from that one' checks."""

import torch


def l1_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Sum of absolute differences over two same-architecture modules' weights."""
    return sum(float((x - y).abs().sum()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
