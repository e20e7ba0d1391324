"""segflow.config: params.yaml validation and its error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segflow.config import Params, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_repository_params_yaml_validates():
    params = load_params(ROOT / "params.yaml")

    assert isinstance(params, Params)
    assert params.split.train + params.split.val + params.split.test == pytest.approx(1.0)
    assert params.train.encoder_weights is None  # nothing downloads by default


def test_load_params_defaults_to_params_yaml_at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT / "segflow")  # any folder inside the checkout finds the root

    assert load_params() == load_params(ROOT / "params.yaml")


def test_params_error_is_a_value_error():
    assert issubclass(ParamsError, ValueError)


def test_unknown_key_names_its_path_and_the_allowed_keys():
    message = error_of({"train": {"epoch": 10}})

    assert "train.epoch" in message
    assert "unknown key" in message
    assert "epochs" in message
    assert "batch_size" in message


def test_unknown_nested_key_lists_the_keys_of_its_own_section():
    message = error_of({"base": {"normalize": {"meen": 0.5}}})

    assert "base.normalize.meen" in message
    assert "mean" in message and "std" in message


def test_unknown_top_level_section_lists_the_sections():
    message = error_of({"trian": {}})

    assert "trian" in message
    for section in ("base", "ingest", "split", "train", "evaluate", "export"):
        assert section in message


def test_wrong_type_names_the_key_and_the_value():
    message = error_of({"train": {"epochs": "ten"}})

    assert "train.epochs" in message
    assert "'ten'" in message


def test_out_of_range_value_names_the_key():
    message = error_of({"train": {"epochs": 0}})

    assert "train.epochs" in message


def test_split_ratios_not_summing_to_one_name_split_and_the_sum():
    message = error_of({"split": {"train": 0.7, "val": 0.2, "test": 0.2}})

    assert "split" in message
    assert "1.1" in message


def _model_names_error(train: dict) -> str:
    from segflow.train.models import check_model_names

    params = parse_params({"train": train})  # valid params.yaml: names are checked where a net is built
    with pytest.raises(ParamsError) as info:
        check_model_names(params.train)
    return str(info.value)


def test_unknown_encoder_names_the_key_and_suggests_close_names():
    message = _model_names_error({"encoder": "resnet1"})

    assert "train.encoder" in message
    assert "'resnet1'" in message
    assert "resnet18" in message and "resnet34" in message


def test_unknown_architecture_lists_the_architectures():
    message = _model_names_error({"architecture": "Unett"})

    assert "train.architecture" in message
    assert "'Unett'" in message
    assert "Unet" in message and "FPN" in message


def test_loading_params_does_not_import_the_training_libraries():
    # Every stage loads params.yaml; importing smp there cost ingest and split about 6 s each.
    code = "import sys; from segflow.config import load_params; load_params(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "False"


def test_named_encoder_weights_are_rejected_because_they_would_download():
    message = error_of({"train": {"encoder_weights": "imagenet"}})

    assert "train.encoder_weights" in message
    assert "download" in message


def test_local_encoder_weights_file_is_accepted():
    params = parse_params({"train": {"encoder_weights": "weights/resnet18.pth"}})

    assert params.train.encoder_weights == "weights/resnet18.pth"


def test_semantic_masks_without_mask_values_are_rejected():
    message = error_of({"ingest": {"mask_kind": "semantic"}})

    assert "ingest" in message
    assert "mask_values" in message


def test_semantic_masks_with_mask_values_are_accepted():
    params = parse_params({"ingest": {"mask_kind": "semantic", "mask_values": [0, 255]}})

    assert params.ingest.mask_values == [0, 255]


def test_every_bad_key_is_reported_at_once():
    message = error_of({"train": {"epoch": 10}, "inference": {"threshold": 2}})

    assert "train.epoch" in message
    assert "inference.threshold" in message


def test_digest_is_stable_for_equal_values():
    a = parse_params({"train": {"epochs": 3, "lr": 0.01}, "base": {"seed": 1}})
    b = parse_params({"base": {"seed": 1}, "train": {"lr": 0.01, "epochs": 3}})

    assert a.digest() == b.digest()
    assert load_params(ROOT / "params.yaml").digest() == load_params(ROOT / "params.yaml").digest()
    assert len(a.digest()) == 64
    int(a.digest(), 16)  # hex


def test_digest_changes_when_a_value_changes():
    base = parse_params({})

    assert parse_params({"train": {"epochs": 21}}).digest() != base.digest()
    assert parse_params({"base": {"normalize": {"std": 0.3}}}).digest() != base.digest()


def test_load_params_on_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ParamsError, match="not found") as info:
        load_params(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("train:\n  epochs: [1, 2\n", "not valid YAML"), ("- train\n- split\n", "mapping")],
    ids=["invalid-yaml", "list-not-mapping"],
)
def test_load_params_on_a_malformed_file_names_the_file(tmp_path, text, problem):
    path = tmp_path / "params.yaml"
    path.write_text(text)

    with pytest.raises(ParamsError, match=problem) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_load_params_reports_bad_values_with_the_file_and_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epoch: 3\n")

    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "train.epoch" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ({"train": {"decoder_channels": [16, 16, 16]}}, "train.decoder_channels", "5 positive"),
        ({"train": {"crop_size": 100}}, "train.crop_size", "multiple of 32"),
        (
            {
                "ingest": {"mask_kind": "semantic", "mask_values": [0, 1]},
                "convert": {"foreground_values": [255]},
            },
            "convert.foreground_values",
            "every mask would be empty",
        ),
    ],
    ids=["decoder-depth", "crop-not-multiple-of-32", "foreground-not-a-mask-value"],
)
def test_values_the_network_or_data_cannot_use_fail_early(override, key, words):
    with pytest.raises(ParamsError) as info:
        parse_params(override)
    assert key in str(info.value) and words in str(info.value)


@pytest.mark.parametrize(
    ("split", "words"),
    [
        ({"group_regex": "(unclosed"}, "split.group_regex: not a valid regular expression"),
        ({"group_regex": "^(p)_", "group_column": "well"}, "group_regex or group_column, not both"),
        ({"split_file": "splits.csv", "stratify": True}, "stratify does not apply with split_file"),
    ],
)
def test_split_grouping_options_are_checked(split, words):
    with pytest.raises(ParamsError) as caught:
        parse_params({"split": split})
    assert words in str(caught.value)


def test_watershed_needs_instance_ids_and_auto_resolves():
    semantic = {"ingest": {"mask_kind": "semantic", "mask_values": [0, 255]}}
    assert parse_params(semantic).instance_method() == "components"
    assert parse_params({}).instance_method() == "watershed"  # instance masks by default
    message = error_of(semantic | {"inference": {"instances": "watershed"}})
    assert "inference.instances: components" in message


def test_tiles_must_fit_the_network():
    assert "multiple of 32" in error_of({"inference": {"tile_size": 500}})
    assert "twice tile_overlap" in error_of({"inference": {"tile_size": 128, "tile_overlap": 64}})


def test_size_and_tta_settings_are_checked():
    assert "train.crop_size" in error_of({"train": {"crop_size": None, "diameter": 30}})
    assert "train.crop_size" in error_of({"train": {"crop_size": None, "augment": {"scale": 0.2}}})
    assert "at least one mode" in error_of({"inference": {"tta_grid": []}})
    # Ties in tuning go to the earlier mode, so the grid is ordered by cost whatever its order.
    assert parse_params({"inference": {"tta_grid": ["d4", "none", "flips"]}}).inference.tta_grid == [
        "none",
        "flips",
        "d4",
    ]
    assert "positive number" in error_of({"inference": {"diameter": -1}})
    # Size choices are multiples of the estimate; one alone, such as 0.85, is a fixed correction.
    assert parse_params({"inference": {"diameter_choices": [0.85]}}).inference.diameter_choices == [0.85]
    assert "between 0.25 and 4" in error_of({"inference": {"diameter_choices": [0, 1.0]}})
    assert "one or more multipliers" in error_of({"inference": {"diameter_choices": []}})
    grid = parse_params({"inference": {"diameter_choices_grid": [[1.2, 1.0, 0.7], [0.85], [1.0], [1, 1.0]]}})
    # Fewest extra model passes first (the estimate's own run is no extra pass), ties as written.
    assert grid.inference.diameter_choices_grid == [[1.0], [0.85], [0.7, 1.0, 1.2]]
