"""The tutorial's PyTorch loop (manual gradients), when ``torch`` is installed: the ``torch`` study."""

from __future__ import annotations

import functools

import numpy as np

from jaxbirds.bench.study import Study
from jaxbirds.bench.tables import Row
from jaxbirds.bench.timing import Bench, measure

MISSING = "torch is not installed (pip install -e '.[torch]'): the PyTorch reference was skipped"


def torch_missing(b: Bench) -> str | None:
    """Why the study cannot run: :data:`MISSING` if ``torch`` cannot be imported here; the bench's model is
    deeper than the tutorial's loop (one block); else ``None``."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return MISSING
    if b.model_config.depth != 1:
        return f"the tutorial's PyTorch loop has one hidden block, the bench's model {b.model_config.depth}"
    return None


def best_scan_steps_per_s(dispatch: list[Row]) -> float | None:
    """The fastest scan variant's steps per second among the dispatch study's rows; ``None`` without any."""
    return max((r["steps_per_s"] for r in dispatch if r["variant"] == "scan"), default=None)


def torch_study(b: Bench, jax_steps_per_s: float | None) -> list[Row]:
    """The tutorial's PyTorch loop (manual gradients): its Python-loop embedding gradient and a
    vectorised one, ``torch_steps`` steps a run (needs ``torch`` and a one-block model: see :func:`torch_missing`).

    Args:
        b: the bench (its training split, model and settings).
        jax_steps_per_s: jaxbirds' fastest steps per second, for the speed-up column (NaN without it).

    Returns:
        One row per variant: ``variant``, ``steps_per_s``, ``us_per_step``, ``jaxbirds_speedup``,
        ``torch`` (its version) and ``torch_threads``.
    """
    import torch

    from jaxbirds.torch_reference import tutorial_training_loop

    rows = []
    X, Y = torch.from_numpy(b.dataset.train.X.astype(np.int64)), torch.from_numpy(b.dataset.train.Y.astype(np.int64))
    for variant, vectorised in [("tutorial loop (Python loop for dC)", False), ("same, dC by index_add_", True)]:
        n = b.config.torch_steps
        loop = functools.partial(tutorial_training_loop, X, Y, b.model_config, n, vectorised)
        timing = measure(loop, max(1, b.config.repeats // 2))
        rate = n / timing.median
        rows.append(
            {
                "variant": variant,
                "steps_per_s": rate,
                "us_per_step": 1e6 / rate,
                "jaxbirds_speedup": (jax_steps_per_s / rate) if jax_steps_per_s else float("nan"),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    return rows


def run(b: Bench, dispatch: list[Row]) -> list[Row]:
    """:func:`torch_study` against the fastest scan of the dispatch study, if it ran (``dispatch``: its rows)."""
    return torch_study(b, best_scan_steps_per_s(dispatch))


STUDY = Study(
    name="torch",
    title="The tutorial's PyTorch loop (same recipe, manual gradients)",
    columns=(
        ("variant", "variant", ""),
        ("steps_per_s", "steps/s", ",.0f"),
        ("us_per_step", "µs/step", ",.1f"),
        ("jaxbirds_speedup", "jaxbirds scan × faster", ".1f"),
        ("torch", "torch", ""),
        ("torch_threads", "threads", ""),
    ),
    run=run,
    uses=("dispatch",),
    skip_reason=torch_missing,
)
