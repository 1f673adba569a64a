"""docs/walkthrough.ipynb: it runs top to bottom with its exercises solved, its checkers catch wrong answers,
and the committed copy holds its outputs (needs the `notebook` extra).

The notebook's exercise cells (tagged ``exercise``) hold blanks (``...``); the markdown cell after each
(tagged ``solution``) reveals a solution as a fenced ``python`` block. The tests splice the solutions
(or deliberately wrong versions of them) into the exercise cells and run the result.
"""

import re

import pytest
from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason='the notebook test needs pip install -e ".[notebook]"')
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"

#: One wrong answer per exercise: (text of the solution, what it becomes), a mistake a learner could make.
WRONG = {
    "exercise-1": ("set(-1.0 / n)", "set(-1.0)"),  # forgot the mean's 1/n
    "exercise-2": ("- jax.nn.one_hot(Yb, V)) / n", "- jax.nn.one_hot(Yb, V))"),  # forgot 1/n
    "exercise-3": ("- n / (n - 1) * bnraw * dgain", "- bnraw * dgain"),  # the "break it" mistake
    "exercise-4": ("p - lr * grads[name]", "p + lr * grads[name]"),  # ascent instead of descent
}


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def exercise_of(cell) -> str | None:
    return next((tag for tag in tags(cell) if tag.startswith("exercise-")), None)


def solutions(notebook) -> dict[str, str]:
    """Each exercise's solution: the fenced python block of the ``solution`` cell that follows it."""
    found, current = {}, None
    for cell in notebook.cells:
        if exercise_of(cell):
            current = exercise_of(cell)
        elif "solution" in tags(cell):
            found[current] = re.search(r"```python\n(.*?)\n```", cell.source, re.S).group(1)
    return found


def run(notebook, tmp_path):
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError at the first cell that fails
    return notebook


def text_of(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs)


def test_every_exercise_has_a_blank_and_a_solution():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    exercises = {exercise_of(c): c for c in notebook.cells if exercise_of(c)}
    assert sorted(exercises) == sorted(WRONG)
    assert all("..." in cell.source and "# TODO" in cell.source for cell in exercises.values())
    found = solutions(notebook)
    assert sorted(found) == sorted(WRONG)
    for name, (right, _) in WRONG.items():
        assert "..." not in found[name] and right in found[name], name


@pytest.mark.slow
def test_the_walkthrough_runs_top_to_bottom_with_the_solutions(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    answers = solutions(notebook)
    for cell in notebook.cells:
        if exercise_of(cell):
            cell.source = answers[exercise_of(cell)]
    run(notebook, tmp_path)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code_cells)  # every cell showed something
    assert not any(out.output_type == "error" for cell in code_cells for out in cell.outputs)
    shown = {exercise_of(cell): text_of(cell) for cell in code_cells if exercise_of(cell)}
    assert "-- 26 exact, 26 approximate, 0 wrong, 0 not written yet" in shown["exercise-1"]  # bitwise, as the library
    assert "approximate: True" in shown["exercise-2"] and "approximate: True" in shown["exercise-3"]
    assert "-- 7 exact, 7 approximate, 0 wrong" in shown["exercise-4"]
    broken = next(text_of(cell) for cell in code_cells if "break-it" in tags(cell))
    assert "approximate: False" in broken
    everything = "".join(text_of(cell) for cell in code_cells)
    assert "26 of 26 tensors bitwise equal to jax.grad" in everything and "invented:" in everything


@pytest.mark.slow
def test_the_checkers_say_so_when_an_answer_is_wrong(tmp_path):
    """Only the setup cell and the exercises run, each exercise with its solution made wrong."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    answers = solutions(notebook)
    setup = [cell for cell in notebook.cells if "setup" in tags(cell)]
    context = next(c for c in notebook.cells if c.cell_type == "code" and "params = model.init_params" in c.source)
    exercises = []
    for name, (right, wrong) in WRONG.items():
        cell = nbformat.v4.new_code_cell(answers[name].replace(right, wrong))
        cell.metadata["tags"] = [name]
        exercises.append(cell)
    notebook.cells = [*setup, context, *exercises]
    run(notebook, tmp_path)
    shown = {exercise_of(cell): text_of(cell) for cell in exercises}
    for name, text in shown.items():
        assert "approximate: False" in text, (name, text)
    assert "| not written yet" not in "".join(shown.values())  # every wrong answer was run, none left blank


def test_the_committed_notebook_holds_its_outputs():
    """It reads on a code host without running: every code cell was executed and kept its output, and the
    committed exercises show their blanks as the checker reports them."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count and cell.outputs for cell in code_cells)
    assert not any(out.output_type == "error" for cell in code_cells for out in cell.outputs)
    for cell in code_cells:
        if exercise_of(cell):
            assert "not written yet" in text_of(cell), exercise_of(cell)
