"""Config files load the configs they build on relative to their own file: a copy of configs/
anywhere, read from any directory, gives the same configs as the clone's."""

import shutil
from pathlib import Path

import pytest

from sdjax import config_lib

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
