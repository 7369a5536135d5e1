"""Debtags: Debian package descriptions labelled with their debtags, a real multi-label text task.

The text of a package is its long description from `Translation-en`; its labels are the debtags
in the `Tag:` field of `Packages`. Both come from apt's lists, which need network once:

    apt-get update -o Acquire::Languages=en    # fills /var/lib/apt/lists

Decisions (recorded in the dataset statistics):
- Tags of the `special::` facet (bookkeeping such as `special::not-yet-tagged`) are dropped.
- Name leaks: Debian's naming conventions decide some tags (`lib*-perl` is `devel::lang:perl`,
  `*-doc` is `role::documentation`). A tag is dropped when one convention both predicts it
  (precision >= 0.5) and covers it (recall >= 0.5). Descriptions often restate the name, so this
  keeps the task about what the text says.
- Then tags with fewer than `min_tag_count` (50) packages are dropped, and packages left with
  no tag or an empty long description are dropped.
- Split: a seeded 80/20 permutation of the package names.
- Validation (`is_validation_package`): the training packages whose name's SHA-256 falls in the
  lowest 15% of its range, carved out of the training split by the input pipeline when a config
  asks for a validation split. A hash of the name, not a position, so a package stays on its
  side when the apt lists change.

Each example is {"inputs": the long description (text), "labels": float32 [C] multi-hot over the
C kept tags in sorted order, "package": its name}, stored in package name order. The tag names,
in column order, are `info.metadata["tags"]`; they are saved with the prepared data, so loading
it does not read the apt lists again.
"""

from __future__ import annotations

import bz2
import collections
import functools
import gzip
import hashlib
import lzma
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sdjax.datasets import sources
from sdjax.datasets.local_source import LocalSourceBuilder

APT_LISTS_DIR = "/var/lib/apt/lists"
MIN_TAG_COUNT = 50
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.15
SPLIT_SEED = 0
LEAK_THRESHOLD = 0.5
# Debian naming conventions that may give a tag away (policy and team conventions).
NAME_CONVENTIONS = {
    "lib*-perl": r"^lib.*-perl$",
    "python3-*": r"^python3?-",
    "ruby-*": r"^ruby-",
    "golang-*": r"^golang-",
    "r-cran-*": r"^r-(cran|bioc|other)-",
    "node-*": r"^node-",
    "lib*-java": r"^lib.*-java$",
    "libghc-*": r"^libghc-",
    "lib*-ocaml*": r"^lib.*-ocaml",
    "php-*": r"^php-",
    "lib*-dev": r"^lib.*-dev$",
    "lib*<digit>": r"^lib.*\d[a-z]?$",
    "fonts-*": r"^(fonts|ttf|otf)-",
    "*-doc": r"-doc$",
    "texlive-*": r"^texlive-",
}

MISSING_LISTS = (
    "No apt lists with debtags and English descriptions in {directory}. They need network "
    "once: run `apt-get update -o Acquire::Languages=en` (as root) on a Debian or Ubuntu "
    "machine, or pass --config.dataset.source_dir=DIR with copies of its *_Packages* and "
    "*_Translation-en* files."
)


def read_list_file(path: Path) -> str:
    """An apt list file, compressed or not, as text."""
    openers: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    if path.suffix in openers:
        with openers[path.suffix](path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.suffix in (".lz4", ".zst"):  # apt's own helper reads every format apt writes
        helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
        if not Path(helper).exists():
            raise FileNotFoundError(f"{path}: reading {path.suffix} lists needs apt-helper.")
        return subprocess.run(
            [helper, "cat-file", str(path)], check=True, capture_output=True, text=True
        ).stdout
    return path.read_text(encoding="utf-8")


def paragraphs(text: str):
    """deb822 paragraphs as dicts; continuation lines are joined with newlines."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(description: str) -> str:
    """The long part of a Description-en field: its synopsis line dropped, ' .' lines as breaks."""
    lines = description.split("\n")[1:]
    return "\n".join("" if line.strip() == "." else line.strip() for line in lines).strip()


def read_corpus(lists_dir: str | Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(package, long description, tags) for every tagged package with an English description."""
    lists_dir = Path(lists_dir)
    packages_files = sorted(p for p in lists_dir.glob("*_Packages*") if p.is_file())
    translation_files = sorted(p for p in lists_dir.glob("*_Translation-en*") if p.is_file())
    if not packages_files or not translation_files:
        raise FileNotFoundError(MISSING_LISTS.format(directory=lists_dir))
    descriptions = {}
    for path in translation_files:
        for fields in paragraphs(read_list_file(path)):
            if "Description-en" in fields:
                key = (fields["Package"], fields.get("Description-md5"))
                descriptions[key] = long_description(fields["Description-en"])
    tagged = {}
    for path in packages_files:
        for fields in paragraphs(read_list_file(path)):
            name = fields["Package"]
            if "Tag" not in fields or name in tagged:
                continue  # the first list to name a package wins (the main suite sorts first)
            text = descriptions.get((name, fields.get("Description-md5")), "")
            tags = tuple(sorted(t.strip() for t in fields["Tag"].replace("\n", " ").split(",")))
            tagged[name] = (text, tuple(t for t in tags if t))
    if not tagged:
        raise FileNotFoundError(MISSING_LISTS.format(directory=lists_dir))
    return [(name, *tagged[name]) for name in sorted(tagged)]


def name_leaks(corpus, threshold: float = LEAK_THRESHOLD) -> dict[str, dict]:
    """Tags that a naming convention gives away: {tag: {convention, precision, recall}}."""
    tag_members = collections.defaultdict(set)
    for name, _, tags in corpus:
        for tag in tags:
            tag_members[tag].add(name)
    leaks = {}
    for convention, pattern in NAME_CONVENTIONS.items():
        matching = {name for name, _, _ in corpus if re.search(pattern, name)}
        if not matching:
            continue
        for tag, members in tag_members.items():
            overlap = len(matching & members)
            precision, recall = overlap / len(matching), overlap / len(members)
            if precision >= threshold and recall >= threshold:
                leaks[tag] = {"convention": convention, "precision": precision, "recall": recall}
    return leaks


def clean_corpus(corpus, min_tag_count: int = MIN_TAG_COUNT):
    """Applies the module docstring's decisions; returns (examples, kept tags, decisions)."""
    leaks = name_leaks(corpus)
    dropped = {tag for _, _, tags in corpus for tag in tags if tag.startswith("special::")}
    dropped |= set(leaks)
    counts = collections.Counter(
        tag for _, text, tags in corpus if text for tag in tags if tag not in dropped
    )
    kept = sorted(tag for tag, count in counts.items() if count >= min_tag_count)
    kept_set = set(kept)
    examples = []
    for name, text, tags in corpus:
        labels = tuple(tag for tag in tags if tag in kept_set)
        if text and labels:
            examples.append((name, text, labels))
    decisions = {"name_leaks": leaks, "rare_tags_dropped": len(counts) - len(kept)}
    return examples, kept, decisions


def split_names(names: list[str], split: str, seed: int = SPLIT_SEED) -> list[str]:
    """The package names of `split`; train and test partition `names`."""
    order = np.random.default_rng(seed).permutation(len(names))
    num_test = round(TEST_FRACTION * len(names))
    if split == "test":
        chosen = order[:num_test]
    elif split == "train":
        chosen = order[num_test:]
    else:
        raise ValueError(f"`split`: got {split!r}, expected 'train' or 'test'.")
    return [names[i] for i in np.sort(chosen)]


def is_validation_package(name: str) -> bool:
    """Whether training package `name` belongs to the validation split (a stable hash)."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return digest < VALIDATION_FRACTION * 2**64


RELEASE_NOTES = {
    "1.3.0": "Examples are {inputs, labels (float32 multi-hot over metadata['tags']), package}.",
    "1.2.0": "array_record files (random access).",
    "1.1.0": "Examples are stored in name order (disable_shuffling); no `index` feature.",
    "1.0.0": "Examples carry an `index` feature, their position in name order.",
}


class DebtagsConfig(tfds.core.BuilderConfig):
    def __init__(self, *, min_tag_count: int = MIN_TAG_COUNT, **kwargs):
        kwargs.setdefault("version", tfds.core.Version("1.3.0"))
        kwargs.setdefault("release_notes", RELEASE_NOTES)
        super().__init__(**kwargs)
        self.min_tag_count = min_tag_count


class Debtags(LocalSourceBuilder):
    """tfds builder for Debtags from local apt lists (`source_dir`, default /var/lib/apt/lists).

    Each example is {"inputs" (text), "labels" (float32 multi-hot), "package"}, in package name
    order; the label columns are the sorted kept tags, `info.metadata["tags"]`.
    """

    BUILDER_CONFIGS = [DebtagsConfig(name="default")]  # noqa: RUF012 (tfds declares a list)

    def _info(self) -> tfds.core.DatasetInfo:
        # The label width is the number of kept tags. Prepared data has them in its metadata.json
        # (read in milliseconds); otherwise they come from the apt lists, parsed once per builder.
        metadata = tfds.core.MetadataDict()
        if (self.data_path / "metadata.json").exists():
            metadata.load_metadata(self.data_path)
        else:
            _, kept, decisions = self._cleaned_corpus
            metadata.update({"tags": kept, "lists_dir": str(self._lists_dir), **decisions})
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Text(),
                    "labels": tfds.features.Tensor(
                        shape=(len(metadata["tags"]),), dtype=np.float32
                    ),
                    "package": tfds.features.Text(),
                }
            ),
            supervised_keys=("inputs", "labels"),
            metadata=metadata,
            disable_shuffling=True,  # stored, hence read, in name order
        )

    @property
    def _lists_dir(self) -> Path:
        return Path(self.source_dir or APT_LISTS_DIR)

    @functools.cached_property
    def _cleaned_corpus(self):
        """`clean_corpus` of the apt lists: (examples, kept tags, decisions), parsed once."""
        return clean_corpus(read_corpus(self._lists_dir), self.builder_config.min_tag_count)

    def _split_generators(self, dl_manager):
        del dl_manager  # the lists are local files
        examples, kept, _ = self._cleaned_corpus
        if kept != self.info.metadata["tags"]:  # a rebuild over data made from other lists
            raise ValueError(
                f"`source_dir`: {self._lists_dir} gives {len(kept)} kept tags, expected the "
                f"{len(self.info.metadata['tags'])} of the data in {self.data_path}; build into "
                "a fresh data dir."
            )
        by_name = {name: (text, labels) for name, text, labels in examples}
        names = sorted(by_name)
        column = {tag: i for i, tag in enumerate(kept)}
        return {
            split: self._generate_examples(split_names(names, split), by_name, column)
            for split in ("train", "test")
        }

    def _generate_examples(self, names, by_name, column):
        for name in names:
            text, tags = by_name[name]
            labels = np.zeros(len(column), np.float32)
            labels[[column[tag] for tag in tags]] = 1.0
            yield name, {"inputs": text, "labels": labels, "package": name}


def stored_split(split: str, data_dir: str = "", source_dir: str = "") -> tuple[dict, list[str]]:
    """The builder's stored split ("train" or "test") as arrays, and the tag names."""
    source = sources.tfds_source(
        "debtags/default", split, data_dir or sources.default_data_dir(), source_dir
    )
    return sources.stack(source), list(source.dataset_info.metadata["tags"])


def corpus(
    data_dir: str = "", source_dir: str = "", splits=("train", "test")
) -> tuple[dict, list[str]]:
    """Debtags texts and multi-hot tags: ({split: (texts, float32 [N, C])}, the C tag names).

    All come from the builder as they are stored; every split shares the tag columns.
    "validation" holds the training packages that `is_validation_package` picks, and
    "train_without_validation" the others, in the stored (name) order.
    """
    texts_and_labels, stored = {}, {}
    for split in splits:
        sources.check_split(split)
        stored_name = "test" if split == "test" else "train"
        if stored_name not in stored:  # validation and train share the stored "train"
            stored[stored_name] = stored_split(stored_name, data_dir, source_dir)
        examples, tag_names = stored[stored_name]
        keep = np.arange(len(examples["labels"]))
        if split in ("validation", "train_without_validation"):
            held = np.array([is_validation_package(name.decode()) for name in examples["package"]])
            keep = keep[held == (split == "validation")]
        texts = [examples["inputs"][i].decode() for i in keep]
        texts_and_labels[split] = (texts, examples["labels"][keep])
    return texts_and_labels, tag_names


def digest(data_dir: str = "", source_dir: str = "") -> str:
    """SHA-256 of the prepared data: the tag names, then each split's packages, texts and tags.

    Apt lists change with Debian's updates, so two machines may prepare different data; equal
    digests mean the same examples in the same order. Experiments that span machines record it.
    """
    sha = hashlib.sha256()
    for split in ("train", "test"):
        examples, tag_names = stored_split(split, data_dir, source_dir)
        if split == "train":
            sha.update("\n".join(tag_names).encode())
        sha.update(f"\0{split}:{len(examples['labels'])}".encode())
        for name, text in zip(examples["package"], examples["inputs"], strict=True):
            sha.update(b"\0%d:%s\0%d:%s" % (len(name), name, len(text), text))
        sha.update(np.ascontiguousarray(examples["labels"], np.float32).tobytes())
    return sha.hexdigest()


def load_tokens(split: str, *, data_dir: str, source_dir: str, options: dict) -> dict:
    """Debtags token ids (SentencePiece trained on the train split) and multi-hot tags.

    The tokenizer is the same for every split (trained on all of "train", texts without
    labels), so a test example has the same tokens with a validation split and without.
    """
    from sdjax import tokenizer

    texts_and_labels, vocabulary = corpus(data_dir, source_dir, dict.fromkeys(("train", split)))
    model_path = tokenizer.cached_tokenizer(
        texts_and_labels["train"][0],
        vocab_size=options.get("vocab_size", 8000),
        cache_dir=Path(data_dir) / "sdjax_tokenizers",
        case_fold=options.get("case_fold", False),
    )
    texts, labels = texts_and_labels[split]
    inputs = tokenizer.encode(model_path, texts, max_length=options.get("max_length", 128))
    return {"inputs": inputs, "labels": labels, "label_names": np.array(vocabulary)}
