"""Checkpoints: round trip, atomic writes, clear errors."""

import dataclasses
import os

import chex
import jax
import numpy as np
import pytest

from jaxbirds import checkpoint, evaluate, model, train
from jaxbirds.checkpoint import Checkpoint, CheckpointError, DataSource, LossLog


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
    with pytest.raises(CheckpointError, match="holds 2 losses"):
        log.read(3)


def test_saving_costs_the_same_whatever_the_length_of_the_run(tmp_path, ckpt):
    """The checkpoint holds no loss history: its size does not grow with the step count."""
    small = checkpoint.save(tmp_path / "a.npz", ckpt).stat().st_size
    later = ckpt._replace(state=ckpt.state._replace(step=10_000_000))
    assert checkpoint.save(tmp_path / "b.npz", later).stat().st_size <= small + 16  # the step's digits


def test_writer_saves_in_the_background_and_keeps_every_loss(tmp_path, ckpt):
    log = LossLog(tmp_path / "losses.f32")
    log.truncate(0)
    writer = checkpoint.Writer(tmp_path / "c.npz", log)
    for step in (10, 20, 30):
        writer.submit(ckpt._replace(state=ckpt.state._replace(step=step)), np.full(10, step, np.float32))
    writer.close()
    assert checkpoint.load(tmp_path / "c.npz").state.step == 30
    np.testing.assert_array_equal(log.read(30), np.repeat([10, 20, 30], 10))
    assert writer.seconds > 0


def test_a_writer_error_surfaces_in_the_callers_thread(tmp_path, ckpt):
    (tmp_path / "blocked").write_text("a file where the checkpoint's directory should be")
    log = LossLog(tmp_path / "losses.f32")
    writer = checkpoint.Writer(tmp_path / "blocked" / "c.npz", log)
    writer.submit(ckpt, np.zeros(1, np.float32))
    with pytest.raises(OSError):
        writer.close()
