"""JIT performance studies: the same training step computed and compiled in different ways.

Every study returns a list of rows (plain dicts) measured in this process, side
by side, so that ratios compare like with like on a noisy machine. Times are
medians of ``repeats`` runs after a warm-up run; the min-max spread is kept.
``scripts/bench.py`` runs them (all, or ``--only`` some) in the order of :data:`STUDIES`:

* ``dispatch``   (:mod:`.dispatch`)     - eager vs jit-per-step vs scan-fused chunks (and unrolling);
* ``modes``      (:mod:`.modes`)        - every gradient mode of :data:`jaxbirds.modes.MODES`: autodiff, custom_vjp,
  custom_jvp, manual (by hand, fused) and atomic (by hand, every intermediate);
* ``xla``        (:mod:`.xla`)          - what XLA compiled: FLOPs, bytes, kernels (thunks) per step;
* ``scaling``    (:mod:`.scaling`)      - batch and hidden sweeps, float32 vs float64;
* ``vmap``       (:mod:`.vmap`)         - K independent models trained in one compiled step;
* ``torch``      (:mod:`.pytorch`)      - the tutorial's PyTorch loop, when ``torch`` is installed;
* ``accuracy``   (:mod:`.accuracy`)     - float32 gradients of every mode against a float64 reference; loss drift;
* ``memory``     (:mod:`.memory`)       - what each mode's compiled step needs, and what it keeps for the backward pass;
* ``compile``    (:mod:`.compile_time`) - seconds to compile the training chunk, per gradient mode and chunk length;
* ``startup``    (:mod:`.startup`)      - ``scripts/train.py`` run twice in fresh processes sharing one new
  compilation cache: where the time outside training goes, cold and warm;
* ``evaluation`` (:mod:`.evaluation`)   - calibration and evaluation after training, product vs lookup tables;
* ``diagnostics`` (:mod:`.diagnostics`) - the training step with the per-step diagnostics recorded, against without.

Every study measures the bench's model (:class:`Bench`: the tutorial's one block of 200, or the
blocks of ``scripts/bench.py --hidden``); sweeps over the hidden width give it to every block.

What they share: :mod:`.timing` (:class:`BenchConfig`, :class:`Bench`, ``measure``), :mod:`.tables`
(rows and ``markdown_table``), :mod:`.variants` (one training step outside scan) and
:mod:`.study` (:class:`~jaxbirds.bench.study.Study`). Adding a study is one module that defines
``STUDY`` and one entry in :data:`STUDIES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from jaxbirds import plots
from jaxbirds.bench import (
    accuracy,
    compile_time,
    diagnostics,
    dispatch,
    evaluation,
    memory,
    modes,
    pytorch,
    scaling,
    startup,
    vmap,
    xla,
)
from jaxbirds.bench.study import Study
from jaxbirds.bench.timing import Bench, BenchConfig

__all__ = ["FIGURES", "STUDIES", "Bench", "BenchConfig", "Study", "plan", "plot_results"]

#: Every study by name, in the order the suite runs them; a study's ``needs`` and ``uses`` come before it.
STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        dispatch.STUDY,
        modes.STUDY,
        xla.STUDY,
        scaling.STUDY,
        vmap.STUDY,
        pytorch.STUDY,
        accuracy.STUDY,
        memory.STUDY,
        compile_time.STUDY,
        startup.STUDY,
        evaluation.STUDY,
        diagnostics.STUDY,
    )
}

#: The figure :func:`plot_results` writes for each study that has one (``scripts/bench.py --plot`` lists them).
FIGURES: dict[str, str] = {name: study.figure.file for name, study in STUDIES.items() if study.figure}


def plan(names: Iterable[str]) -> list[Study]:
    """The studies to run for ``names``: those, and every study they need (transitively), in :data:`STUDIES`' order.

    Args:
        names: keys of :data:`STUDIES`.

    Returns:
        The studies in the order to run them: each after the studies it needs or uses.
    """
    wanted = set(names)
    for study in reversed(STUDIES.values()):  # a study needs only earlier ones: one backward pass closes the set
        if study.name in wanted:
            wanted.update(study.needs)
    return [study for study in STUDIES.values() if study.name in wanted]


def plot_results(results: Mapping, out_dir) -> list[Path]:
    """PNG figures of the studies that a picture explains better than a table.

    Args:
        results: ``{study name: rows}`` (what ``scripts/bench.py`` saves; other keys are ignored).
        out_dir: the directory to write :data:`FIGURES` into (created if need be).

    Returns:
        The paths written, in :data:`STUDIES`' order: one per study with a figure and rows to draw.
    """
    plots.require()
    written = []
    for name, study in STUDIES.items():
        if study.figure and results.get(name):
            path = study.figure.draw(results[name], Path(out_dir) / study.figure.file)
            if path is not None:
                written.append(path)
    return written
