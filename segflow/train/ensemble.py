"""A seed ensemble: several copies of one network, each from its own random initialisation,
whose logits are averaged.

Averaging independently initialised networks is a reliable way to buy accuracy with
compute when there is little data (nnU-Net ensembles its cross-validation models by
default): each member's errors on unusual images differ, and the mean cancels part of them.
The members live in one torch module, so a checkpoint, the ONNX export and the service hold
one network whose forward pass is the mean; only training sees the members apart. With
train.encoder_weights every member's encoder starts from the same weights: only the rest
of each network starts apart.
"""

from __future__ import annotations

import torch


class Ensemble(torch.nn.Module):
    """Members with the same inputs and output shape.

    forward: in eval mode the mean of the members' logits, (N, C, H, W), what inference and
    export see; in training mode every member's logits stacked, (members, N, C, H, W), so each
    member learns from its own loss (member_loss) rather than from the mean, which would train
    one wide network instead of independent ones.
    """

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x) for member in self.members])
        return outputs if self.training else outputs.mean(dim=0)


def member_loss(loss_fn, logits: torch.Tensor, target) -> tuple[torch.Tensor, float]:
    """The loss to step on and the loss to report, for a single network's or an ensemble's output.

    An ensemble steps on the sum of its members' losses: members share no weights, so each
    gets exactly the gradient of its own loss, as if trained alone on the same batches. It
    reports their mean, comparable with a single network's loss.
    """
    if logits.dim() == 4:  # one network: (N, C, H, W)
        loss = loss_fn(logits, target)
        return loss, loss.item()
    total = sum(loss_fn(member, target) for member in logits)
    return total, total.item() / len(logits)
