"""Checkpoints: round trip, atomic writes, clear errors."""

import dataclasses
import os

import chex
import jax
import numpy as np
import pytest

from jaxbirds import checkpoint, model, train
from jaxbirds.checkpoint import Checkpoint, CheckpointError


@pytest.fixture(scope="module", params=["sgd", "adam"])
def ckpt(request, dataset):
    tc = train.TrainConfig(steps=50, chunk_size=50, optimizer=request.param, learning_rate=0.01)
    mc = model.ModelConfig(vocab_size=dataset.vocab.size, hidden=16)
    result = train.train(dataset.train.X, dataset.train.Y, tc, train.init_state(mc, tc))
    stats = train.calibrate(result.state.params, dataset.dev.X)
    return Checkpoint(result.state, stats, result.losses, dataset.vocab, mc, tc)


def test_round_trip_restores_everything(tmp_path, ckpt):
    path = checkpoint.save(tmp_path / "c.npz", ckpt)
    back = checkpoint.load(path)
    chex.assert_trees_all_equal(back.state.params, ckpt.state.params)
    chex.assert_trees_all_equal(back.state.opt_state, ckpt.state.opt_state)
    assert jax.tree_util.tree_structure(back.state.opt_state) == jax.tree_util.tree_structure(ckpt.state.opt_state)
    chex.assert_trees_all_equal(back.stats, ckpt.stats)
    np.testing.assert_array_equal(back.losses, ckpt.losses)
    assert (back.state.step, back.vocab, back.model_config, back.train_config) == (
        50, ckpt.vocab, ckpt.model_config, ckpt.train_config)


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
