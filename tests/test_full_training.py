"""The full default recipe in every gradient mode (slow: run with `pytest -m slow`)."""

import dataclasses

import pytest

from jaxbirds import evaluate, model, train


@pytest.mark.slow
@pytest.mark.parametrize("mode", train.GRAD_MODES)
def test_default_recipe_reaches_the_tutorials_losses(dataset, mode):
    config = dataclasses.replace(train.TrainConfig(), grad_mode=mode)
    model_config = model.ModelConfig(vocab_size=dataset.vocab.size)
    result = train.train(dataset.train.X, dataset.train.Y, config, train.init_state(model_config, config))
    stats = evaluate.calibrate(result.state.params, dataset.train.X)
    losses = {name: evaluate.split_loss(result.state.params, stats, s.X, s.Y) for name, s in dataset.splits.items()}
    print(mode, losses, f"{config.steps / result.train_seconds:,.0f} steps/s")
    assert losses["dev"] <= 1.405 and losses["train"] <= 1.355
