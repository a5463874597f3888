"""`keras-openpi serve` refuses bad flags at start-up, before the model loads.

The model path of these tests does not exist: a flag error must come first
(loading a real model takes minutes), so the error is about the flag.
"""

import re
import socket

import pytest

from keras_openpi.cli import main
from keras_openpi.commands.serve import API_KEY_ENV


def serve(tmp_path, capsys, *flags):
    code = main(["serve", str(tmp_path / "missing.keras"), *flags])
    return code, capsys.readouterr().err.strip()


MB = "--max-message-mb must be a positive number of MiB, got "
PORT = "--port must be in [0, 65535] (0: any free port), got "
BAD_FLAGS = {
    "empty_key": (
        ["--api-key", ""],
        None,
        "--api-key: the API key is empty (''); pass a non-empty key, or no --api-key (and no "
        "$KERAS_OPENPI_API_KEY) to serve without authentication.",
    ),
    "blank_key": (["--api-key", "   "], None, "--api-key: the API key is empty ('   ')"),
    "empty_env_key": ([], "", f"--api-key (or ${API_KEY_ENV}): the API key is empty ('')"),
    "padded_key": (
        ["--api-key", "key "],
        None,
        "--api-key: the API key must be printable ASCII without leading or trailing spaces",
    ),
    "zero_mb": (["--max-message-mb", "0"], None, MB + "0.0."),
    "nan_mb": (["--max-message-mb", "nan"], None, MB + "nan."),
    "inf_mb": (["--max-message-mb", "inf"], None, MB + "inf."),
    "zero_steps": (["--num-steps", "0"], None, "--num-steps must be at least 1, got 0."),
    "high_port": (["--port", "70000"], None, PORT + "70000."),
    "negative_port": (["--port", "-1"], None, PORT + "-1."),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, monkeypatch, case):
    flags, env, error = BAD_FLAGS[case]
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(API_KEY_ENV, env)
    code, stderr = serve(tmp_path, capsys, *flags)
    assert code == 2
    assert stderr.startswith("keras-openpi serve: error: " + error), stderr
    assert "\n" not in stderr


def test_without_a_key_the_flags_pass_and_the_model_is_looked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    code, stderr = serve(tmp_path, capsys, "--port", "0")
    assert code == 2 and "no checkpoint at" in stderr and "missing.keras" in stderr


def test_record_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "records").write_text("not a directory")
    code, stderr = serve(tmp_path, capsys, "--port", "0", "--record", str(tmp_path / "records"))
    assert code == 2
    error = f"--record {tmp_path / 'records'}: exists and is not a directory."
    assert stderr == f"keras-openpi serve: error: {error}"


def test_a_taken_port_is_refused_before_loading(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = serve(tmp_path, capsys, "--port", str(port))
    assert code == 2
    assert re.fullmatch(
        rf"keras-openpi serve: error: cannot listen on --host 127\.0\.0\.1 --port {port}: "
        r"Address already in use \(choose another --port\)\.",
        stderr,
    ), stderr
