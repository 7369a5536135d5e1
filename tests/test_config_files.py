"""Config files load the configs they build on relative to their own file: a copy of configs/
anywhere, read from any directory, gives the same configs as the clone's."""

import dataclasses
import shutil
from pathlib import Path

import ml_collections
import pytest

from sdjax import config_lib, datasets

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(path.name for path in (ROOT / "configs").glob("*.py"))


def test_there_are_config_files_that_build_on_others():
    builders = [
        name for name in CONFIG_FILES if "load_config_file" in (ROOT / "configs" / name).read_text()
    ]
    assert len(builders) >= 6, builders


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_a_copy_of_configs_loads_from_anywhere_like_the_clone(name, tmp_path, monkeypatch):
    expected = {
        profile: config_lib.load_config_file(ROOT / "configs" / name, profile)
        for profile in ("", "tiny")
    }
    copy = tmp_path / "somewhere" / "my_configs"
    shutil.copytree(ROOT / "configs", copy)
    # As in an installed wheel: no configs/ next to the package, and another working directory.
    monkeypatch.setattr(config_lib, "CONFIGS_DIR", tmp_path / "no_such_dir")
    monkeypatch.chdir(tmp_path)
    for profile, config in expected.items():
        loaded = config_lib.load_config_file(
            f"somewhere/my_configs/{name}:{profile}" if profile else f"somewhere/my_configs/{name}"
        )
        assert loaded.to_dict() == config.to_dict(), (name, profile)


def test_a_bare_name_is_looked_up_in_the_clones_configs():
    assert config_lib.load_config_file("yeast", "tiny") == config_lib.load_config_file(
        ROOT / "configs" / "yeast.py", "tiny"
    )


def test_a_missing_config_file_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"^`path`: got '.*/nope\.py', no such config file\.$"
    ):
        config_lib.load_config_file(tmp_path / "nope.py")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_takes_the_tiny_profile_the_same_way(name):
    full = config_lib.load_config_file(ROOT / "configs" / name)
    tiny = config_lib.load_config_file(ROOT / "configs" / name, "tiny")
    # The shared short run, on the dataset's tiny build where it has one.
    assert (tiny.num_train_steps, tiny.batch_size, tiny.linear_eval.num_steps) == (24, 64, 30)
    assert tiny.dataset.name == (datasets.DATASETS[full.dataset.name].tiny or full.dataset.name)
    assert (tiny.method, tiny.framework, tiny.loss.positives) == (
        full.method,
        full.framework,
        full.loss.positives,
    )


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("profile", config_lib.PROFILES)
def test_the_encoders_input_size_comes_from_the_dataset(name, profile, monkeypatch):
    config = config_lib.load_config_file(ROOT / "configs" / name, profile)
    field = config_lib.INPUT_SIZE_FIELDS.get(config.model.encoder.name)
    if field is None:  # bag_of_ngrams: texts of any length
        assert config.model.encoder.name == "bag_of_ngrams"
        return
    assert config.model.encoder[field] == datasets.input_shape(config.dataset)[-1]
    # Nothing in the file says it: another shape in the registry gives another size.
    dataset = datasets.DATASETS[config.dataset.name]
    monkeypatch.setitem(
        datasets.DATASETS,
        config.dataset.name,
        dataclasses.replace(dataset, input_shape=lambda options: (5, 5, 7)),
    )
    assert config_lib.load_config_file(ROOT / "configs" / name, profile).model.encoder[field] == 7


def test_the_registry_knows_the_input_shape_that_loading_gives(data_dir, tmp_path):
    for name, data in [("mnist_mosaic_tiny", data_dir), ("yeast", str(tmp_path))]:
        loaded = datasets.load_split(name, "test", data_dir=data)
        config = ml_collections.ConfigDict({"name": name})
        assert datasets.input_shape(config) == loaded["inputs"].shape[1:], name
