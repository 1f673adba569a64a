"""Checkpoints: round trip, atomic writes, clear errors."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from jaxbirds import checkpoint, checkpoint_writer, evaluate, model, train
from jaxbirds.checkpoint import OLDEST_READ, VERSION, Checkpoint, CheckpointError, DataSource
from jaxbirds.checkpoint_writer import LossLog
from jaxbirds.data import Vocabulary


@pytest.fixture(scope="module", params=["sgd", "adam"])
def ckpt(request, dataset):
    tc = train.TrainConfig(steps=50, chunk_size=50, optimizer=request.param, learning_rate=0.01)
    mc = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    result = train.train(dataset.train.X, dataset.train.Y, tc, train.init_state(mc, tc))
    stats = evaluate.calibrate(result.state.params, dataset.dev.X)
    return Checkpoint(result.state, stats, dataset.vocab, mc, tc, DataSource(dataset.source, dataset.sha256))


def test_round_trip_restores_everything(tmp_path, ckpt):
    path = checkpoint.save(tmp_path / "c.npz", ckpt)
    back = checkpoint.load(path)
    chex.assert_trees_all_equal(back.state.params, ckpt.state.params)
    chex.assert_trees_all_equal(back.state.opt_state, ckpt.state.opt_state)
    assert jax.tree_util.tree_structure(back.state.opt_state) == jax.tree_util.tree_structure(ckpt.state.opt_state)
    chex.assert_trees_all_equal(back.stats, ckpt.stats)
    assert (back.state.step, back.vocab, back.model_config, back.train_config, back.data) == (
        50, ckpt.vocab, ckpt.model_config, ckpt.train_config, ckpt.data)  # fmt: skip


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, ckpt, monkeypatch):
    path = checkpoint.save(tmp_path / "c.npz", ckpt)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    changed = ckpt._replace(state=ckpt.state._replace(step=99))
    with pytest.raises(OSError):
        checkpoint.save(path, changed)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind


def test_garbage_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="readable|jaxbirds"):
        checkpoint.load(other)


def test_a_checkpoint_whose_parts_disagree_is_rejected(tmp_path, ckpt):
    wrong = ckpt._replace(model_config=dataclasses.replace(ckpt.model_config, hidden=17))
    path = checkpoint.save(tmp_path / "c.npz", wrong)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(path)


def test_compatibility_with_the_data(ckpt):
    checkpoint.check_compatible(ckpt, ckpt.vocab, 3)
    with pytest.raises(CheckpointError, match="vocabulary"):
        checkpoint.check_compatible(ckpt, ckpt.vocab.from_names(["abc"]), 3)
    with pytest.raises(CheckpointError, match="context"):
        checkpoint.check_compatible(ckpt, ckpt.vocab, 4)


def test_files_respect_the_users_umask(tmp_path, ckpt):
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "c.npz", ckpt)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not tempfile's 0600


def test_loss_log_appends_reads_and_truncates(tmp_path):
    log = LossLog(tmp_path / "losses.f32")
    log.truncate(0)
    log.append(np.array([3.0, 2.5], np.float32))
    log.append(np.array([2.0], np.float32))
    np.testing.assert_array_equal(log.read(3), [3.0, 2.5, 2.0])
    np.testing.assert_array_equal(log.read(2), [3.0, 2.5])
    log.truncate(1)  # a chunk whose checkpoint never landed is cut off before a resume appends
    log.append(np.array([9.0], np.float32))
    np.testing.assert_array_equal(log.read(2), [3.0, 9.0])
    with pytest.raises(CheckpointError, match="holds 2 steps. losses"):
        log.read(3)


def test_saving_costs_the_same_whatever_the_length_of_the_run(tmp_path, ckpt):
    """The checkpoint holds no loss history: its size does not grow with the step count."""
    small = checkpoint.save(tmp_path / "a.npz", ckpt).stat().st_size
    later = ckpt._replace(state=ckpt.state._replace(step=10_000_000))
    assert checkpoint.save(tmp_path / "b.npz", later).stat().st_size <= small + 16  # the step's digits


def test_writer_saves_in_the_background_and_keeps_every_loss(tmp_path, ckpt):
    log = LossLog(tmp_path / "losses.f32")
    log.truncate(0)
    writer = checkpoint_writer.Writer(tmp_path / "c.npz", log)
    for step in (10, 20, 30):
        writer.submit(ckpt._replace(state=ckpt.state._replace(step=step)), np.full(10, step, np.float32))
    writer.close()
    assert checkpoint.load(tmp_path / "c.npz").state.step == 30
    np.testing.assert_array_equal(log.read(30), np.repeat([10, 20, 30], 10))
    assert writer.seconds > 0


def test_a_writer_error_surfaces_in_the_callers_thread(tmp_path, ckpt):
    (tmp_path / "blocked").write_text("a file where the checkpoint's directory should be")
    log = LossLog(tmp_path / "losses.f32")
    writer = checkpoint_writer.Writer(tmp_path / "blocked" / "c.npz", log)
    writer.submit(ckpt, np.zeros(1, np.float32))
    with pytest.raises(OSError):
        writer.close()


def small_checkpoint(optimizer: str, with_stats: bool, hidden: tuple[int, ...] = (8,)) -> Checkpoint:
    """An untrained model of the tutorial's vocabulary size, small enough to corrupt byte by byte. Each
    block's statistics are its own values (block l's mean runs from -l to l), so that no two are alike."""
    mc = model.ModelConfig(vocab_size=29, hidden=hidden, embedding_dim=3)
    tc = train.TrainConfig(optimizer=optimizer)
    stats = tuple(
        model.BatchNormStats(jnp.linspace(-layer, layer, width)[None], jnp.linspace(0.5, layer + 1, width)[None])
        for layer, width in enumerate(hidden, start=1)
    )
    stats = stats if with_stats else None
    vocab = Vocabulary.from_names(["abcdefghijklmnopqrstuvwxyz -"])
    assert vocab.size == 29
    return Checkpoint(train.init_state(mc, tc), stats, vocab, mc, tc, DataSource("birds.csv", "0" * 64))


def assert_same_checkpoint(back: Checkpoint, original: Checkpoint) -> None:
    """Every array (values, shapes, dtypes, tree structure) and every other field."""
    chex.assert_trees_all_equal(
        (back.state.params, back.state.opt_state, back.stats),
        (original.state.params, original.state.opt_state, original.stats),
        strict=True,
    )
    assert (back.state.step, back.vocab, back.model_config, back.train_config, back.data) == (
        original.state.step, original.vocab, original.model_config, original.train_config, original.data)  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A real checkpoint (adam: an integer leaf among the float ones; with statistics) and its contents."""
    original = small_checkpoint("adam", with_stats=True)
    return checkpoint.save(tmp_path_factory.mktemp("small") / "c.npz", original), original


def rewritten(source, target, edit):
    """``source``'s members, changed by ``edit(arrays, header)`` in place, saved as ``target``. ``edit``
    may replace ``arrays["header"]`` (its bytes) instead of changing the ``header`` dict."""
    with np.load(source, allow_pickle=False) as npz:
        arrays = dict(npz)
    raw_header = arrays["header"]
    header = json.loads(raw_header.tobytes())
    edit(arrays, header)
    if arrays.get("header") is raw_header:
        arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    np.savez(target, **arrays)
    return target


def header_bytes(text: bytes):
    return lambda arrays, header: arrays.update(header=np.frombuffer(text, np.uint8))


def each_param(dtype):
    return lambda arrays, header: arrays.update(
        {name: arrays[name].astype(dtype) for name in arrays if name.startswith("params/")}
    )


def array(name, value):
    return lambda arrays, header: arrays.update({name: value(arrays[name]) if callable(value) else value})


def without(name):
    return lambda arrays, header: arrays.pop(name)


def renamed(name, new_name):
    return lambda arrays, header: arrays.update({new_name: arrays.pop(name)})


def header_field(name, value):
    return lambda arrays, header: header.update({name: value})


def config_field(config, name, value):
    return lambda arrays, header: header[config].update({name: value})


def test_rewriting_without_an_edit_gives_back_the_same_checkpoint(tmp_path, small):
    """The control for the edits below: what they refuse is their edit, not the rewriting."""
    source, original = small
    assert_same_checkpoint(
        checkpoint.load(rewritten(source, tmp_path / "c.npz", lambda arrays, header: None)), original
    )


#: Edits of a real checkpoint's members, and the message each must give.
REFUSED_EDITS = [
    (header_bytes(b'{"format": "jaxbirds-checkpoint", "vers'), "header is not JSON"),
    (header_bytes(b"\xff\xfe{}"), "header is not JSON"),
    (header_bytes(b"[1, 2]"), "header is a JSON list, not an object"),
    (array("header", lambda header: header.astype(np.int32)), "header is int32, not uint8"),
    (without("header"), "not a readable checkpoint: an .npz file without a jaxbirds header"),
    (header_field("format", "other-checkpoint"), "not a jaxbirds-checkpoint file"),
    (header_field("version", VERSION + 1),
     rf"written by a newer jaxbirds \(checkpoint format version {VERSION + 1}\); this one reads version {VERSION}"),
    (header_field("version", OLDEST_READ - 1), rf"old checkpoint format \(version {OLDEST_READ - 1}\)"),
    (header_field("version", str(VERSION)), f"version '{VERSION}' is not an integer"),
    (lambda arrays, header: header.pop("step"), "header fields are not a checkpoint's: missing step"),
    (header_field("comment", "hand-edited"), "header fields are not a checkpoint's: unexpected comment"),
    (header_field("step", -1), "step is -1, not a count of steps"),
    (header_field("step", 5.0), "step is 5.0, not a count of steps"),
    (header_field("has_stats", "yes"), "has_stats is 'yes', not true or false"),
    (header_field("data", {"path": "birds.csv"}), "data is .* not null or an object of strings path, sha256"),
    (header_field("model_config", [29, 3, 3, 8]), "model_config is not a JSON object"),
    (lambda arrays, header: header["model_config"].pop("hidden"), "model_config fields .*: missing hidden"),
    (config_field("model_config", "depth", 2), "model_config fields .*: unexpected depth"),
    (config_field("model_config", "hidden", 8), "model_config.hidden is 8; it must be a list of integers"),
    (config_field("model_config", "hidden", [8.0]), r"model_config.hidden is \[8.0\]; it must be a list of integers"),
    (config_field("model_config", "hidden", [True]), r"model_config.hidden is \[True\]; it must be a list"),
    (config_field("model_config", "hidden", "8"), "model_config.hidden is '8'; it must be a list of integers"),
    (config_field("model_config", "hidden", [0]), "model_config is not valid: ModelConfig.hidden must be"),
    (config_field("model_config", "hidden", []), "model_config is not valid: ModelConfig.hidden must be"),
    (config_field("model_config", "hidden", [8, 8]),
     "members are not a checkpoint's: missing opt/016.npy, .*, opt/023.npy, params/W3.npy, params/b3.npy, "
     "params/bnbias2.npy, params/bngain2.npy, stats/mean2.npy, stats/var2.npy$"),
    (config_field("train_config", "optimizer", "rmsprop"), "train_config is not valid: optimizer must be"),
    (config_field("train_config", "learning_rate", "0.1"), "learning_rate is '0.1'; it must be of type float"),
    (config_field("train_config", "learning_rate", 10**400), "train_config is not valid"),
    (header_field("vocab", "abc"), "vocabulary 'abc' is not one"),
    (header_field("vocab", ".abc"), "vocabulary has 4 characters, its model_config.vocab_size is 29"),
    (without("params/C"), "members are not a checkpoint's: missing params/C.npy"),
    (array("params/W3", np.zeros(3, np.float32)), "members are not a checkpoint's: unexpected params/W3.npy"),
    (array("opt/016", np.zeros(3, np.float32)), "unexpected opt/016.npy"),
    (without("opt/015"), "missing opt/015.npy"),
    (without("stats/var1"), "missing stats/var1.npy"),
    (header_field("has_stats", False), "unexpected stats/mean1.npy, stats/var1.npy"),
    (renamed("params/bngain1", "params/bngain"),  # version 3's name, in a version 4 file
     "members are not a checkpoint's: missing params/bngain1.npy; unexpected params/bngain.npy"),
    (renamed("stats/mean1", "stats/mean"), "missing stats/mean1.npy; unexpected stats/mean.npy"),
    (each_param(np.float16), "params/C is float16, not float32"),
    (each_param(np.int32), "params/C is int32, not float32"),
    (each_param(np.dtype(">f4")), "params/C is >f4, not float32"),  # big-endian
    (array("params/W1", lambda w: w.astype(np.float64)), "params/W1 is float64, not float32"),  # among float32s
    (array("opt/000", lambda count: count.astype(np.int64)), "opt/000 is int64, not int32"),
    (array("opt/001", lambda mu: mu.astype(np.float16)), "opt/001 is float16, not float32"),
    (array("params/W2", lambda w: w.T), r"params/W2 has shape \(29, 8\), the configuration needs \(8, 29\)"),
    (array("opt/000", lambda count: count[None]), r"opt/000 has shape \(1,\), the configuration needs \(\)"),
    (array("params/b1", np.array([None] * 8, object)), "params/b1 is not a readable array .*allow_pickle"),
    (array("params/W2", lambda w: np.where(w > 0, np.nan, w)), "params/W2 holds NaN or infinite values"),
    (array("stats/var1", lambda v: np.full_like(v, np.inf)), "stats/var1 holds NaN or infinite values"),
    (array("stats/mean1", lambda m: m.T), r"stats/mean1 has shape \(8, 1\), the configuration needs \(1, 8\)"),
]  # fmt: skip


@pytest.mark.parametrize("edit, message", REFUSED_EDITS, ids=[message for _, message in REFUSED_EDITS])
def test_every_part_is_checked_against_the_header(tmp_path, small, edit, message):
    source, _ = small
    with pytest.raises(CheckpointError, match=message) as refused:
        checkpoint.load(rewritten(source, tmp_path / "c.npz", edit))
    assert str(refused.value).startswith(str(tmp_path / "c.npz"))


def test_only_the_arrays_the_model_computes_with_must_be_finite(tmp_path, small):
    """Adam's second moment can overflow to infinity in a run whose loss stays finite (its update is then
    0): the run saves such a state, so loading must accept it. Parameters and statistics cannot be."""
    source, original = small
    nu_of_C = 8  # leaves: count, mu (7, in sorted names), nu (7), the schedule's count
    assert original.state.opt_state[0].nu["C"].shape == (29, 3)
    back = checkpoint.load(
        rewritten(source, tmp_path / "c.npz", array(f"opt/{nu_of_C:03d}", np.full((29, 3), np.inf, np.float32)))
    )
    assert np.isinf(np.asarray(back.state.opt_state[0].nu["C"])).all()


def test_files_that_are_no_checkpoint_at_all(tmp_path, small):
    source, _ = small
    cases = {
        "empty.npz": (b"", r"not a readable checkpoint: the file is empty \(0 bytes\)"),
        "notes.txt": (b"step 500: loss 2.1\n", r"not an .npz \(zip\) file; it starts b'step 500"),
        "random.npz": (np.random.default_rng(0).bytes(4096), r"not an .npz \(zip\) file"),
        "truncated.npz": (source.read_bytes()[:-100], r"truncated or damaged \(BadZipFile"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "not arrays")
    with pytest.raises(CheckpointError, match=r"without a jaxbirds header \(it holds readme.txt\)"):
        checkpoint.load(tmp_path / "other.zip")
    with zipfile.ZipFile(tmp_path / "twice.npz", "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
        for _ in range(2):
            archive.writestr("header.npy", source.read_bytes())
    with pytest.raises(CheckpointError, match="a member name occurs twice"):
        checkpoint.load(tmp_path / "twice.npz")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        checkpoint.load(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match="pipe is not a regular file"):
        checkpoint.load(tmp_path / "pipe")  # refused before a read that would wait for a writer for ever


def test_a_file_that_cannot_be_read(tmp_path, small, monkeypatch):
    path = tmp_path / "c.npz"
    path.write_bytes(small[0].read_bytes())
    path.chmod(0)
    if os.geteuid() == 0:  # root reads a file whatever its mode: fail the read as it fails for any other user

        def refuse(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(CheckpointError, match="c.npz is not a readable checkpoint: Permission denied"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", ["empty", "truncated"])
def test_sample_script_reports_an_unreadable_checkpoint_in_one_line(tmp_path, small, content):
    path = tmp_path / "c.npz"
    path.write_bytes(b"" if content == "empty" else small[0].read_bytes()[:1000])
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample.py"), "--checkpoint", str(path), "--no-compile-cache"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(path) in done.stderr and "Traceback" not in done.stderr and not done.stdout


#: A one-block model's members before version 4 (the blocks were not numbered), by their name since.
VERSION_3_NAMES = {"params/bngain1": "params/bngain", "params/bnbias1": "params/bnbias",
                   "stats/mean1": "stats/mean", "stats/var1": "stats/var"}  # fmt: skip


#: The config fields of version 3.
VERSION_3_FIELDS = {
    "model_config": ("vocab_size", "context_size", "embedding_dim", "hidden"),
    "train_config": ("steps", "batch_size", "optimizer", "learning_rate", "decay_step", "decay_factor", "seed",
                     "grad_mode", "chunk_size", "unroll"),
}  # fmt: skip


def as_version_3(arrays, header):
    """A version 4 file of one block as version 3 wrote it: the block's names without a number, an integer
    ``hidden``, its config fields. (What the version 3 code wrote, checked against a file it wrote: the same
    members and header fields.)"""
    for name, old in VERSION_3_NAMES.items():
        arrays[old] = arrays.pop(name)
    header["version"] = 3
    for config, fields in VERSION_3_FIELDS.items():
        header[config] = {field: header[config][field] for field in fields}
    header["model_config"]["hidden"] = header["model_config"]["hidden"][0]


def as_version_2(arrays, header):
    """Version 3 added the sweep's members and the loss log's CRC-32; a version 2 file has neither."""
    as_version_3(arrays, header)
    del header["sweep"], header["loss_log_crc32"]
    header["version"] = 2


@pytest.mark.parametrize("old", [as_version_3, as_version_2], ids=["version 3", "version 2"])
def test_a_one_block_checkpoint_of_an_older_version_loads_with_the_numbered_names(tmp_path, small, old):
    source, original = small
    assert VERSION == 4 and set(VERSION_3_NAMES) < set(np.load(source))
    loaded = checkpoint.load(rewritten(source, tmp_path / "c.npz", old))
    assert_same_checkpoint(loaded, original)  # bngain as bngain1, stats/mean as block 1's mean, ...
    assert loaded.model_config.hidden == (8,) and len(loaded.stats) == 1
    if old is as_version_2:
        assert loaded.sweep is None and loaded.loss_log_crc32 is None


#: The header of a checkpoint written by version 3's code (jaxbirds at commit 0598d3a, checkpoint.save of an
#: untrained sgd model of hidden 8 with statistics), copied from the file.
VERSION_3_HEADER = {
    "format": "jaxbirds-checkpoint", "version": 3, "step": 7, "vocab": ". -abcdefghijklmnopqrstuvwxyz",
    "model_config": {"vocab_size": 29, "context_size": 3, "embedding_dim": 3, "hidden": 8},
    "train_config": {"steps": 7, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.1, "decay_step": 100000,
                     "decay_factor": 0.1, "seed": 2147483647, "grad_mode": "autodiff", "chunk_size": 10000,
                     "unroll": 1},
    "has_stats": True, "data": {"path": "birds.csv", "sha256": "0" * 64}, "sweep": None, "loss_log_crc32": 123,
}  # fmt: skip
#: That file's members.
VERSION_3_MEMBERS = ("header", "opt/000", "params/C", "params/W1", "params/W2", "params/b1", "params/b2",
                     "params/bnbias", "params/bngain", "stats/mean", "stats/var")  # fmt: skip


def test_a_file_as_version_3_wrote_it_loads(tmp_path):
    """Its members and header as version 3 wrote them, its arrays what that model held (the draw is the same:
    a one-block model initialises as it did)."""
    mc, tc = model.ModelConfig(vocab_size=29, hidden=8, embedding_dim=3), train.TrainConfig(steps=7)
    state = train.init_state(mc, tc)
    mean, var = np.linspace(-1, 1, 8, dtype=np.float32)[None], np.linspace(0.5, 2, 8, dtype=np.float32)[None]
    p = {name: np.asarray(value) for name, value in state.params.items()}
    arrays = {
        "header": np.frombuffer(json.dumps(VERSION_3_HEADER).encode(), np.uint8), "opt/000": np.int32(0),
        **{f"params/{name}": p[name] for name in ("C", "W1", "W2", "b1", "b2")},
        "params/bnbias": p["bnbias1"], "params/bngain": p["bngain1"], "stats/mean": mean, "stats/var": var,
    }  # fmt: skip
    assert tuple(arrays) == VERSION_3_MEMBERS
    np.savez(tmp_path / "v3.npz", **arrays)
    back = checkpoint.load(tmp_path / "v3.npz")
    chex.assert_trees_all_equal(back.state._replace(step=0), state, strict=True)
    (stats,) = back.stats
    np.testing.assert_array_equal(stats.mean, mean)
    np.testing.assert_array_equal(stats.var, var)
    assert (back.state.step, back.model_config, back.train_config, back.loss_log_crc32) == (7, mc, tc, 123)


@pytest.mark.parametrize("config, field", [(c, f) for c, fields in checkpoint.FIELDS_SINCE.items() for f in fields])
def test_a_field_newer_than_a_file_may_be_missing_only_from_an_older_version_s(tmp_path, small, config, field):
    source, original = small
    assert field not in VERSION_3_FIELDS[config]
    old = checkpoint.load(rewritten(source, tmp_path / "v3.npz", as_version_3))
    assert getattr(old, config) == getattr(original, config)  # the default, as the test's config has it
    with pytest.raises(CheckpointError, match=f"{config} fields are not a checkpoint's: missing {field}$"):
        checkpoint.load(rewritten(source, tmp_path / "c.npz", lambda arrays, header: header[config].pop(field)))


#: Version 3 files that version 3 did not write, and the message each must give.
REFUSED_VERSION_3_EDITS = [
    (config_field("model_config", "hidden", [8]), r"model_config.hidden is \[8\]; before version 4 it must be of type"),
    (config_field("model_config", "hidden", 8.0), "model_config.hidden is 8.0; before version 4 it must be of type"),
    (renamed("params/bngain", "params/bngain1"),
     "members are not a checkpoint's: missing params/bngain.npy; unexpected params/bngain1.npy"),
    (renamed("stats/var", "stats/var1"), "missing stats/var.npy; unexpected stats/var1.npy"),
    (array("stats/var", lambda v: np.full_like(v, np.nan)), "stats/var holds NaN or infinite values"),
    (array("params/bnbias", lambda b: b[0]), r"params/bnbias has shape \(8,\), the configuration needs \(1, 8\)"),
]  # fmt: skip


@pytest.mark.parametrize("edit, message", REFUSED_VERSION_3_EDITS, ids=[m for _, m in REFUSED_VERSION_3_EDITS])
def test_an_older_version_s_file_is_checked_under_its_own_names(tmp_path, small, edit, message):
    source, _ = small
    old = rewritten(source, tmp_path / "v3.npz", as_version_3)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(rewritten(old, tmp_path / "c.npz", edit))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A real checkpoint of two blocks of different widths (adam; with statistics) and its contents."""
    original = small_checkpoint("adam", with_stats=True, hidden=(8, 5))
    return checkpoint.save(tmp_path_factory.mktemp("deep") / "c.npz", original), original


def test_a_checkpoint_of_two_blocks_round_trips_with_every_block_s_own_members(deep):
    path, original = deep
    with np.load(path) as npz:
        names = set(npz)
        np.testing.assert_array_equal(npz["stats/mean2"], original.stats[1].mean)  # block 2's under its own key
        np.testing.assert_array_equal(npz["params/bngain2"], original.state.params["bngain2"])
    assert {name for name in names if not name.startswith("opt/")} == {
        "header", *(f"params/{name}" for name in model.param_names(original.model_config)),
        "stats/mean1", "stats/var1", "stats/mean2", "stats/var2",
    }  # fmt: skip
    assert json.loads(np.load(path)["header"].tobytes())["model_config"]["hidden"] == [8, 5]
    back = checkpoint.load(path)
    assert_same_checkpoint(back, original)
    assert back.model_config.hidden == (8, 5) and [s.mean.shape for s in back.stats] == [(1, 8), (1, 5)]


REFUSED_DEEP_EDITS = [
    (config_field("model_config", "hidden", [8]),
     "unexpected opt/016.npy, .*, params/W3.npy, params/b3.npy, params/bnbias2.npy, params/bngain2.npy, "
     "stats/mean2.npy, stats/var2.npy$"),
    (config_field("model_config", "hidden", [8, 8]), r"params/W2 has shape \(8, 5\), the configuration needs \(8, 8\)"),
    (config_field("model_config", "hidden", [5, 8]), r"params/W1 has shape \(9, 8\), the configuration needs \(9, 5\)"),
    (without("stats/var2"), "members are not a checkpoint's: missing stats/var2.npy"),
    (array("stats/mean2", np.zeros((1, 8), np.float32)), r"stats/mean2 has shape \(1, 8\), the configuration needs"),
    (array("stats/var2", lambda v: v.astype(np.float64)), "stats/var2 is float64, not float32"),
    (array("stats/var2", lambda v: np.full_like(v, np.nan)), "stats/var2 holds NaN or infinite values"),
    (array("params/bngain2", lambda g: np.full_like(g, np.inf)), "params/bngain2 holds NaN or infinite values"),
    (array("params/W3", lambda w: w.T), r"params/W3 has shape \(29, 5\), the configuration needs \(5, 29\)"),
    (header_field("version", 3), r"model_config.hidden is \[8, 5\]; before version 4 it must be of type int"),
]  # fmt: skip


@pytest.mark.parametrize("edit, message", REFUSED_DEEP_EDITS, ids=[message for _, message in REFUSED_DEEP_EDITS])
def test_every_block_is_checked_against_the_header(tmp_path, deep, edit, message):
    source, _ = deep
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(rewritten(source, tmp_path / "c.npz", edit))


def test_saving_statistics_that_are_not_one_per_block_is_refused_at_once(tmp_path, deep):
    """Load would refuse such a file: the bug shows when the state is saved, not when a run is resumed."""
    _, original = deep
    for stats in (original.stats[:1], original.stats[0], (*original.stats, original.stats[0])):
        with pytest.raises(TypeError, match=r"one BatchNormStats per block \(2\)"):
            checkpoint.save(tmp_path / "c.npz", original._replace(stats=stats))
    assert not (tmp_path / "c.npz").exists()


def test_a_loss_log_that_is_not_the_checkpoint_s_own_is_refused(tmp_path):
    log = LossLog(tmp_path / "losses.f32")
    log.append(np.array([3.0, 2.5, 2.0], np.float32))
    crc = log.crc32(2)
    np.testing.assert_array_equal(log.read(2, crc), [3.0, 2.5])
    other = LossLog(tmp_path / "other.f32")
    other.append(np.array([3.0, 2.4], np.float32))
    with pytest.raises(CheckpointError, match="does not hold this checkpoint's loss history"):
        other.read(2, crc)


def test_a_sweep_log_holds_each_step_s_losses_of_every_model(tmp_path):
    log = LossLog(tmp_path / "sweep.f32", models=2)
    log.append(np.array([[1.0, 2.0], [10.0, 20.0]], np.float32))  # (models, steps)
    log.append(np.array([[3.0], [30.0]], np.float32))
    np.testing.assert_array_equal(np.fromfile(log.path, "<f4"), [1, 10, 2, 20, 3, 30])  # step after step
    np.testing.assert_array_equal(log.read(2), [[1, 2], [10, 20]])
    log.truncate(1)
    np.testing.assert_array_equal(log.read(1, log.crc32(1)), [[1], [10]])


def test_a_replacing_writer_writes_the_new_checkpoint_before_it_touches_the_old_log(tmp_path, small, monkeypatch):
    """--overwrite: kill the writer right after its first checkpoint: the old log is untouched and the new
    checkpoint's CRC refuses it (one chunk lost, never a wrong history); the old run's other files stay
    until the new checkpoint is on disk."""
    source, original = small
    path, log = tmp_path / "checkpoint.npz", LossLog(tmp_path / "losses.f32")
    log.append(np.array([9.0, 9.0, 9.0], np.float32))  # the old run's history
    events = []
    real_save = checkpoint.save

    def save_then_die(*args):
        real_save(*args)
        events.append(("saved", log.path.stat().st_size))
        raise KeyboardInterrupt  # stands for a kill -9 between the two writes

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    writer = checkpoint_writer.Writer(path, log, replacing=True, after_first=lambda: events.append("after"))
    new = original._replace(state=original.state._replace(step=2))
    writer.submit(new, np.array([1.0, 0.5], np.float32))
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    assert events == [("saved", 12)]  # the old log was whole when the new checkpoint landed; no clean-up yet
    saved = checkpoint.load(path)
    with pytest.raises(CheckpointError, match="does not hold this checkpoint's loss history"):
        log.read(saved.state.step, saved.loss_log_crc32)

    monkeypatch.setattr(checkpoint, "save", real_save)
    writer = checkpoint_writer.Writer(path, log, replacing=True, after_first=lambda: events.append("after"))
    writer.submit(new, np.array([1.0, 0.5], np.float32))
    writer.close()
    saved = checkpoint.load(path)
    np.testing.assert_array_equal(log.read(saved.state.step, saved.loss_log_crc32), [1.0, 0.5])
    assert events[-1] == "after" and saved.loss_log_crc32 == writer.crc32


def test_the_writer_runs_at_most_one_checkpoint_behind(tmp_path, small, monkeypatch):
    """However fast chunks are, submit() returns only once the checkpoint before it is on disk: a kill
    loses at most the last chunk completed. The wait is counted."""
    _, original = small
    written, real_save = [], checkpoint.save

    def slow_save(path, ckpt):
        time.sleep(0.05)
        real_save(path, ckpt)
        written.append(ckpt.state.step)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    writer = checkpoint_writer.Writer(tmp_path / "c.npz", LossLog(tmp_path / "losses.f32"))
    for step in range(1, 5):
        writer.submit(original._replace(state=original.state._replace(step=step)), np.zeros(1, np.float32))
        assert written[-1:] == ([step - 1] if step > 1 else [])  # the previous one is on disk, every one written
    writer.close()
    assert written == [1, 2, 3, 4] and writer.waited_seconds > 0.1
