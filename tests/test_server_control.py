"""`make serve`'s checks before any work, the .mar rebuilt when its inputs change, quiet logs."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from serving import ROOT, start_server, write_config

from handler import preflight, server


def _preflight(config: Path, **env) -> subprocess.CompletedProcess:
    """handler/preflight.py as `make serve` runs it: the system python, before any venv exists."""
    return subprocess.run(["python3", str(ROOT / "handler" / "preflight.py"), str(config)], capture_output=True,
                          text=True, env={**os.environ, **env})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_java_is_one_line_before_anything_else():
    line = _one_error_line(_preflight(ROOT / "config.properties", JAVA_HOME="/nonexistent"))
    assert "no Java found" in line and "Java 17+" in line


def test_old_java_is_one_line(tmp_path):
    # a stand-in `java` that reports version 11 (the machine has 17; this checks the version parsing)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.21" 2023-10-17\' >&2\n')
    (tmp_path / "bin" / "java").chmod(0o755)
    line = _one_error_line(_preflight(ROOT / "config.properties", JAVA_HOME=str(tmp_path)))
    assert "is Java 11; TorchServe needs Java 17+" in line


def test_a_busy_port_is_named_in_one_line(tmp_path):
    write_config(tmp_path / "config.properties", tmp_path, "minilm")
    props = preflight.read_properties(tmp_path / "config.properties")
    port = int(props["management_address"].rsplit(":", 1)[1])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        line = _one_error_line(_preflight(tmp_path / "config.properties"))
        assert f"port {port} on 127.0.0.1 (management_address in the config) is in use" in line
        with pytest.raises(preflight.PreflightError, match=f"port {port}"):  # and `start` checks it too
            server.start(tmp_path / "config.properties", tmp_path, tmp_path / "logs")
    assert not (tmp_path / "logs" / "torchserve.pid").exists()  # nothing was started


def _make_mar_plan(mar: Path, *extra: str) -> str:
    # -o: the venv counts as installed and old, whatever this checkout's pyproject.toml date
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", f"MAR={mar}", *extra, str(mar)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_mar_is_rebuilt_when_its_inputs_change(tmp_path):
    mar, stamp = tmp_path / "minilm.mar", tmp_path / ".minilm-fp32"  # the stamp: the weights it was built with
    mar.write_bytes(b"")
    stamp.write_bytes(b"")
    future = time.time() + 3600
    os.utime(mar, (future, future))
    assert "tracer build" not in _make_mar_plan(mar, f"MINILM_STAMP={stamp}")  # newer than every input: reused
    for changed in ("handler/encoder_handler.py", "tracer/models/bert.py", "Makefile"):
        assert "tracer build" in _make_mar_plan(mar, f"MINILM_STAMP={stamp}", "-W", changed), changed
    other = _make_mar_plan(mar, "MINILM_WEIGHTS=bf16", f"MINILM_STAMP={tmp_path / '.minilm-bf16'}")
    assert "tracer build --tp-degree 2 --batch-size 8 --weights bf16" in other  # other weights: rebuilt


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def test_logs_one_access_line_per_request_fresh_files_per_start(tmp_path, store):
    logs = tmp_path / "logs"
    first = start_server(tmp_path, store)
    try:
        assert not (logs / "logs").exists() and (logs / "ts_log.log").is_file()  # one log folder
        time.sleep(1)
        before = {name: len(_lines(logs / name)) for name in ("access_log.log", "ts_log.log", "model_log.log")}
        for i in range(10):
            assert first.post(f"request number {i}")[0] == 200
        assert first.post('{"inputs": ', "application/json")[0] == 400  # bad JSON: no traceback
        time.sleep(1)
        after = {name: len(_lines(logs / name)) for name in before}
        assert after["access_log.log"] - before["access_log.log"] == 11
        assert after["ts_log.log"] == before["ts_log.log"], _lines(logs / "ts_log.log")[before["ts_log.log"]:]
        assert after["model_log.log"] == before["model_log.log"], _lines(logs / "model_log.log")[-5:]
    finally:
        first.stop()
    first_out = (logs / "torchserve.out").read_text()
    write_config(tmp_path / "config.properties", store, "minilm")  # new ports for the second start
    second = server.start(tmp_path / "config.properties", store, logs, timeout_s=300)
    try:
        assert (logs / "torchserve.out.1").read_text() == first_out  # the previous start's, kept once
        assert (logs / "access_log.log.1").is_file()
        assert len(_lines(logs / "access_log.log")) < before["access_log.log"] + 11  # a fresh file
    finally:
        server.stop(second.pid)


def test_server_start_says_what_it_serves(store):
    line = server.describe_model(store, "minilm.mar")
    assert "serving minilm: embeddings" in line and "tp=2, fp32 weights" in line
    assert "texts packed end to end, up to 8 texts / 1024 tokens per call" in line
    assert "token buckets [16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024]" in line
    assert "truncated at 256 tokens" in line and "built 20" in line


def test_ports_listed_by_preflight_are_the_ones_torchserve_opens(tmp_path):
    ports = write_config(tmp_path / "config.properties", tmp_path, "minilm")
    found = {port for _, _, port in preflight.listeners(preflight.read_properties(tmp_path / "config.properties"))}
    assert set(ports.values()) <= found

