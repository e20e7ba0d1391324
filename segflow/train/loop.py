"""The training loop: Dice + BCE or cross-entropy loss, AdamW, best checkpoint by val Dice.

What each batch holds (images at the trained object size, augmented, and their targets) is
segflow.train.dataset."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from segflow.config import Params
from segflow.core.postprocessing import SEEDED, semantic_mask
from segflow.core.preprocessing import Preprocessing
from segflow.core.sizes import median_diameter
from segflow.data.samples import Sample
from segflow.evaluate.metrics import class_confusions, summarize_classes
from segflow.train import distributed
from segflow.train.averaging import WeightAverage
from segflow.train.checkpoints import add_size_head, save_checkpoint, torch_segmenter
from segflow.train.dataset import (
    AugmentedDataset,
    build_augmentations,
    collate,
    data_diameter,
    loss_targets,
    rescale_samples,
    sample_labels,
)
from segflow.train.epochs import best_epoch, build_scheduler, deterministic_mode, seed_epoch, should_stop
from segflow.train.models import build_model, model_spec
from segflow.train.precision import Compute
from segflow.train.resume import ResumeFile, fingerprint

log = logging.getLogger(__name__)


def preprocessing_from(params: Params, data_diameter: float = 0.0) -> Preprocessing:
    """The inference contract implied by params (saved with every checkpoint).

    Args:
        data_diameter: the training images' median object diameter (see `data_diameter`),
            recorded when train.diameter asks for size normalisation.
    """
    base, infer = params.base, params.inference
    return Preprocessing(
        in_channels=base.in_channels,
        mean=base.normalize.mean,
        std=base.normalize.std,
        pad_multiple=base.pad_multiple,
        threshold=infer.threshold,
        classes=list(base.classes),
        scaling=base.intensity.scaling,
        low=base.intensity.low,
        high=base.intensity.high,
        instances=params.instance_method(),
        seed_threshold=infer.seed_threshold,
        seed_prominence=infer.seed_prominence,
        min_area=infer.min_area,
        tile_size=infer.tile_size,
        tile_overlap=infer.tile_overlap,
        train_diameter=params.train.diameter or 0.0,
        data_diameter=round(data_diameter, 3) if params.train.diameter else 0.0,
    )  # diameter and tta stay at their defaults: evaluate chooses them (reports/postprocess.json)


def train_model(
    params: Params,
    train: list[Sample],
    val: list[Sample],
    checkpoint_path: Path,
    on_epoch: Callable[[dict], None] | None = None,
    resume_path: Path | None = None,
) -> list[dict]:
    """Train, keeping the checkpoint with the best validation Dice; with train.diameter and
    train.size_head, then fit the checkpoint's size head on train and val
    (segflow.train.sizehead).

    The learning rate follows train.schedule; train.early_stopping ends the run after that
    many epochs without a better val Dice; train.deterministic selects deterministic kernels
    (see segflow.train.epochs.deterministic_mode for what that guarantees on CPU). Each epoch
    re-seeds its random streams from (base.seed, epoch), so a resumed run computes the same
    epochs an uninterrupted one would.

    Args:
        params: validated params (train section and base used).
        train, val: samples from load_samples.
        checkpoint_path: where the best checkpoint is written.
        on_epoch: called with each epoch's record (epoch, train_loss, val_loss, val_dice, ...),
            first for the epochs restored from a resume state, so a new run logs whole curves.
        resume_path: where a resume state is saved after every epoch (e.g.
            artifacts/.resume/train.pt) and continued from if its fingerprint matches this
            run; None trains from scratch without one. The caller deletes it
            (segflow.train.resume.discard) once the outputs are safely in place.

    Returns:
        One record per epoch run, restored ones included; fewer than train.epochs when
        early stopping ended the run.
    """
    with deterministic_mode(params.train.deterministic):
        history = _train(params, train, val, checkpoint_path, on_epoch, resume_path)
    if params.train.diameter and params.train.size_head and distributed.current().is_main:
        add_size_head(checkpoint_path, train + val)
    return history


def _train(params, train, val, checkpoint_path, on_epoch, resume_path) -> list[dict]:
    """train_model's body (under the deterministic-mode setting)."""
    import torch
    from tqdm import tqdm

    from segflow.train.ensemble import member_loss  # torch at import, like this function

    cfg = params.train
    world = distributed.current()  # rank 0 of 1 unless torchrun started this process
    torch.manual_seed(params.base.seed)
    prep = preprocessing_from(params, data_diameter(train))
    if cfg.diameter:  # the network learns one object size; inference rescales to it
        log.info(
            "training at object diameter %.1f px (the training images' median: %.1f px)",
            cfg.diameter, prep.data_diameter,
        )  # fmt: skip
        train = rescale_samples(train, cfg.diameter, prep.data_diameter)
    spec = model_spec(params.base, cfg, interior=prep.instances in SEEDED)
    compute = Compute.resolve(cfg.precision, cfg.channels_last)
    log.info("training in %s", compute.describe())
    model = compute.prepare(build_model(spec, cfg.encoder_weights))
    loss_fn = _make_loss(cfg.dice_weight, len(params.base.classes), cfg.border_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = AugmentedDataset(
        train,
        build_augmentations(params),
        prep,
        cfg.interior_margin,
        cfg.crops_per_image,
        cfg.border_weight > 0,
        cfg.crop_sampling,
    )
    loader = _loader(dataset, distributed.check_batch(cfg.batch_size, world.size), params.base.seed, world)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.lr, cfg.epochs * len(loader))
    # With train.ema_decay the averaged weights are what is validated, saved and exported.
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    # The best epoch so far, with a copy of its weights for the resume state.
    history, best, best_at, best_weights = [], -1.0, 0, None
    resume = None
    if resume_path is not None:
        # Rank 0 reads the state and hands it to every rank: all start from the same epoch,
        # weights, optimizer and schedule, wherever they run.
        if world.is_main:
            resume = ResumeFile(
                Path(resume_path), fingerprint(params, prep.to_dict(), {"train": train, "val": val})
            )
        [state] = distributed.share_from_main([resume.load() if resume is not None else None], world)
        if state is not None and _restore(state, model, optimizer, scheduler, average, resume):
            history = state["history"]
            best, best_at, best_weights = state["best_val_dice"], state["best_epoch"], state["best_weights"]
            # The output folder was rebuilt empty: put the best checkpoint back.
            if world.is_main:
                save_checkpoint(checkpoint_path, best_weights, spec, prep, epoch=best_at, val_dice=best)
            done = len(history)
            where = f"from epoch {done + 1}" if done < cfg.epochs else f"after the last epoch {done}"
            log.info(
                "resuming %s/%s (%s): epochs 1-%s restored, best val Dice %.4f at epoch %s",
                where, cfg.epochs, resume_path, done, best, best_at,
            )  # fmt: skip
            for record in history if on_epoch and world.is_main else ():
                on_epoch(record)
    network = model  # what the optimizer steps
    evaluated = average.module if average is not None else network  # what is validated, saved and exported
    if world.size > 1:  # averages gradients over the processes; starts every replica from rank 0's weights
        model = torch.nn.parallel.DistributedDataParallel(model)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if should_stop(history, cfg.early_stopping):
            top = best_epoch(history)
            log.info(
                "early stopping after epoch %s/%s: no better val Dice for %s epoch(s) "
                "(best %.4f at epoch %s)",
                epoch - 1, cfg.epochs, cfg.early_stopping, top["val_dice"], top["epoch"],
            )  # fmt: skip
            break
        seed_epoch(params.base.seed, epoch, loader.generator, dataset.augment, world.rank)
        if world.size > 1:
            loader.sampler.set_epoch(epoch)  # each epoch its own split of the shuffled images
        started = time.perf_counter()
        model.train()
        losses, lr = [], optimizer.param_groups[0]["lr"]
        for x, y in tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None):
            optimizer.zero_grad()
            with compute.autocast():
                logits = model(compute.inputs(x))
            # The loss in float32 whatever the forward pass ran in; an ensemble's members each their own.
            loss, reported = member_loss(loss_fn, logits.float(), y)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]  # what this step uses (the scheduler moves it next)
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update(network)
            losses.append(reported)
        val_loss, val_dice = distributed.share_from_main(
            _validate(evaluated, prep, val, loss_fn, cfg.interior_margin) if world.is_main else [None, None],
            world,
        )  # every rank needs the result: early stopping must stop them all at the same epoch
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_dice": val_dice,
            "lr": lr,  # the epoch's last step
            "seconds": time.perf_counter() - started,
        }
        if val_dice > best:
            best, best_at = val_dice, epoch
            best_weights = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            if world.is_main:
                save_checkpoint(checkpoint_path, evaluated, spec, prep, epoch=epoch, val_dice=val_dice)
        record["best_val_dice"] = best
        history.append(record)
        if not world.is_main:
            continue  # rank 0 alone logs and writes
        log.info(
            "epoch %3d/%d  train_loss %.4f  val_loss %.4f  val_dice %.4f  (%.1fs)",
            epoch, cfg.epochs, record["train_loss"], val_loss, val_dice, record["seconds"],
        )  # fmt: skip
        if resume is not None:  # before on_epoch: what is logged is never lost to a kill
            resume.save(
                {
                    "epoch": epoch,
                    "history": history,
                    "best_val_dice": best,
                    "best_epoch": best_at,
                    # The model's own tensors when this epoch is the best: torch.save stores them once.
                    "best_weights": evaluated.state_dict() if best_at == epoch else best_weights,
                    "model": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **({"average": average.state_dict()} if average is not None else {}),
                }
            )
        if on_epoch:
            on_epoch(record)
    return history


def _loader(dataset, batch_size: int, seed: int, world: distributed.World):
    """Shuffled batches of `dataset`; under torchrun each process takes its own share of every
    epoch's images (DistributedSampler: equal shares, so every process steps together)."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = None
    if world.size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
    )


def _restore(
    state: dict, model, optimizer, scheduler, average: WeightAverage | None, resume: ResumeFile | None
) -> bool:
    """Load a matching resume state into the model, optimizer, scheduler and weight average;
    False (saying why, on rank 0: `resume`) if its weights do not fit the network."""
    current = model.state_dict()
    saved = state["model"]
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in current):
        if resume is not None:
            resume.reject("its weights do not fit the network built from these params")
        return False
    model.load_state_dict(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if average is not None:  # train.ema_decay is in the fingerprint: a matching state holds one
        average.load_state_dict(state["average"])
    return True


def _make_loss(dice_weight: float, n_classes: int, border_weight: float = 0.0):
    """Dice + BCE on one foreground logit (two classes), Dice + cross-entropy over K logits otherwise;
    plus Dice + BCE on the interior logit (the last channel) when the targets have one.

    When the targets mark where touching objects meet ("border", dataset.touching_band), those
    pixels weigh 1 + border_weight in both pixel losses (BCE, cross-entropy), not in Dice.
    Validation builds no border target, so val_loss stays comparable across border weights.
    """
    import torch.nn.functional as F
    from segmentation_models_pytorch.losses import DiceLoss

    binary_dice = DiceLoss(mode="binary", from_logits=True)
    multiclass_dice = DiceLoss(mode="multiclass", from_logits=True)
    n_semantic = 1 if n_classes == 2 else n_classes

    def bce(logits, target, weight):
        return F.binary_cross_entropy_with_logits(logits, target, weight=weight)

    def cross_entropy(logits, target, weight):
        if weight is None:
            return F.cross_entropy(logits, target)
        return (F.cross_entropy(logits, target, reduction="none") * weight[:, 0]).mean()

    dice, pixelwise = (binary_dice, bce) if n_classes == 2 else (multiclass_dice, cross_entropy)

    def mixed(dice_loss, pixel_loss, logits, target, weight):
        return dice_weight * dice_loss(logits, target) + (1 - dice_weight) * pixel_loss(
            logits, target, weight
        )

    def loss(logits, target: dict):
        weight = 1.0 + border_weight * target["border"] if "border" in target else None
        total = mixed(dice, pixelwise, logits[:, :n_semantic], target["semantic"], weight)
        if "interior" in target:  # the watershed's seeds: one more binary task on the last channel
            total = total + mixed(binary_dice, bce, logits[:, n_semantic:], target["interior"], weight)
        return total

    return loss


def _validate(
    model, prep: Preprocessing, val: list[Sample], loss_fn, interior_margin: int
) -> tuple[float, float]:
    """Validation through the inference path, on whole images (no augmentation).

    Returns:
        (mean loss, Dice at the default 0.5 threshold, averaged over foreground classes).
    """
    import torch

    segmenter = torch_segmenter(model, prep)
    n_classes = len(prep.classes)
    n_semantic = 1 if n_classes == 2 else n_classes
    counts, losses = [], []
    # Model selection needs no size estimate: size-normalised models see each image at its true size.
    diameters = [median_diameter(s.instances) if s.instances is not None else None for s in val]
    for s, logit in zip(val, segmenter.logits([s.image for s in val], diameters), strict=True):
        target = loss_targets(sample_labels(s, prep, interior_margin), n_classes)
        target = {k: torch.from_numpy(v)[None] for k, v in target.items()}
        losses.append(loss_fn(torch.from_numpy(logit)[None], target).item())
        _, pred = semantic_mask(logit[:n_semantic], threshold=0.5)
        counts.append(class_confusions(pred, s.mask, n_classes))
    return float(np.mean(losses)), summarize_classes(counts, list(prep.classes))["dice"]
