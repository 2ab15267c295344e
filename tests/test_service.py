"""The systemd unit (systemd/mocha-edge.service), its environment file and the image's unprivileged user.

The unit runs `docker run ... mocha-edge:jp6 run ...`, which cannot run here; what can be checked is: systemd
accepts the unit (`systemd-analyze verify` on a copy whose docker path points at a binary that exists), the
`run` command line it builds from the shipped environment file is one `mocha-edge run` accepts (every option,
every sink URI), and the container runs as the same non-root user the Dockerfile creates.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "mocha-edge.service"
ENV = REPO / "systemd" / "mocha-edge.env"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file: continuation lines joined, comments dropped."""
    out: dict[str, list[str]] = {}
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith(("#", ";", "["))):
            continue
        buf += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        key, _, val = buf.partition("=")
        out.setdefault(key.strip(), []).append(val.strip())
        buf = ""
    return out


def env_values() -> dict[str, str]:
    vals = {}
    for line in ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            vals[k.strip()] = v.strip()
    return vals


def exec_start_argv() -> list[str]:
    """ExecStart as systemd runs it: ``${VAR}`` is one word from the environment file."""
    (cmd,) = unit_settings(UNIT.read_text())["ExecStart"]
    env = env_values()
    words = []
    for w in shlex.split(cmd):
        missing = [m for m in re.findall(r"\$\{(\w+)\}", w) if m not in env]
        assert not missing, f"{UNIT.name}: {missing} not set in {ENV.name}"
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w))
    return words


def test_unit_restarts_and_stops_cleanly() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Restart"] == ["always"] and float(s["RestartSec"][0]) > 0
    assert int(s["StartLimitBurst"][0]) > 1 and int(s["StartLimitIntervalSec"][0]) > 0
    assert s["EnvironmentFile"] == ["/etc/mocha-edge/mocha-edge.env"]
    argv = exec_start_argv()
    assert "--stop-signal" in argv and argv[argv.index("--stop-signal") + 1] == "SIGTERM"
    # docker's grace before SIGKILL fits inside systemd's stop timeout
    assert int(argv[argv.index("--stop-timeout") + 1]) < int(s["TimeoutStopSec"][0])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on a copy: docker -> a binary that exists here, env file -> the shipped one."""
    true = shutil.which("true")
    text = (
        UNIT.read_text().replace("/usr/bin/docker", true).replace("/etc/mocha-edge/mocha-edge.env", str(ENV))
    )
    text = re.sub(r"^(Requires|After)=.*docker.service.*$", "", text, flags=re.M)  # no docker unit here
    unit = tmp_path / "mocha-edge.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "mocha-edge.service" in ln]
    assert not problems, "\n".join(problems)


def test_run_command_line_is_one_run_accepts(tmp_path: Path) -> None:
    """The words after the image name parse as `mocha-edge run` options, and every sink URI is valid."""
    from mocha_edge.cli import cli
    from mocha_edge.deploy.sinks import parse_sink

    argv = exec_start_argv()
    image = env_values()["MOCHA_IMAGE"]
    run_args = argv[argv.index(image) + 1 :]
    assert run_args[0] == "run"
    run = cli.commands["run"]
    ctx = run.make_context("run", list(run_args[1:]), resilient_parsing=False)
    assert ctx.params["show"] is False
    sinks = ctx.params["sinks"]
    assert len(sinks) == 2
    for uri in sinks:
        parse_sink(uri)


def test_container_user_is_the_dockerfile_user() -> None:
    from test_dockerfile import DOCKERFILE, parse

    instrs = parse(DOCKERFILE.read_text())
    users = [x.args.strip() for x in instrs if x.keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    create = next(x.args for x in instrs if x.keyword == "RUN" and "useradd" in x.args)
    uid = env_values()["MOCHA_UID"]
    assert f"--uid {uid}" in create and f"--gid {uid}" in create
    argv = exec_start_argv()
    assert argv[argv.index("--user") + 1] == f"{uid}:{uid}"


def test_service_doc_covers_what_operators_ask() -> None:
    doc = (REPO / "docs" / "service.md").read_text()
    for needle in ("systemctl enable --now mocha-edge", "journalctl -u mocha-edge", "Restart=always",
                   "exit code 3", "rotate=daily", "segment=10m", "10001", "SIGHUP", "kill -9", "mocha-edge.env"):  # fmt: skip
        assert needle in doc, f"docs/service.md does not mention {needle}"
