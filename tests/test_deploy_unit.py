"""The systemd unit in deploy/ is one systemd accepts and one that serves the way we mean.

`systemd-analyze verify` exits 0 even for unknown keys and invalid values (it
only warns), so the tests read its stderr for anything said about our unit.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashllm.runtime.clients.cli import EXIT_USER_ERROR

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT_PATH = DEPLOY / "flashllm.service"
ENV_PATH = DEPLOY / "flashllm.env"
SYSUSERS_PATH = DEPLOY / "flashllm.sysusers"
INSTALLED_BINARY = "/usr/local/bin/flashllm"
# The server's drain timeout on SIGTERM, as documented in the unit; systemd
# must wait longer than that before SIGKILL.
DRAIN_TIMEOUT_S = 30
MAX_SOCKET_PATH_BYTES = 107

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (package systemd)"
)


def read_unit_settings(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> every value given, in order (keys like DeviceAllow= repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, equals, value = line.partition("=")
            assert equals, f"{path.name}: not KEY=value: {line!r}"
            values[key] = value
    return values


def systemd_size_bytes(text: str) -> int:
    """'12G' -> bytes, with systemd's 1024-based K/M/G/T suffixes."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", text)
    assert match, f"not a systemd size: {text!r}"
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


def verifiable_copy(tmp_path: Path, unit_text: str) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    installed = shutil.which("flashllm")
    command = installed if installed else f"{sys.executable} -m flashllm"
    assert INSTALLED_BINARY in unit_text
    copy = tmp_path / UNIT_PATH.name
    copy.write_text(unit_text.replace(INSTALLED_BINARY, command))
    return copy


def complaints_about(unit_file: Path) -> list[str]:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        capture_output=True, text=True, timeout=60,
    )
    lines = (result.stdout + result.stderr).splitlines()
    # Lines about other units on this machine are not ours to fix.
    ours = [line for line in lines if unit_file.name in line or str(unit_file) in line]
    if result.returncode != 0 and not ours:
        ours = lines or [f"systemd-analyze verify exited {result.returncode}"]
    return ours


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    unit_file = verifiable_copy(tmp_path, UNIT_PATH.read_text())
    assert complaints_about(unit_file) == []


@needs_systemd_analyze
def test_verify_check_would_catch_a_broken_unit(tmp_path):
    broken = UNIT_PATH.read_text().replace("WatchdogSec=30", "WatchdogSec=30\nWatchdogSecs=30\nMemoryMax=lots")
    complaints = complaints_about(verifiable_copy(tmp_path, broken))
    assert any("WatchdogSecs" in line for line in complaints)
    assert any("lots" in line for line in complaints)


@needs_systemd_analyze
def test_hardening_exposure_stays_low(tmp_path):
    unit_file = verifiable_copy(tmp_path, UNIT_PATH.read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_file)],
        capture_output=True, text=True, timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze cannot rate unit files offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.5, result.stdout


def test_unit_waits_for_ready_from_the_main_process_and_is_watched():
    unit = read_unit_settings(UNIT_PATH.read_text())
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.WatchdogSec"] == ["30"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.KillMode"] == ["mixed"]
    assert int(unit["Service.TimeoutStopSec"][0]) > DRAIN_TIMEOUT_S
    # Errors the user must fix are not retried in a loop.
    assert unit["Service.RestartPreventExitStatus"] == [str(EXIT_USER_ERROR)]


def test_unit_serves_the_configured_store_on_the_runtime_socket():
    unit = read_unit_settings(UNIT_PATH.read_text())
    exec_start = unit["Service.ExecStart"][0].split()
    assert exec_start[:2] == [INSTALLED_BINARY, "serve"]
    options = dict(zip(exec_start[2::2], exec_start[3::2]))
    assert options == {
        "--store": "${FLASHLLM_STORE}",
        "--socket": "/run/flashllm/flashllm.sock",
        "--memory": "${FLASHLLM_MEMORY}",
        "--max-batch": "${FLASHLLM_MAX_BATCH}",
        "--mode": "${FLASHLLM_MODE}",
        "--runtime": "${FLASHLLM_RUNTIME}",
        "--socket-group": "flashllm",
        "--http": "${FLASHLLM_HTTP}",
    }
    assert len(options["--socket"].encode()) <= MAX_SOCKET_PATH_BYTES
    # The socket lives in the directory systemd creates for us, owned by our user.
    assert unit["Service.RuntimeDirectory"] == ["flashllm"]
    assert unit["Service.RuntimeDirectoryMode"] == ["0750"]
    assert unit["Service.User"] == unit["Service.Group"] == ["flashllm"]
    assert unit["Service.EnvironmentFile"] == ["-/etc/flashllm/flashllm.env"]


def test_env_file_sets_every_variable_the_command_uses_and_fits_memory_max():
    unit_text = UNIT_PATH.read_text()
    unit = read_unit_settings(unit_text)
    env = read_env_file(ENV_PATH)
    used = set(re.findall(r"\$\{(\w+)\}", unit["Service.ExecStart"][0]))
    assert used == set(env), f"ExecStart uses {sorted(used)}, the env file sets {sorted(env)}"
    # Defaults in the unit (Environment=) match the shipped env file.
    defaults = dict(item.split("=", 1) for item in unit["Service.Environment"])
    assert {key: defaults[key] for key in used} == env
    # MemoryMax caps the whole unit, so it must exceed the planner's budget.
    memory_max_bytes = systemd_size_bytes(unit["Service.MemoryMax"][0])
    assert memory_max_bytes > systemd_size_bytes(env["FLASHLLM_MEMORY"])


def test_hardening_keeps_cuda_devices_and_jit_compilers_working():
    unit = read_unit_settings(UNIT_PATH.read_text())
    # PrivateDevices=yes would hide /dev/nvidia*.
    assert unit["Service.PrivateDevices"] == ["no"]
    assert unit["Service.DevicePolicy"] == ["closed"]
    assert any(entry.startswith("char-nvidia") and entry.endswith(" rw") for entry in unit["Service.DeviceAllow"])
    # Write+execute mappings are how Triton/TorchInductor/PTX JIT load code.
    assert "Service.MemoryDenyWriteExecute" not in unit
    # The CUDA driver reads /proc/driver/nvidia, which ProcSubset=pid hides.
    assert "Service.ProcSubset" not in unit
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.LimitMEMLOCK"] == ["infinity"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_entry_creates_a_system_user_that_cannot_log_in(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS_PATH)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    name, _, uid, gid, _, home, shell = passwd["flashllm"]
    assert "flashllm" in groups
    assert int(uid) < 1000, "a system user, below the range of login users"
    assert shell.endswith("nologin")


def test_the_http_api_is_on_by_default_on_a_unix_socket_beside_the_zeromq_one():
    unit = read_unit_settings(UNIT_PATH.read_text())
    defaults = dict(item.split("=", 1) for item in unit["Service.Environment"])
    for http in (defaults["FLASHLLM_HTTP"], read_env_file(ENV_PATH)["FLASHLLM_HTTP"]):
        assert http == "unix:/run/flashllm/http.sock"  # in RuntimeDirectory=, 0750, group flashllm
        assert len(http.removeprefix("unix:").encode()) <= MAX_SOCKET_PATH_BYTES
    # no IP networking unless the administrator adds it (deploy/README.md)
    assert unit["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    readme = (DEPLOY / "README.md").read_text()
    assert "curl --unix-socket /run/flashllm/http.sock" in readme and "HTTPTransport(uds=" in readme


def test_env_file_selects_a_mode_and_runtime_serve_accepts():
    """FLASHLLM_MODE / FLASHLLM_RUNTIME reach `flashllm serve`, whose parser takes every documented value
    (sparse included) and a --memory that is a share of the store."""
    from flashllm.runtime.clients.cli import build_parser

    env = read_env_file(ENV_PATH)
    assert env["FLASHLLM_MODE"] == "auto" and env["FLASHLLM_RUNTIME"] == "auto"
    for mode in ("auto", "dense", "sparse", "naive"):
        args = build_parser(["serve"]).parse_args(["serve", "--store", "S", "--socket", "/run/x.sock", "--memory",
                                                   "60%", "--mode", mode, "--runtime", env["FLASHLLM_RUNTIME"]])
        assert (args.mode, args.memory) == (mode, "60%")
