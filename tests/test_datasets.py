"""The embedded datasets: Fashion-MNIST mosaics, Yeast and Debtags, their splits and views.

Fashion-MNIST and Debtags read files that a Debian package or `apt-get update` puts on a machine,
so these tests write small files in the same formats; Yeast ships in the river wheel and is
tested on the real data.
"""

import csv
import gzip
import importlib.resources
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece
from flax import nnx

from sdjax import config_lib, datasets, modalities, models, tokenizer, train
from sdjax.datasets import debtags, fashion_mosaic, yeast
from sdjax.datasets.sources import tfds_source

# ---------------------------------------------------------------------------------------------
# Fashion-MNIST mosaics
# ---------------------------------------------------------------------------------------------


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Idx files in the Fashion-MNIST layout: 60 train and 30 test images, 10 classes."""
    directory = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, size in (("train", 60), ("test", 30)):
        images = rng.integers(0, 256, (size, 28, 28))
        classes = np.arange(size) % 10
        images_file, labels_file = fashion_mosaic.IDX_FILES[split]
        write_idx(directory / images_file, images)
        write_idx(directory / labels_file, classes)
    return directory


def test_idx_files_round_trip(fashion_dir):
    images, classes = fashion_mosaic.load_source_images("test", str(fashion_dir))
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(classes, np.arange(30) % 10)


def test_fashion_mosaics_are_made_of_their_own_split(fashion_dir):
    pools = {
        s: fashion_mosaic.load_source_images(s, str(fashion_dir))[0] for s in ("train", "test")
    }
    for split in ("train", "test"):
        made = fashion_mosaic.make_fashion_mosaic(
            split, num_examples=40, seed=0, source_dir=str(fashion_dir)
        )
        assert made["image"].shape == (40, 56, 56, 1) and made["image"].dtype == np.uint8
        assert made["labels"].shape == (40, 10) and made["labels"].dtype == np.float32
        _, classes = fashion_mosaic.load_source_images(split, str(fashion_dir))
        for image, labels, sources in zip(
            made["image"], made["labels"], made["source_index"], strict=True
        ):
            cells = [image[:28, :28, 0], image[:28, 28:, 0], image[28:, :28, 0], image[28:, 28:, 0]]
            for cell, source in zip(cells, sources, strict=True):
                np.testing.assert_array_equal(cell, pools[split][source])
            assert set(np.flatnonzero(labels)) == set(classes[sources])
    # Disjoint sources: no train mosaic cell is any test image (random pixels never collide).
    train = fashion_mosaic.make_fashion_mosaic(
        "train", num_examples=40, seed=0, source_dir=str(fashion_dir)
    )
    test_images = {image.tobytes() for image in pools["test"]}
    assert not any(
        train["image"][i, r : r + 28, c : c + 28, 0].tobytes() in test_images
        for i in range(40)
        for r in (0, 28)
        for c in (0, 28)
    )


def test_fashion_builder_serves_the_mosaics_and_explains_missing_files(
    fashion_dir, tmp_path, monkeypatch
):
    loaded = datasets.load_split(
        "fashion_mosaic_tiny", "test", data_dir=str(tmp_path), source_dir=str(fashion_dir)
    )
    made = fashion_mosaic.make_fashion_mosaic(
        "test", num_examples=256, seed=0, source_dir=str(fashion_dir)
    )
    np.testing.assert_array_equal(loaded["inputs"], made["image"])
    np.testing.assert_array_equal(loaded["labels"], made["labels"])
    monkeypatch.setattr(fashion_mosaic, "DEBIAN_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mosaic.load_source_images("train", str(tmp_path / "empty"), str(tmp_path))


def test_fashion_validation_mosaics_come_from_held_out_training_images(fashion_dir):
    _, classes = fashion_mosaic.load_source_images("train", str(fashion_dir))
    held = fashion_mosaic.validation_sources(classes, seed=0)
    # 15% of each class's 6 training images rounds to one per class.
    assert sorted(classes[held].tolist()) == list(range(10))
    np.testing.assert_array_equal(held, fashion_mosaic.validation_sources(classes, seed=0))
    sources = {}
    for split in ("train", "validation"):
        made = fashion_mosaic.make_fashion_mosaic(
            split, num_examples=40, seed=0, source_dir=str(fashion_dir), with_validation=True
        )
        sources[split] = set(made["source_index"].ravel())
    assert sources["validation"] <= set(held)
    assert not sources["train"] & set(held)  # and test mosaics read the other file


# ---------------------------------------------------------------------------------------------
# Yeast (the real data in river's wheel)
# ---------------------------------------------------------------------------------------------


def read_yeast_with_csv():
    source = importlib.resources.files("river") / "datasets" / "yeast.csv.gz"
    with importlib.resources.as_file(source) as path, gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    header, values = rows[0], np.array(rows[1:], dtype=np.float64)
    assert header[102] == "Att103" and header[103] == "Class1" and len(header) == 117
    return values[:, :103], values[:, 103:]


def test_yeast_splits_are_a_fixed_partition_of_the_real_table():
    features, labels = read_yeast_with_csv()
    train_rows, test_rows = yeast.split_indices("train"), yeast.split_indices("test")
    assert (len(train_rows), len(test_rows)) == (1500, 917)
    assert not set(train_rows) & set(test_rows)
    assert sorted({*train_rows, *test_rows}) == list(range(2417))
    np.testing.assert_array_equal(train_rows, yeast.split_indices("train"))
    for split, rows in (("train", train_rows), ("test", test_rows)):
        arrays = yeast.make_split(split)
        assert arrays["features"].shape == (len(rows), 103)
        assert arrays["features"].dtype == np.float32 and arrays["labels"].dtype == np.float32
        np.testing.assert_array_equal(arrays["labels"], labels[rows])
        # Standardised with the training split's statistics.
        mean, std = features[train_rows].mean(0), features[train_rows].std(0) + 1e-6
        np.testing.assert_allclose(arrays["features"], (features[rows] - mean) / std, atol=1e-4)
    assert labels.shape == (2417, 14) and labels.sum(1).min() >= 1  # every gene has a label


def test_yeast_validation_is_300_fixed_training_rows(tmp_path):
    positions = yeast.validation_positions()
    assert len(positions) == 300 and len(set(positions)) == 300
    assert positions.min() >= 0 and positions.max() < 1500
    np.testing.assert_array_equal(positions, yeast.validation_positions())
    train = datasets.load_split("yeast", "train", data_dir=str(tmp_path))
    held = datasets.load_split("yeast", "validation", data_dir=str(tmp_path))
    rest = datasets.load_split("yeast", "train_without_validation", data_dir=str(tmp_path))
    np.testing.assert_array_equal(held["inputs"], train["inputs"][positions])
    others = np.setdiff1d(np.arange(1500), positions)
    np.testing.assert_array_equal(rest["labels"], train["labels"][others])
    np.testing.assert_array_equal(rest["inputs"], train["inputs"][others])
    # Their genes are training genes, so none is a test gene.
    validation_rows = yeast.split_indices("train")[positions]
    assert not set(validation_rows) & set(yeast.split_indices("test"))


def test_yeast_loads_through_tfds_in_file_order(tmp_path):
    loaded = datasets.load_split("yeast", "test", data_dir=str(tmp_path))
    made = yeast.make_split("test")
    np.testing.assert_array_equal(loaded["inputs"], made["features"])
    np.testing.assert_array_equal(loaded["labels"], made["labels"])
    with pytest.raises(ValueError, match="`split`: got 'validation'"):
        yeast.split_indices("validation")


# ---------------------------------------------------------------------------------------------
# Debtags (apt lists written in apt's formats)
# ---------------------------------------------------------------------------------------------

TOPIC_TAGS = ["use::editing", "works-with::image", "interface::x11", "game::puzzle"]


def fake_corpus(num_packages=240, seed=0):
    """(name, md5, synopsis, long description, tags): each topic tag has a telling word."""
    rng = np.random.default_rng(seed)
    words = {"use::editing": "editor", "works-with::image": "pictures", "interface::x11": "window"}
    words["game::puzzle"] = "puzzle"
    packages = []
    for i in range(num_packages):
        tags = [t for t in TOPIC_TAGS if rng.random() < 0.45] or [TOPIC_TAGS[i % 4]]
        name = f"tool{i:03d}"
        if i % 4 == 0:  # a naming convention that gives a tag away
            name, tags = f"lib{name}-perl", [*tags, "devel::lang:perl"]
        if i % 50 == 0:
            tags.append("field::chemistry")  # rare: 5 packages
        tags.append("special::not-yet-tagged" if i % 7 == 0 else "role::program")
        text = " ".join(words[t] for t in tags if t in words) + f" program number {i}"
        packages.append((name, f"{i:032x}", f"synopsis of {name}", text, sorted(tags)))
    return packages


def write_apt_lists(directory, packages):
    """A Packages list (gzip) and a Translation-en list (plain), as apt stores them."""
    directory.mkdir(parents=True, exist_ok=True)
    stanzas, translations = [], []
    for name, md5, synopsis, text, tags in packages:
        tag_lines = ", ".join(tags[:2]) + (",\n " + ", ".join(tags[2:]) if tags[2:] else "")
        stanzas.append(
            f"Package: {name}\nVersion: 1.0\nDescription: {synopsis}\n"
            f"Description-md5: {md5}\nTag: {tag_lines}\nSection: misc\n"
        )
        translations.append(
            f"Package: {name}\nDescription-md5: {md5}\nDescription-en: {synopsis}\n"
            f" {text}\n .\n Second paragraph of {name}.\n"
        )
    stanzas.append("Package: untagged\nVersion: 1\nDescription: x\nDescription-md5: 0\n")
    with gzip.open(directory / "example_dists_main_binary-amd64_Packages.gz", "wt") as f:
        f.write("\n".join(stanzas))
    (directory / "example_dists_main_i18n_Translation-en").write_text("\n".join(translations))


@pytest.fixture(scope="module")
def apt_lists(tmp_path_factory):
    directory = tmp_path_factory.mktemp("apt") / "lists"
    write_apt_lists(directory, fake_corpus())
    return directory


def test_debtags_corpus_reads_apt_lists(apt_lists):
    corpus = debtags.read_corpus(apt_lists)
    expected = {name: (text, tags) for name, _, _, text, tags in fake_corpus()}
    assert [name for name, _, _ in corpus] == sorted(expected)  # "untagged" is not there
    for name, text, tags in corpus:
        assert tags == tuple(expected[name][1])
        assert text == f"{expected[name][0]}\n\nSecond paragraph of {name}."


def test_debtags_cleaning_drops_leaks_bookkeeping_and_rare_tags(apt_lists):
    examples, kept, decisions = debtags.clean_corpus(debtags.read_corpus(apt_lists))
    assert kept == sorted([*TOPIC_TAGS, "role::program"])
    assert decisions["name_leaks"]["devel::lang:perl"]["convention"] == "lib*-perl"
    assert decisions["rare_tags_dropped"] == 1  # field::chemistry
    expected = {name: tags for name, _, _, _, tags in fake_corpus()}
    for name, _, labels in examples:
        assert labels == tuple(t for t in expected[name] if t in kept)


def test_debtags_split_is_a_deterministic_partition(apt_lists):
    names = [name for name, _, _ in debtags.read_corpus(apt_lists)]
    train, test = debtags.split_names(names, "train"), debtags.split_names(names, "test")
    assert not set(train) & set(test) and sorted(train + test) == sorted(names)
    assert len(test) == round(0.2 * len(names))
    assert debtags.split_names(names, "test") == test


def test_debtags_builder_stores_inputs_and_multi_hot_labels(apt_lists, tmp_path):
    import tensorflow_datasets as tfds

    kept = sorted([*TOPIC_TAGS, "role::program"])  # the fixture's tags that survive cleaning
    expected = {name: (text, tags) for name, _, _, text, tags in fake_corpus()}
    for split in ("train", "test"):
        source = tfds_source("debtags/default", split, str(tmp_path), str(apt_lists))
        names = debtags.split_names(sorted(expected), split)
        assert len(source) == len(names)
        for i, name in enumerate(names):
            example = source[i]
            assert set(example) == {"inputs", "labels", "package"}
            assert example["package"].decode() == name
            text, tags = expected[name]
            assert example["inputs"].decode() == f"{text}\n\nSecond paragraph of {name}."
            assert example["labels"].dtype == np.float32
            assert example["labels"].tolist() == [float(tag in tags) for tag in kept]
    # Prepared data declares its label columns without reading the apt lists again.
    builder = tfds.builder("debtags/default", data_dir=str(tmp_path), source_dir=str(tmp_path))
    assert builder.info.metadata["tags"] == kept
    assert builder.info.features["labels"].shape == (len(kept),)
    assert str(builder.info.version) == "1.3.0"


def test_debtags_digest_tells_apart_data_from_different_apt_lists(apt_lists, tmp_path):
    same = debtags.digest(str(tmp_path / "a"), str(apt_lists))
    assert len(same) == 64 and debtags.digest(str(tmp_path / "b"), str(apt_lists)) == same
    packages = fake_corpus()
    name, md5, synopsis, text, tags = packages[5]
    new_tag = next(t for t in TOPIC_TAGS if t not in tags)
    variants = [
        (name, md5, synopsis, text + " again", tags),  # one description changed
        (name, md5, synopsis, text, sorted([*tags, new_tag])),  # one tag added
        None,  # one package fewer
    ]
    digests = set()
    for i, variant in enumerate(variants):
        lists = tmp_path / f"lists{i}"
        write_apt_lists(lists, [*packages[:5], *([variant] if variant else []), *packages[6:]])
        digests.add(debtags.digest(str(tmp_path / f"data{i}"), str(lists)))
    assert same not in digests and len(digests) == len(variants)


def test_debtags_loads_token_ids_and_multi_hot_tags(apt_lists, tmp_path):
    options = dict(data_dir=str(tmp_path), source_dir=str(apt_lists), vocab_size=64, max_length=12)
    train = datasets.load_split("debtags", "train", **options)
    test = datasets.load_split("debtags", "test", **options)
    assert train["inputs"].dtype == np.int32 and train["inputs"].shape == (192, 12)
    assert test["inputs"].shape == (48, 12) and test["labels"].shape == (48, 5)
    assert list(test["label_names"]) == sorted([*TOPIC_TAGS, "role::program"])
    kept = list(test["label_names"])
    expected = {name: tags for name, _, _, _, tags in fake_corpus()}
    names = debtags.split_names(sorted(expected), "test")
    for row, name in enumerate(names):
        assert {kept[i] for i in np.flatnonzero(test["labels"][row])} == (
            set(expected[name]) & set(kept)
        )
    # The token ids are the cached tokenizer's encoding of the long description.
    model_path = next((tmp_path / "sdjax_tokenizers").glob("*.model"))
    text = debtags.read_corpus(apt_lists)[
        [n for n, _, _ in debtags.read_corpus(apt_lists)].index(names[0])
    ][1]
    np.testing.assert_array_equal(
        test["inputs"][0], tokenizer.encode(model_path, [text], max_length=12)[0]
    )
    # The raw corpus (for non-neural references) has the same rows and tag columns.
    corpus, tag_names = debtags.corpus(str(tmp_path), str(apt_lists))
    assert corpus["test"][0][0] == text and tag_names == kept
    np.testing.assert_array_equal(corpus["test"][1], test["labels"])
    assert train["inputs"].max() < 64 and (train["inputs"] != tokenizer.PAD_ID).any(axis=1).all()


def test_debtags_validation_is_a_hash_of_the_package_name(apt_lists, tmp_path):
    import hashlib

    names = sorted(name for name, _, _, _, _ in fake_corpus())
    train_names, test_names = (
        debtags.split_names(names, "train"),
        debtags.split_names(names, "test"),
    )

    def hashed_low(name):  # the rule, written out: the first 8 bytes of SHA-256 below 15%
        return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64 < 0.15

    expected = [name for name in train_names if hashed_low(name)]
    assert 0.08 < len(expected) / len(train_names) < 0.22  # 192 names: about 29 expected
    options = dict(data_dir=str(tmp_path), source_dir=str(apt_lists), vocab_size=64, max_length=12)
    corpus, _ = debtags.corpus(
        str(tmp_path), str(apt_lists), ("train", "validation", "train_without_validation", "test")
    )
    by_text = {text: name for name, text, _ in debtags.read_corpus(apt_lists)}
    split_names = {split: [by_text[t] for t in texts] for split, (texts, _) in corpus.items()}
    assert split_names["validation"] == expected
    assert split_names["train_without_validation"] == [n for n in train_names if n not in expected]
    assert not set(split_names["validation"]) & set(test_names)
    train = datasets.load_split("debtags", "train", **options)
    held = datasets.load_split("debtags", "validation", **options)
    positions = [train_names.index(name) for name in expected]
    np.testing.assert_array_equal(held["labels"], train["labels"][positions])
    np.testing.assert_array_equal(held["inputs"], train["inputs"][positions])  # one tokenizer


def test_example_limits_cut_examples_not_the_label_names(apt_lists, tmp_path):
    dataset = ml_collections.ConfigDict(
        {
            "name": "debtags",
            "data_dir": str(tmp_path),
            "source_dir": str(apt_lists),
            "vocab_size": 64,
            "max_length": 12,
            "train_examples": 10,
            "test_examples": 3,
        }
    )
    train_split, test_split = datasets.load_train_and_test(dataset)
    assert train_split["inputs"].shape == (10, 12) and test_split["labels"].shape == (3, 5)
    assert len(test_split["label_names"]) == 5


def test_missing_apt_lists_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get update -o Acquire::Languages=en"):
        debtags.read_corpus(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer, views and the text encoder
# ---------------------------------------------------------------------------------------------


def test_tokenizer_is_trained_once_and_pads_with_zero(tmp_path):
    texts = [f"the editor opens pictures number {i}" for i in range(50)]
    first = tokenizer.cached_tokenizer(texts, vocab_size=40, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert tokenizer.cached_tokenizer(texts, vocab_size=40, cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    tokens = tokenizer.encode(first, ["editor", texts[0] * 5], max_length=8)
    assert tokens.shape == (2, 8) and tokens.dtype == np.int32
    ids = sentencepiece.SentencePieceProcessor(model_file=str(first)).encode("editor")
    assert 0 < len(ids) < 8 and tokenizer.PAD_ID not in ids
    np.testing.assert_array_equal(tokens[0], ids + [tokenizer.PAD_ID] * (8 - len(ids)))
    assert (tokens[1] != tokenizer.PAD_ID).all()  # truncated, not padded
    with pytest.raises(ValueError, match="`max_length`: got 0"):
        tokenizer.encode(first, texts, max_length=0)


def test_case_folding_tokenizer_encodes_any_case_as_lower_case(tmp_path):
    texts = [f"The Editor opens PNG pictures, number {i}" for i in range(50)]
    kept = tokenizer.cached_tokenizer(texts, vocab_size=40, cache_dir=tmp_path)
    folded = tokenizer.cached_tokenizer(texts, vocab_size=40, cache_dir=tmp_path, case_fold=True)
    assert folded != kept and kept.exists()  # cached side by side
    mixed, lower = "The EDITOR opens Png", "the editor opens png"
    tokens = tokenizer.encode(folded, [mixed, lower], max_length=16)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folded))
    pieces = processor.encode(mixed, out_type=str)
    assert "".join(pieces).replace("\u2581", " ").strip() == lower
    # Without folding, case is part of the text.
    tokens = tokenizer.encode(kept, [mixed, lower], max_length=16)
    assert not np.array_equal(tokens[0], tokens[1])


def test_text_views_delete_tokens_but_never_all():
    tokens = jnp.array([[5, 6, 7, 8, 0, 0], [9, 0, 0, 0, 0, 0]], jnp.int32)
    views = modalities.TEXT.make_views(jax.random.key(0), tokens, num_views=64)
    assert views.shape == (2, 64, 6)
    views = np.asarray(views)
    # A view keeps or pads each token; padding stays padding; no view is empty.
    assert np.all((views == np.asarray(tokens)[:, None]) | (views == 0))
    assert np.all((views != 0).any(axis=2))
    kept = (views[0, :, :4] != 0).mean()
    assert 0.8 < kept < 0.97  # about 1 - TOKEN_DROPOUT


def test_tabular_views_add_noise_and_drop_features():
    features = jnp.ones((4, 200), jnp.float32)
    views = np.asarray(modalities.TABULAR.make_views(jax.random.key(1), features, 2))
    assert views.shape == (4, 2, 200)
    dropped = views == 0
    assert 0.05 < dropped.mean() < 0.15
    noise = views[~dropped] - 1.0
    assert 0.08 < noise.std() < 0.12 and abs(noise.mean()) < 0.01


@pytest.mark.slow
def test_text_encoder_ignores_padding():
    encoder = models.TextTransformerEncoder(
        vocab_size=50, max_length=10, width=16, depth=2, num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0)
    )
    short = jnp.array([[4, 9, 13, 0, 0, 0]])
    longer = jnp.array([[4, 9, 13, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(encoder(short), encoder(longer), atol=1e-5)
    other = jnp.array([[4, 9, 14, 0, 0, 0]])
    assert not np.allclose(encoder(short), encoder(other))
    assert encoder(short).shape == (1, 16)
    with pytest.raises(ValueError, match="width: got 15, expected a multiple of num_heads=2"):
        models.TextTransformerEncoder(
            vocab_size=5, max_length=4, width=15, num_heads=2, rngs=nnx.Rngs(0)
        )


# ---------------------------------------------------------------------------------------------
# Each modality's tiny config trains end to end
# ---------------------------------------------------------------------------------------------


def run_tiny(config_name, workdir, **overrides):
    config = config_lib.load_config_file(config_name, "tiny")
    results = train.train_and_evaluate(config_lib.override(config, **overrides), workdir)
    heldout = results["heldout_stage1_loss"]
    assert heldout["final"] < heldout["initial"] - 0.01, heldout
    for probe in ("linear_eval", "random_init"):
        assert all(np.isfinite(v) for v in results[probe].values()), results[probe]
    return results


@pytest.mark.slow
def test_tabular_tiny_config_trains(tmp_path):
    results = run_tiny("yeast", tmp_path / "run", **{"dataset.data_dir": str(tmp_path / "data")})
    assert results["linear_eval"]["num_scored_classes"] == 14


@pytest.mark.slow
def test_text_tiny_config_trains(apt_lists, tmp_path):
    overrides = {"dataset.data_dir": str(tmp_path / "data"), "dataset.source_dir": str(apt_lists)}
    results = run_tiny("debtags", tmp_path / "run", **overrides)
    assert results["linear_eval"]["num_scored_classes"] == 5
    # The encoder learned something the labels need: the probe beats the random encoder.
    assert results["linear_eval"]["mAP"] > results["random_init"]["mAP"]


def test_encoder_fields_must_match_the_data(tmp_path):
    config = config_lib.load_config_file("yeast", "tiny")
    config_lib.override(
        config, **{"dataset.data_dir": str(tmp_path), "model.encoder.in_features": 100}
    )
    with pytest.raises(ValueError, match=r"in_features: got 100, expected 103"):
        train.train_and_evaluate(config, tmp_path / "run")
