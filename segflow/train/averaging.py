"""Weight averaging: an exponential moving average (EMA) of the weights over training steps.

With a few hundred steps on a few dozen images, the weights at the end of any one epoch
still carry the noise of its last batches; their running average is a smoother model that
often generalises better at no inference cost (timm's ModelEma, YOLO and MMSegmentation
train with one). With train.ema_decay set, validation, the best checkpoint and therefore
export and serving use the averaged weights; the optimizer keeps stepping the raw ones.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """An EMA copy of a network, updated after every optimizer step.

    Floating-point tensors of the state dict (weights and batch-norm running statistics)
    move towards the network's by (1 - decay) per step; integer buffers (batch-norm step
    counters) are copied. The first update copies everything, so the average never holds
    the untrained initialisation's weights for long.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"an EMA decay must lie between 0 and 1, got {decay}")
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(network).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        """Move the average towards `network`'s current weights (after optimizer.step())."""
        weight = 1.0 if self.steps == 0 else 1.0 - self.decay
        current = network.state_dict()
        for name, average in self.module.state_dict().items():
            if average.dtype.is_floating_point:
                average.lerp_(current[name].to(average.dtype), weight)
            else:
                average.copy_(current[name])
        self.steps += 1

    def state_dict(self) -> dict:
        """What a resume state keeps: the averaged weights and how many steps made them."""
        return {"weights": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = int(state["steps"])
