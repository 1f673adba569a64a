"""Many processes, one sweep: two processes over 127.0.0.1, one CPU device each, train what one
process trains, bit for bit; they agree on a bad input and on a stop; a process whose peer is
killed ends with an error line; the flags that describe the processes are checked."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT
from test_gradcheck import load_script
from test_train_cli import run_cli, strict_json

from jaxbirds import checkpoint, distributed, sweep
from jaxbirds.errors import ConfigError

SCRIPT = ROOT / "scripts" / "sweep.py"
#: Two models, one per process: a tiny grid, so that each test costs little beyond JAX's start-up.
GRID = ["--hidden", "8", "--lr", "0.1", "--seeds", "2", "--chunk", "100", "--log-every", "100", "--no-plot"]
#: The most seconds any process of these tests may take (a hang fails the test instead of stalling it).
TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int = 1) -> dict:
    """This environment (with its JAXBIRDS_CACHE_DIR, see conftest.py), with ``devices`` CPU devices per
    process and no cluster for jax.distributed to find."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR"))}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


@contextlib.contextmanager
def two_processes(tmp_path, args, out_of=lambda i, tmp_path: tmp_path / f"out{i}", devices: int = 1, more=((), ())):
    """Processes 0 and 1 of one sweep, with ``devices`` each, started with ``args`` and ``more[i]`` (process
    i writing to ``out_of(i)``); their output goes to files (tmp_path/p{i}.out, .err). Whatever is still
    running at the end is killed."""
    port, env = free_port(), child_env(devices)
    procs = []
    try:
        for i in range(2):
            command = [sys.executable, "-u", str(SCRIPT), *args, *more[i], "--out", str(out_of(i, tmp_path))]
            command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            with open(tmp_path / f"p{i}.out", "w") as out, open(tmp_path / f"p{i}.err", "w") as err:
                procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=tmp_path))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def finish(procs, tmp_path) -> list[tuple[int, str, str]]:
    """Each process's exit code, stdout and stderr, once every one has ended (within TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    for p in procs:
        p.wait(timeout=max(deadline - time.monotonic(), 1))
    return [(p.returncode, (tmp_path / f"p{i}.out").read_text(), (tmp_path / f"p{i}.err").read_text())
            for i, p in enumerate(procs)]  # fmt: skip


def wait_for_progress(procs, tmp_path) -> None:
    """Until process 0 prints its first progress line (after its first chunk)."""
    deadline = time.monotonic() + TIMEOUT
    while "\nstep " not in (tmp_path / "p0.out").read_text():
        assert all(p.poll() is None for p in procs), finish(procs, tmp_path)
        assert time.monotonic() < deadline, "no progress line"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_bit_for_bit(tmp_path, capsys):
    """Two devices in each process, two models: the mesh takes one device of each process (the first
    two devices of all, both in process 0, would leave process 1 nothing to train)."""
    args = [*GRID, "--steps", "300"]
    with two_processes(tmp_path, args, devices=2) as procs:
        (code0, out0, err0), (code1, out1, err1) = finish(procs, tmp_path)
    assert code0 == 0 and code1 == 0, (err0, err1)
    assert "2 device(s) (cpu, 2 processes)" in out0 and "best *" in out0
    assert "sweep:" not in out1 and "step" not in out1 and not (tmp_path / "out1").exists()  # only process 0
    # the same grid in this process, on its one device
    code, _, _ = run_cli(load_script("sweep"), [*args, "--out", str(tmp_path / "solo")], capsys)
    assert code == 0
    two, one = strict_json(tmp_path / "out0" / "sweep.json"), strict_json(tmp_path / "solo" / "sweep.json")
    assert two["devices"] == 2 and one["devices"] == 1
    assert two["runs"] == one["runs"] and two["best"] == one["best"] and two["steps"] == one["steps"] == 300
    saved = [checkpoint.load(tmp_path / d / "checkpoint.npz") for d in ("out0", "solo")]
    leaves = [jax.tree.leaves((c.state, c.stats)) for c in saved]
    assert len(leaves[0]) == len(leaves[1]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(*leaves, strict=True))
    losses = [(tmp_path / d / "losses.f32").read_bytes() for d in ("out0", "solo")]
    assert losses[0] == losses[1] and len(losses[0]) == 4 * 300


@pytest.mark.slow
def test_an_input_only_one_process_refuses_ends_both_with_the_same_error_line(tmp_path):
    """Process 0 alone is given an --out it cannot make (it alone checks --out: it alone writes)."""
    (tmp_path / "a-file").write_text("")
    unwritable = lambda i, tmp_path: tmp_path / ("a-file/out" if i == 0 else "out1")  # noqa: E731
    with two_processes(tmp_path, [*GRID, "--steps", "300"], unwritable) as procs:
        results = finish(procs, tmp_path)
    lines = [err.strip().splitlines()[-1] for _, _, err in results]
    assert [code for code, _, _ in results] == [2, 2], results
    assert lines[0] == lines[1] and lines[0].startswith("error: ") and "a-file" in lines[0], lines
    assert "(process 0 of 2)" in lines[0] and "Traceback" not in results[0][2] + results[1][2]
    assert not (tmp_path / "out1").exists()


@pytest.mark.slow
def test_processes_given_different_sweeps_are_refused_with_the_same_error_line(tmp_path):
    with two_processes(tmp_path, [*GRID, "--steps", "300"], more=((), ("--batch-size", "16"))) as procs:
        results = finish(procs, tmp_path)
    assert [code for code, _, _ in results] == [2, 2], results
    assert [err.strip().splitlines()[-1] for _, _, err in results] == [
        "error: the processes were not given the same sweep: process 1's differs from process 0's (run the same "
        "command on every process, with only --process-id changed)"
    ] * 2  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_reaching_one_process_stops_both_after_the_same_chunk_and_saves(tmp_path):
    """SIGINT to process 1, which prints nothing: process 0 learns of it through the agreed stop."""
    with two_processes(tmp_path, [*GRID, "--steps", "100000"]) as procs:
        wait_for_progress(procs, tmp_path)
        procs[1].send_signal(signal.SIGINT)
        (code0, out0, err0), (code1, _, err1) = finish(procs, tmp_path)
    assert code0 == code1 == 130, (err0, err1)
    report = strict_json(tmp_path / "out0" / "sweep.json")
    assert report["interrupted"] and 100 <= report["steps"] < 100000 and report["steps"] % 100 == 0
    assert checkpoint.load(tmp_path / "out0" / "checkpoint.npz").state.step == report["steps"]
    assert f"interrupted at step {report['steps']:,}" in out0


@pytest.mark.slow
def test_a_process_whose_peer_is_killed_ends_with_an_error_line(tmp_path):
    with two_processes(tmp_path, [*GRID, "--steps", "100000"]) as procs:
        wait_for_progress(procs, tmp_path)
        procs[1].kill()
        start = time.monotonic()
        procs[0].wait(timeout=distributed.HEARTBEAT_TIMEOUT + 30)
        elapsed = time.monotonic() - start
    err = (tmp_path / "p0.err").read_text()
    assert procs[0].returncode == distributed.PEER_LOST, err
    assert err.strip().splitlines()[-1].startswith("error: lost contact with another process"), err
    assert elapsed < distributed.HEARTBEAT_TIMEOUT and not (tmp_path / "out0" / "sweep.json").exists()


@pytest.mark.slow
def test_a_process_alone_gives_up_waiting_for_the_others_with_an_error_line(tmp_path):
    command = [sys.executable, str(SCRIPT), *GRID, "--out", str(tmp_path / "out"), "--connect-timeout", "1"]
    command += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == distributed.PEER_LOST
    assert done.stderr.strip().splitlines() == [
        f"error: process 1 could not join the other processes at {command[-5]} within 1 s: start every process "
        "with the same --coordinator and --num-processes and its own --process-id (0 hosts the coordinator)"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "takes HOST:PORT"),
        (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"], "takes HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "the process ids are 0 to 1"),
        (["--num-processes", "0"], "must be a positive integer"),
        (["--process-id", "-1"], "must be 0 or more"),
    ],
)
def test_flags_that_cannot_describe_a_process_are_one_error_line(tmp_path, capsys, args, message):
    code, _, err = run_cli(load_script("sweep"), [*GRID, *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_distributed_with_no_cluster_around_says_what_is_missing(tmp_path):
    command = [sys.executable, str(SCRIPT), *GRID, "--out", str(tmp_path / "out"), "--distributed"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --coordinator HOST:PORT is needed: no cluster environment (SLURM, Open MPI, ...) gives it"
    ]  # fmt: skip


def test_devices_are_counted_over_every_process_the_same_number_from_each():
    assert sweep.choose_devices(4, None, 4, processes=2) == 4 and sweep.choose_devices(6, None, 8, processes=2) == 6
    assert sweep.choose_devices(2, None, 4, processes=2) == 2  # one device of each process, never two of one
    assert sweep.choose_devices(12, None, 8) == 6  # one process: as before
    with pytest.raises(ConfigError, match="3 models do not split evenly over 2 processes"):
        sweep.choose_devices(3, None, 4, processes=2)
    with pytest.raises(ConfigError, match="--devices 3 do not split evenly over 2 processes: pass a multiple of 2"):
        sweep.choose_devices(6, 3, 4, processes=2)
    with pytest.raises(ConfigError, match="the 2 processes have, between them, 4 device"):
        sweep.choose_devices(8, 8, 4, processes=2)
    mesh = sweep.make_mesh(1)  # this process alone: its first device
    assert mesh.devices.tolist() == jax.devices()[:1] and mesh.axis_names == (sweep.MODELS,)
    too_many = len(jax.devices()) + 1
    with pytest.raises(ConfigError, match=f"{too_many} devices do not split evenly over 1 process"):
        sweep.make_mesh(too_many)


def test_alone_every_agreement_is_this_process_s_own():
    assert distributed.any_process(True) and not distributed.any_process(False)
    distributed.require_same("anything")
    with pytest.raises(ConfigError, match="^refused$"), distributed.agreed_errors():
        raise ConfigError("refused")
    assert distributed.local_device_counts() == [len(jax.devices())]
    with pytest.raises(ConfigError, match="the process ids are 0 to 2"):
        distributed.check(distributed.Cluster("h:1", 3, 3))
