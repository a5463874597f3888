"""The simulator examples' tests (ALOHA, MetaWorld): the simulator's python, commands in a process group."""

import os
import pathlib
import signal
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def sim_python(env_var, venv, name, contents, example):
    """The simulator's python: `$env_var`, else `<repo>/<venv>/bin/python`; fails the test if absent.

    `name` names the simulator, `contents` what its venv holds besides openpi-client,
    `example` the folder under examples/ whose setup.sh makes it.
    """
    path = pathlib.Path(os.environ.get(env_var, REPO / venv / "bin" / "python"))
    if not path.exists():
        pytest.fail(
            f"{name}'s python {path} not found: run scripts/test.sh (it runs "
            f"examples/{example}/setup.sh, which creates {venv} with {contents} and "
            f"openpi-client and installs Mesa's EGL) or set {env_var}."
        )
    return str(path)


def run(command, timeout, **env):
    """Runs `command` in its own process group; returns its stdout.

    Kills the whole group (a policy server and a simulator included) and fails
    the test if it runs past `timeout` seconds; fails it if it exits non-zero.
    """
    process = subprocess.Popen(
        list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **env), start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[1]} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, f"{command[1]} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout
