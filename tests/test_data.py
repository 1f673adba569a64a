"""The data pipeline: acceptance figures on the shipped file, cleaning, vocabulary, robustness."""

import random

import numpy as np
import pytest

from jaxbirds import data
from jaxbirds.data import DataError, Vocabulary, build_examples, clean_name, load_names, split_names

# --- acceptance figures on the shipped dataset ------------------------------------------------


def test_shipped_file_has_10976_names_of_3_to_35_characters():
    names = load_names(data.DEFAULT_DATA_PATH)
    assert len(names) == 10_976
    assert min(map(len, names)) == 3
    assert max(map(len, names)) == 35


def test_cleaning_leaves_28_characters_plus_end_token(dataset):
    assert dataset.vocab.chars == (".", "_", "`", *"abcdefghijklmnopqrstuvwxyz")
    assert dataset.vocab.size == 29


def test_seed_1234_split_gives_the_documented_example_counts(dataset):
    sizes = [len(split) for split in dataset.splits.values()]
    assert sizes == [172_427, 21_478, 21_599]
    assert sum(sizes) == 215_504
    assert [len(split.names) for split in dataset.splits.values()] == [8_780, 1_097, 1_099]


def test_examples_are_int32_with_the_documented_shapes(dataset):
    for split in dataset.splits.values():
        assert split.X.dtype == np.int32 and split.Y.dtype == np.int32
        assert split.X.shape == (len(split), 3) and split.Y.shape == (len(split),)


# --- cleaning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Abbott's babbler", "abbott_s_babbler"),
        ("  Adélie Penguin ", "adelie_penguin"),  # strip, lowercase, accent folded
        ("Abd al-Kuri sparrow", "abd_al_kuri_sparrow"),  # hyphen -> space -> _
        ("ʻAkiapolāʻau", "`akiapola`au"),  # the okina is a letter: it survives, then becomes a backtick
        ("São Tomé `ibis", "sao_tome__ibis"),  # a typed backtick is punctuation: it becomes _
        ("Alström's warbler", "alstrom_s_warbler"),
    ],
)
def test_clean_name_reproduces_the_tutorial(raw, cleaned):
    assert clean_name(raw) == cleaned


def test_split_is_pythons_seeded_shuffle_and_leaves_global_random_alone():
    names = [f"name{i}" for i in range(101)]
    expected = list(names)
    random.seed(1234)
    random.shuffle(expected)
    random.seed(99)
    before = random.random()
    random.seed(99)
    train, dev, test = split_names(names)
    assert random.random() == before  # the caller's random stream is untouched
    assert train + dev + test == expected
    assert (len(train), len(dev), len(test)) == (80, 10, 11)


# --- vocabulary and examples ----------------------------------------------------------------------


def test_vocabulary_round_trips_every_cleaned_name(dataset):
    vocab = dataset.vocab
    for name in dataset.dev.names:
        assert vocab.decode(vocab.encode(name)) == name
    assert vocab.encode_array("".join(dataset.dev.names)).tolist() == [
        i for name in dataset.dev.names for i in vocab.encode(name)
    ]


def test_unknown_characters_are_named_in_the_error():
    vocab = Vocabulary.from_names(["abc"])
    with pytest.raises(DataError, match=r"\['z'\]"):
        vocab.encode("abz")
    with pytest.raises(DataError, match=r"\['é'\]"):
        build_examples(["abé"], vocab)


def test_build_examples_matches_the_tutorials_loop(dataset):
    names, vocab = dataset.dev.names, dataset.vocab
    X, Y = build_examples(names, vocab, context_size=4)
    xs, ys = [], []
    for name in names:  # the tutorial's per-character loop, as the reference
        context = [0] * 4
        for ch in name + ".":
            ix = vocab.encode(ch)[0] if ch != "." else 0
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    np.testing.assert_array_equal(X, np.array(xs))
    np.testing.assert_array_equal(Y, np.array(ys))


def test_a_short_name_gives_one_example_per_character_plus_the_end():
    vocab = Vocabulary.from_names(["emu"])
    X, Y = build_examples(["emu"], vocab, context_size=3)
    e, m, u = vocab.encode("emu")
    assert X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, u]]
    assert Y.tolist() == [e, m, u, 0]


# --- robustness of loading ----------------------------------------------------------------------------


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path):
    path = tmp_path / "names.csv"
    path.write_bytes("\ufeffEmu\r\n\r\n  \r\nKiwi\r\nʻIʻiwi\r\n".encode("utf-8"))
    assert load_names(path) == ["Emu", "Kiwi", "ʻIʻiwi"]


def test_missing_file_names_the_path_and_the_shipped_dataset(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv") as err:
        load_names(missing)
    assert "datasets/birds/birds.csv" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\r\n"])
def test_a_file_without_names_is_a_clear_value_error(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="no names"):
        load_names(path)


def test_load_dataset_on_a_small_file(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text("\n".join(f"bird {c}" for c in "abcdefghij") + "\n", encoding="utf-8")
    ds = data.load_dataset(path)
    assert [len(s.names) for s in ds.splits.values()] == [8, 1, 1]
    assert len(ds.train) == 8 * len("bird_a.")


def test_a_file_too_small_to_train_on_is_a_clear_error(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("emu\n")
    with pytest.raises(DataError, match="at least 2 names"):
        data.load_dataset(path)
