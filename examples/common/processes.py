"""Subprocesses of the simulator studies (ALOHA, MetaWorld): logged commands with a time limit,
and the policy server.

Each command's CPU time (user + system, its children included) is measured beside its wall
time: on a machine shared with other jobs the wall time says little, the CPU time says what
the work costs (see examples/metaworld/README.md, "Time").
"""

import os
import re
import resource
import subprocess
import sys
import threading
import time

# Lines of a failing command that are not echoed (its log has them).
_QUIET = ("    ", "Traceback", "RuntimeError", "Exception ignored", "I0000", "WARNING: All log")


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command, log, timeout=None, env=None):
    """Runs `command`, echoing its output to stdout and to the file `log`.

    Returns:
        `{"wall_s", "cpu_s"}` of the command.

    Raises:
        RuntimeError: it failed, or ran past `timeout` seconds (then it is killed).
    """
    print("$ " + " ".join(map(str, command)), flush=True)
    expired = threading.Event()
    start, cpu = time.time(), _children_cpu()
    with open(log, "w") as out:
        process = subprocess.Popen(
            list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env,
        )

        def kill():
            expired.set()
            process.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            for line in process.stdout:
                out.write(line)
                if not line.startswith(_QUIET) and "\x1b[" not in line:
                    sys.stdout.write(line)
            code = process.wait()
        finally:
            if timer:
                timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    scripts = [os.path.basename(str(c)) for c in command if str(c).endswith((".py", ".sh"))]
    name = scripts[0] if scripts else " ".join(map(str, command[1:4]))
    if expired.is_set():
        raise RuntimeError(f"{name} ran past {timeout} s and was killed; see {log}")
    if code != 0:
        raise RuntimeError(f"{name} failed with exit code {code}; see {log}")
    return {"wall_s": round(time.time() - start, 1), "cpu_s": round(_children_cpu() - cpu, 1)}


class PolicyServer:
    """`keras-openpi serve MODEL --robot ROBOT --port 0` in a subprocess, its log in a file.

    Args:
        model: the `.keras` policy (its `norm_stats.json` beside it).
        log: the file that gets the server's log.
        robot: the server's `--robot` (`aloha`, `metaworld`).
        options: more `keras-openpi serve` arguments (e.g. `["--tokenizer", PATH]`).
        startup_timeout: seconds to wait for the server to listen.
    """

    def __init__(self, model, log, robot, options=(), startup_timeout=600):
        self.command = [
            sys.executable, "-m", "keras_openpi", "serve", str(model), "--robot", robot,
            "--port", "0", "--seed", "0", *map(str, options),
        ]
        self.log_path, self.startup_timeout = log, startup_timeout
        self.port, self.process = None, None

    def __enter__(self):
        print("$ " + " ".join(self.command), flush=True)
        self.start, self.cpu = time.time(), _children_cpu()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        ready = threading.Event()

        def read():
            with open(self.log_path, "w") as log:
                for line in self.process.stderr:
                    log.write(line)
                    log.flush()
                    match = re.search(r"listening on ws://[\d.]+:(\d+)", line)
                    if match:
                        self.port = int(match.group(1))
                        ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the policy server did not start; see {self.log_path}")
        self.startup_s = round(time.time() - self.start, 1)
        print(f"policy server listening on port {self.port} ({self.startup_s} s)", flush=True)
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.times = {
            "wall_s": round(time.time() - self.start, 1),
            "cpu_s": round(_children_cpu() - self.cpu, 1),
        }
