"""The size head: fitted after training, shipped in the ONNX graph, and the second start of
diameter auto's size estimate (the end sharing less outline wins)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from scipy import ndimage as ndi

from segflow.config import parse_params
from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing, normalize
from segflow.core.sizes import resize_planes, scaled_shape, shared_outline, size_view
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.release.export import check_parity, export_onnx
from segflow.release.quantize import quantize
from segflow.train.checkpoints import checkpoint_segmenter, load_checkpoint
from segflow.train.loop import train_model
from segflow.train.sizehead import SIZE_OUTPUT, _leave_one_image_out, _ridge
from tests.unit.test_sizes import disks
from tests.unit.test_training import TINY, one_thread  # noqa: F401  (the fixture)


def test_shared_outline_is_the_outline_objects_share_with_each_other():
    apart = np.zeros((20, 20), np.uint16)
    apart[2:6, 2:6], apart[10:14, 10:14] = 1, 2
    assert shared_outline(apart) == 0.0
    halves = np.zeros((20, 20), np.uint16)
    halves[2:6, 2:6], halves[2:6, 6:10] = 1, 2  # a 4 x 8 rectangle cut in two
    # each half has 16 outline steps, 4 of them against the other half
    assert shared_outline(halves) == pytest.approx(8 / 32)
    assert shared_outline(np.zeros((5, 5), np.uint16)) == 0.0


def test_ridge_recovers_a_linear_relation_and_its_error_is_measured_on_unseen_images():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 30))
    y = X[:, :3] @ np.array([0.5, -0.2, 0.1]) + 0.3
    mean, scale, weight, bias = _ridge(X, y, penalty=1e-3)
    assert np.allclose((X - mean) / scale @ weight + bias, y, atol=1e-3)
    groups = np.repeat(np.arange(12), 5)
    assert _leave_one_image_out(X, y, groups, 1e-3) < 0.01
    # features that say nothing: held-out error is about the targets' spread, not zero
    noise = rng.normal(size=(60, 30))
    assert _leave_one_image_out(noise, y, groups, 1e-3) > 0.1


def _disk_samples(n: int, seed: int) -> list[Sample]:
    """(96, 96) uint8 images of bright disks on noise; each image's disks 8 to 24 px across."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        radius = int(rng.integers(4, 13))
        instances = disks(96, radius, 3 * radius)
        mask = (instances > 0).astype(np.uint8)
        image = (rng.integers(0, 60, mask.shape) + 150 * mask).astype(np.uint8)
        samples.append(Sample(id=f"d{seed}_{i}", image=image, mask=mask, instances=instances))
    return samples


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """A tiny seed ensemble trained at object diameter 12, with its size head."""
    path = tmp_path_factory.mktemp("sizehead") / "model.pt"
    params = parse_params({"train": {**TINY["train"], "members": 2, "epochs": 2, "diameter": 12}})
    train_model(params, _disk_samples(10, 0), _disk_samples(4, 1), path)
    return path


def test_training_at_a_diameter_fits_a_size_head_that_orders_sizes(sized):
    model, prep = load_checkpoint(sized)
    assert prep.size_output == SIZE_OUTPUT and model.size_head.weight.shape == (2 * 1280,)  # two mobilenet_v2
    segmenter = checkpoint_segmenter(sized)
    # Unseen images shown at half and twice the trained size: the head of a two-epoch model
    # tells them apart, the right way round, by at least a quarter of the true log(4).
    gaps = []
    for sample in _disk_samples(4, 2):
        x = normalize(sample.image, prep)
        natural = prep.train_diameter / (2 * float(np.sqrt((sample.instances == 1).sum() / np.pi)))
        views = [size_view(resize_planes(x, scaled_shape(x.shape[1:], natural * r)), 32) for r in (0.5, 2.0)]
        small, large = (segmenter.estimate(view[None])[0] for view in views)
        gaps.append(large - small)
    assert min(gaps) > np.log(4) / 4, gaps


def test_the_size_head_ships_as_a_second_onnx_output_that_matches_torch(sized, tmp_path):
    model, prep = load_checkpoint(sized)
    export_onnx(model, prep, tmp_path / "model.onnx", opset=18, ir_version=10)
    outputs = [o.name for o in onnx.load(str(tmp_path / "model.onnx")).graph.output]
    assert outputs == [prep.output_name, SIZE_OUTPUT]
    images = [s.image for s in _disk_samples(2, 3)]
    report = check_parity(
        checkpoint_segmenter(sized), Segmenter.from_onnx(tmp_path / "model.onnx", prep), images, 1e-4
    )
    assert report["passed"] and report["size_max_abs_diff"] < 1e-3


def test_the_int8_variant_keeps_the_size_head_in_float(sized, tmp_path):
    model, prep = load_checkpoint(sized)
    export_onnx(model, prep, tmp_path / "model.onnx", opset=18, ir_version=10)
    views = [size_view(normalize(s.image, prep), prep.pad_multiple)[None] for s in _disk_samples(3, 4)]
    quantize(tmp_path / "model.onnx", tmp_path / "int8.onnx", views, prep.input_name)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if "size_head" in n.name}
    assert "MatMul" in ops and not any(op.startswith("QLinear") for op in ops)
    fp32, int8 = (Segmenter.from_onnx(tmp_path / name, prep) for name in ("model.onnx", "int8.onnx"))
    # It runs (ONNX Runtime refused a quantized head). How far int8 rounding moves the estimate
    # depends on the model: a two-epoch network's features spread too little to say.
    for view in views:
        assert np.isfinite(int8.estimate(view)).all() and np.isfinite(fp32.estimate(view)).all()


def test_a_model_without_a_size_head_says_so():
    prep = Preprocessing(in_channels=1, mean=0.0, std=1.0, pad_multiple=1, threshold=0.5)
    with pytest.raises(UserError, match="no size head"):
        Segmenter(lambda b: b, prep).estimate(np.zeros((1, 1, 8, 8), np.float32))


class PiecesModel:
    """A stand-in network trained at 20 px objects that, shown an object over 1.5x that size,
    cuts it into a grid of 20-pixel pieces (seed channel cut along lines every 20 px): it then
    measures pieces of the trained size, and refining from its own objects stays put."""

    def __init__(self):
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes += [tuple(x.shape[1:]) for x in batch]
        fg = np.where(batch[:, :1] > 0, 8.0, -8.0).astype(np.float32)
        seed = fg.copy()
        for i, x in enumerate(batch[:, 0] > 0):
            self.cut(seed[i, 0], ndi.label(x)[0])
        return np.concatenate([fg, seed], axis=1)

    def cut(self, seed: np.ndarray, ids: np.ndarray) -> None:
        """Cut the objects `ids` in the seed logits `seed`, in place."""
        sizes = 2 * np.sqrt(np.bincount(ids.ravel())[1:] / np.pi)
        large = np.isin(ids, 1 + np.flatnonzero(sizes > 30))
        cuts = np.zeros_like(large)
        cuts[::20, :] = cuts[:, ::20] = True
        seed[large & cuts] = -8.0


def true_size_head(batch: np.ndarray) -> np.ndarray:
    """A size head that is right: log(largest disk's diameter as shown / 20)."""
    out = []
    for x in batch[:, 0] > 0:
        ids, _ = ndi.label(x)
        out.append(np.log(2 * np.sqrt(np.bincount(ids.ravel())[1:].max() / np.pi) / 20))
    return np.array(out, np.float32)


def _segmenter(model, estimate=None) -> Segmenter:
    prep = Preprocessing(
        in_channels=1, mean=0.0, std=1.0, pad_multiple=1, threshold=0.5, scaling="range",
        instances="distance", seed_threshold=0.5, train_diameter=20.0, data_diameter=20.0,
        diameter="auto", size_output=SIZE_OUTPUT if estimate else "",
    )  # fmt: skip
    return Segmenter(model, prep, estimate_batch=estimate)


def test_a_size_head_frees_the_estimate_from_a_model_that_cuts_large_objects_into_trained_size_pieces():
    truth = disks(240, 30, 120)  # four disks 60 px across, three times the trained 20 px
    image = (truth > 0).astype(np.uint8) * 255
    model = PiecesModel()
    [alone] = _segmenter(model).predict([image])
    # The pieces measure about the trained 20 px: refining stays near the first guess, in pieces.
    assert alone.instances.max() > 4 * 5 and all(h > 200 for h, _ in model.shapes)
    model.shapes.clear()
    [helped] = _segmenter(model, true_size_head).predict([image])
    # The head's start shows the disks (61 px) at 20 px, 240 / 3.05: whole, sharing no outline, kept.
    assert 76 <= model.shapes[-1][0] <= 80
    assert helped.instances.max() == 4 and helped.instances.shape == image.shape


class QuarteringModel(PiecesModel):
    """Like PiecesModel, but an object shown over twice the trained 20 px is cut in quarters
    through its centre, by bands a tenth of its width (they survive resizing back)."""

    def cut(self, seed: np.ndarray, ids: np.ndarray) -> None:
        for k, (rows, cols) in enumerate(ndi.find_objects(ids), start=1):
            width = cols.stop - cols.start
            if width <= 40:
                continue
            cy, cx = ndi.center_of_mass(ids == k)
            band = max(1, width // 20)
            seed[rows, round(cx) - band : round(cx) + band] = -8.0
            seed[round(cy) - band : round(cy) + band, cols] = -8.0


def test_the_size_heads_start_loses_where_its_objects_share_more_outline():
    truth = disks(240, 10, 40)  # disks 21 px across: the trained size, whole at native scale
    image = (truth > 0).astype(np.uint8) * 255

    def wrong_head(batch):  # reads objects a third of their size: enlarge 3x, where they are cut up
        return true_size_head(batch) - np.log(3)

    model = QuarteringModel()
    [prediction] = _segmenter(model, wrong_head).predict([image])
    head_end = model.shapes[-1][0]
    assert head_end > 400  # the head's start ran and its refinement ended on quarters (21 px at 2x)
    assert prediction.instances.max() == truth.max() and shared_outline(prediction.instances) == 0.0
