"""Model construction over segmentation_models_pytorch.

Importing this module is cheap; torch and smp load when a model is built or the
registries are listed.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from segflow.errors import UserError

if TYPE_CHECKING:
    import torch

    from segflow.config import BaseParams, TrainParams


@cache
def architecture_names() -> list[str]:
    """Architectures segmentation_models_pytorch can build (for config validation)."""
    import segmentation_models_pytorch as smp

    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


@cache
def encoder_names() -> list[str]:
    """Encoders segmentation_models_pytorch knows by name."""
    from segmentation_models_pytorch.encoders import get_encoder_names

    return sorted(get_encoder_names())


def output_channels(base: BaseParams, interior: bool = False) -> int:
    """Binary models have one logit channel (sigmoid); K-class models K (softmax).

    A model that separates touching objects by watershed has one more: P(interior) logits.
    """
    return (1 if len(base.classes) == 2 else len(base.classes)) + int(interior)


def check_model_names(train: TrainParams) -> None:
    """Refuse an architecture or encoder segmentation_models_pytorch does not know, naming the
    params.yaml key and the choices.

    This is not a params.yaml validator because knowing the names means importing smp (torch,
    timm, torchvision: about 6 s), which every stage would then pay, ingest and split too; a
    name only matters where a network is built, and training checks it before anything else.
    """
    from segflow.config import PARAMS_FILE, ParamsError

    problems = []
    if train.architecture not in architecture_names():
        problems.append(
            f"train.architecture: unknown architecture {train.architecture!r}; "
            f"choose one of: {', '.join(architecture_names())}"
        )
    if train.encoder not in (choices := encoder_names()):
        close = [c for c in choices if c.startswith(train.encoder[:4])][:12] or choices[:12]
        problems.append(
            f"train.encoder: unknown encoder {train.encoder!r}; for example: {', '.join(close)} "
            f"({len(choices)} in all, see segmentation_models_pytorch's encoder list)"
        )
    if problems:
        raise ParamsError(f"{PARAMS_FILE} is invalid:\n" + "\n".join(f"  - {line}" for line in problems))


def model_spec(base: BaseParams, train: TrainParams, interior: bool = False) -> dict:
    """Everything needed to rebuild the network, saved beside its weights."""
    check_model_names(train)
    spec = {
        "architecture": train.architecture,
        "encoder": train.encoder,
        "in_channels": base.in_channels,
        "classes": output_channels(base, interior),
    }
    if train.architecture in {"Unet", "UnetPlusPlus", "MAnet"}:
        spec["decoder_channels"] = list(train.decoder_channels)
    if train.members > 1:  # only when set: specs saved without it rebuild as one network
        spec["members"] = train.members
    return spec


def build_model(spec: dict, encoder_weights: str | None = None) -> torch.nn.Module:
    """Build a network from a `model_spec` dict.

    Args:
        spec: architecture, encoder, in_channels, classes, optional decoder_channels,
            members (a seed ensemble of that many networks, segflow.train.ensemble) and
            size_head (its number of features, segflow.train.sizehead).
        encoder_weights: None for random init, or a local weights file for the encoder.

    Returns:
        The torch module, producing (N, classes, H, W) float32 logits.
    """
    spec = dict(spec)
    members = spec.pop("members", 1)
    size_features = spec.pop("size_head", 0)
    if members > 1:
        from segflow.train.ensemble import Ensemble

        # Built one after another from the one random stream: each member its own initial weights.
        model = Ensemble([_build_network(spec, encoder_weights) for _ in range(members)])
    else:
        model = _build_network(spec, encoder_weights)
    if size_features:  # fitted after training (segflow.train.sizehead); its values load with the weights
        from segflow.train.sizehead import SizeHead

        model.size_head = SizeHead(size_features)
    return model


def _build_network(spec: dict, encoder_weights: str | None) -> torch.nn.Module:
    """One smp network from a spec without `members`."""
    import segmentation_models_pytorch as smp

    spec = dict(spec)
    encoder = spec.pop("encoder")
    in_channels = spec.pop("in_channels")
    model = smp.create_model(
        arch=spec.pop("architecture"),
        encoder_name=encoder,
        encoder_weights=None,  # never let smp download; local weights load below
        # Pretrained encoder weights are RGB: load them into 3 channels, then adapt.
        in_channels=3 if encoder_weights else in_channels,
        **spec,
    )
    if encoder_weights:
        _load_encoder_weights(model.encoder, Path(encoder_weights), encoder)
        if in_channels != 3:
            model.encoder.set_in_channels(in_channels, pretrained=True)
    return model


def _load_encoder_weights(module, path: Path, encoder: str) -> None:
    """Load the tensors of a weights file that fit the encoder (by name and shape)."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(
            f"train.encoder_weights: {path} does not exist; download the weights file "
            "first or set encoder_weights: null"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise UserError(
            f"train.encoder_weights: no tensor in {path} fits encoder {encoder!r} "
            "(names or shapes differ); is it the weights file for this encoder?"
        )
    # torch's own loader: some smp encoders override load_state_dict and drop strict=False.
    torch.nn.Module.load_state_dict(module, usable, strict=False)
