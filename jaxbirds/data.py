"""Bird names in, integer training examples out.

The pipeline reproduces the reference tutorial exactly:

1. ``load_names``   - one UTF-8 name per line (BOM, CRLF and blank lines tolerated);
2. ``clean_name``   - the tutorial's cleaning, character for character;
3. ``split_names``  - Python's ``random.seed(1234)`` shuffle, then an 80/10/10 split;
4. ``Vocabulary``   - ``.`` (end/padding) at index 0, the other characters sorted;
5. ``build_examples`` - sliding windows: ``context_size`` previous characters -> next character.

``load_dataset`` runs all five and returns a :class:`Dataset` with the three splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from unidecode import unidecode

from jaxbirds.errors import JaxbirdsError

END_TOKEN = "."
DEFAULT_DATA_PATH = Path(__file__).resolve().parent.parent / "datasets" / "birds" / "birds.csv"


class DataError(JaxbirdsError, ValueError):
    """The data file is missing, empty, or holds something the vocabulary cannot encode."""


def load_names(path: str | Path) -> list[str]:
    """Read one name per line from a UTF-8 file, skipping blank lines.

    A UTF-8 byte-order mark and Windows line endings are tolerated. Raises
    :class:`DataError` (a ``ValueError``) if the file is missing or has no names.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (the project ships the bird names at "
            f"{DEFAULT_DATA_PATH}; pass another file with --data)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{path} holds no names (it is empty or only blank lines)")
    return names


def clean_name(name: str) -> str:
    """The tutorial's cleaning, step for step.

    strip and lowercase; every character that is neither alphanumeric nor
    whitespace becomes a space; backticks and spaces become ``_``; finally
    ``unidecode`` folds accents. The order matters: the Hawaiian ʻokina (U+02BB)
    is a letter to ``str.isalnum``, survives the filter, and only then becomes a
    backtick through ``unidecode``, so it stays a backtick in the vocabulary.

    >>> clean_name("Abbott's babbler")
    'abbott_s_babbler'
    >>> clean_name("ʻAkiapolāʻau")
    '`akiapola`au'
    """
    name = name.strip().lower()
    name = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in name)
    name = name.replace("`", "_").replace(" ", "_")
    return unidecode(name)


def split_names(
    names: Sequence[str], seed: int = 1234, train: float = 0.8, dev: float = 0.1
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle with Python's ``random`` exactly as the tutorial does, then split.

    ``random.seed(seed); random.shuffle(names)``; the first ``int(train * n)``
    names train, the next ``int(dev * n)`` are the dev split, the rest test.
    The module-level ``random`` state is saved and restored, so calling this
    has no effect on other users of ``random``.
    """
    if not (0 < train and 0 <= dev and train + dev <= 1):
        raise ValueError(f"split fractions must satisfy 0 < train, 0 <= dev, train + dev <= 1; got {train}, {dev}")
    shuffled = list(names)
    state = random.getstate()
    try:
        random.seed(seed)
        random.shuffle(shuffled)
    finally:
        random.setstate(state)
    n_train = int(train * len(shuffled))
    n_dev = int(dev * len(shuffled))
    return shuffled[:n_train], shuffled[n_train : n_train + n_dev], shuffled[n_train + n_dev :]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Characters <-> integer ids. Id 0 is the end/padding token ``.``; the rest are sorted."""

    chars: tuple[str, ...]

    def __post_init__(self):
        if not self.chars or self.chars[0] != END_TOKEN:
            raise ValueError(f"a vocabulary starts with the end token {END_TOKEN!r}")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be distinct")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Vocabulary:
        found = {ch for name in names for ch in name}
        if END_TOKEN in found:
            raise DataError(f"the names contain the reserved end token {END_TOKEN!r}")
        return cls((END_TOKEN, *sorted(found)))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {ch: i for i, ch in enumerate(self.chars)}

    def encode(self, name: str) -> list[int]:
        """Ids of the characters of ``name``; a clear error names any unknown character."""
        index = self.index
        unknown = sorted({ch for ch in name if ch not in index})
        if unknown:
            raise DataError(
                f"{name!r} has characters outside the vocabulary: {unknown} "
                f"(known: {''.join(self.chars)!r}); clean the name with clean_name first"
            )
        return [index[ch] for ch in name]

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised :meth:`encode` of one long string, as an int32 array."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(ch) for ch in self.chars], dtype=np.uint32)
        order = np.argsort(table)
        pos = np.clip(np.searchsorted(table[order], codes), 0, len(table) - 1)
        ids = order[pos].astype(np.int32)
        if not np.array_equal(table[ids], codes):
            self.encode(text)  # raises with the unknown characters named
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Characters of ``ids``; decoding stops at nothing, the end token decodes to ``.``."""
        return "".join(self.chars[int(i)] for i in ids)


def build_examples(names: Sequence[str], vocab: Vocabulary, context_size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window examples: ``X[k]`` holds ``context_size`` ids, ``Y[k]`` the next id.

    Each name ``c_1 .. c_L`` gives ``L + 1`` examples. Written as one stream
    ``. . . c_1 .. c_L .`` (``context_size`` end tokens of padding in front, one
    end token behind), the target at stream position ``t`` is ``stream[t]`` and its
    context is ``stream[t - context_size : t]``; the targets are every position
    past the padding. Everything is vectorised over the whole name list (no loop
    per character). Returns int32 arrays of shapes ``(N, context_size)`` and ``(N,)``.
    """
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if not names:
        return np.zeros((0, context_size), np.int32), np.zeros((0,), np.int32)
    if any(END_TOKEN in name for name in names):
        raise DataError(f"names may not contain the end token {END_TOKEN!r}")
    chunk = np.array([len(name) + context_size + 1 for name in names])
    text = "".join(END_TOKEN * context_size + name + END_TOKEN for name in names)
    stream = vocab.encode_array(text)
    offset = np.arange(len(stream)) - np.repeat(np.cumsum(chunk) - chunk, chunk)
    targets = np.flatnonzero(offset >= context_size)
    windows = np.lib.stride_tricks.sliding_window_view(stream, context_size)
    return np.ascontiguousarray(windows[targets - context_size]), stream[targets]


@dataclasses.dataclass(frozen=True)
class Split:
    names: tuple[str, ...]
    X: np.ndarray
    Y: np.ndarray

    def __len__(self) -> int:
        return len(self.Y)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The cleaned names, the vocabulary and the train / dev / test example arrays."""

    vocab: Vocabulary
    context_size: int
    train: Split
    dev: Split
    test: Split
    source: str = ""  # the file the names came from
    sha256: str = ""  # of that file's bytes: which data a checkpoint was trained on

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def summary(self) -> str:
        sizes = " / ".join(f"{len(s):,}" for s in self.splits.values())
        n_names = sum(len(s.names) for s in self.splits.values())
        return (
            f"{n_names:,} names, vocabulary of {self.vocab.size} ({''.join(self.vocab.chars)}), "
            f"context {self.context_size}: train / dev / test = {sizes} examples"
        )


def load_dataset(path: str | Path = DEFAULT_DATA_PATH, context_size: int = 3, seed: int = 1234) -> Dataset:
    """Load, clean, split and window the names: the tutorial's whole data pipeline.

    Raises :class:`DataError` if the training split ends up without examples
    (a file of one name leaves the 80 % split empty): every use of a dataset
    trains or calibrates on it.
    """
    names = [clean_name(name) for name in load_names(path)]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{path}: no names are left after cleaning")
    vocab = Vocabulary.from_names(names)
    parts = split_names(names, seed=seed)
    if not parts[0]:
        raise DataError(
            f"{path}: {len(names)} name(s) leave the training split (80 %) empty; the file needs at least 2 names"
        )
    splits = [Split(tuple(part), *build_examples(part, vocab, context_size)) for part in parts]
    sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Dataset(vocab, context_size, *splits, source=str(Path(path).resolve()), sha256=sha256)
