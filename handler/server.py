"""Start and stop TorchServe for tpserve, owning the process (no global pid file in /tmp).

    python -m handler.server start [--config config.properties] [--model-store model_store] [--log-dir logs]
    python -m handler.server stop  [--log-dir logs]

`start` runs TorchServe's Java frontend directly (as the `torchserve` script would), in its own
session, writes its PID to LOG_DIR/torchserve.pid, and waits until every model is READY.
`stop` sends SIGTERM, waits for the frontend and every worker it started to exit, and SIGKILLs
only those same PIDs if they outlive the timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from handler.preflight import PreflightError, check_java, check_ports, java_executable, read_properties

LOG4J_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"


def java_command(config: Path, model_store: Path, java: str | None = None) -> list[str]:
    import ts

    ts_home = Path(ts.__file__).resolve().parent.parent
    return [java or java_executable(), f"-Dmodel_server_home={ts_home}", f"-Dlog4j.configurationFile={LOG4J_CONFIG}",
            "-cp", f".:{ts_home / 'ts' / 'frontend' / '*'}", "org.pytorch.serve.ModelServer", "--python",
            sys.executable, "-f", str(config), "-s", str(model_store), "-ncs"]


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def models_ready(management: str) -> bool:
    status, body = _get(f"{management}/models")
    if status != 200:
        return False
    names = [m["modelName"] for m in json.loads(body).get("models", [])]
    for name in names:
        status, body = _get(f"{management}/models/{name}")
        workers = json.loads(body)[0].get("workers", []) if status == 200 else []
        if not workers or any(w.get("status") != "READY" for w in workers):
            return False
    return bool(names)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _worker_failure(log_dir: Path) -> str | None:
    """Why the model's worker cannot start: at once when its handler refused the artifacts (damaged or
    foreign: no retry can fix that, and TorchServe's retries took ~15 s to say so), else once it has
    failed to start 3 times (TorchServe would retry forever); None while neither."""
    model_log, ts_log = _read(log_dir / "model_log.log"), _read(log_dir / "ts_log.log")
    refusals = [line.split(" - ", 1)[-1] for line in model_log.splitlines() if "tpserve: refusing to load" in line]
    if refusals:
        return refusals[0]
    if model_log.count("Backend worker process died") < 3 and ts_log.count("Retry worker") < 3:
        return None
    errors = [line.split(" - ", 1)[-1] for line in (model_log + ts_log).splitlines()
              if "Error" in line or "Exception" in line]
    return errors[-1] if errors else "worker died"


def start(config: Path, model_store: Path, log_dir: Path, timeout_s: float = 600,
          wait_for_models: bool = True) -> subprocess.Popen:
    """Start TorchServe and wait until every model is READY (or, with wait_for_models=False, only
    until its management API answers); raises (after stopping it) otherwise."""
    props = read_properties(config)
    java = check_java()
    check_ports(props)  # one line naming the busy port, not a Java bind exception deep in a log
    log_dir = log_dir.resolve()  # TorchServe runs in log_dir: a relative LOG_LOCATION would nest logs/logs/
    log_dir.mkdir(parents=True, exist_ok=True)
    out_file = log_dir / "torchserve.out"
    for old in [f for f in [out_file, *log_dir.glob("*.log")] if f.is_file()]:  # fresh logs per start, last kept as .1
        old.replace(old.with_name(old.name + ".1"))
    # the venv's bin first: TorchServe's torchrun mode execs `torchrun` by name
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, LOG_LOCATION=str(log_dir), METRICS_LOCATION=str(log_dir), PATH=path)
    with open(out_file, "wb") as out:
        process = subprocess.Popen(java_command(config.resolve(), model_store.resolve(), java), cwd=log_dir, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    (log_dir / "torchserve.pid").write_text(str(process.pid))
    try:
        _wait_until_up(process, props["management_address"], log_dir, timeout_s, wait_for_models)
    except BaseException:  # never leave a half-started TorchServe behind
        stop(process.pid)
        raise
    return process


def _wait_until_up(process: subprocess.Popen, management: str, log_dir: Path, timeout_s: float,
                   wait_for_models: bool) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {process.returncode}; see {log_dir}/torchserve.out")
        if models_ready(management) if wait_for_models else _get(f"{management}/models")[0] == 200:
            return
        if failure := _worker_failure(log_dir):
            raise RuntimeError(f"the model's worker cannot start: {failure}")
        time.sleep(0.5)
    raise TimeoutError(f"models not READY after {timeout_s:.0f}s; see {log_dir}/model_log.log")


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running. A zombie has exited (its new parent, init, reaps it) and counts as gone."""
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.time() + timeout_s
    while (alive := _running(processes)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def stop(pid: int, timeout_s: float = 60) -> list[int]:
    """SIGTERM TorchServe, wait for it and its workers; returns PIDs that had to be SIGKILLed."""
    try:
        frontend = psutil.Process(pid)
        ours = [frontend, *frontend.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    frontend.send_signal(signal.SIGTERM)
    alive = _wait_gone(ours, timeout_s)
    for process in alive:
        process.kill()
    _wait_gone(alive, 10)
    return [p.pid for p in alive]


def read_model_manifest(store: Path, entry: str) -> dict | None:
    """manifest.json of a load_models entry: NAME.mar (zip) or a NAME folder (no-archive)."""
    import zipfile

    try:
        if entry.endswith(".mar"):
            with zipfile.ZipFile(store / entry) as archive:
                return json.loads(archive.read("manifest.json"))
        return json.loads((store / entry / "manifest.json").read_text())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def describe_model(store: Path, entry: str) -> str:
    """One line on what a model serves: family, tp, buckets, batch size, when it was built."""
    manifest, path = read_model_manifest(store, entry), store / entry
    name = entry.removesuffix(".mar")
    try:
        info, shapes = manifest["model"], [b["inputs"][0]["shape"] for b in manifest["buckets"]]
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        source = "/".join(Path(info.get("source", "?")).parts[-2:])
        if info.get("kind") == "generation":
            return (f"serving {name}: generation, {source}, tp={manifest['tp_degree']}, "
                    f"{info['decoder'].get('weights', 'fp32')} weights, prompt buckets="
                    f"{info['prefill_buckets']}, max context {info['decoder']['max_context']}, "
                    f"batch {info['decoder']['max_batch']}; {path} built {built}")
        if info.get("layout") == "packed":
            return (f"serving {name}: embeddings, {source}, tp={manifest['tp_degree']}, "
                    f"{info.get('weights', 'fp32')} weights, texts packed end to end, "
                    f"up to {info['texts_per_call']} texts / {shapes[-1][0]} tokens per call (token buckets "
                    f"{[s[0] for s in shapes]}; texts truncated at {info.get('max_seq_length')} tokens); "
                    f"{path} built {built}")
        return (f"serving {name}: embeddings, {source}, tp={manifest['tp_degree']}, "
                f"{info.get('weights', 'fp32')} weights, buckets={[s[1] for s in shapes]}"
                f" (texts truncated at {info.get('max_seq_length')} tokens), batchSize {shapes[0][0]}; "
                f"{path} built {built}")
    except (TypeError, KeyError, IndexError, OSError):
        return f"serving {name} from {path}"


def example_commands(inference: str, store: Path, entry: str) -> list[str]:
    name = entry.removesuffix(".mar")
    url = f"{inference}/predictions/{name}"
    manifest = read_model_manifest(store, entry) or {}
    if (manifest.get("model") or {}).get("kind") == "generation":
        chat = '{"messages": [{"role": "user", "content": "What is the capital of France?"}]'
        return [f"curl -s -X POST {url} -H 'Content-Type: application/json' --data '{chat}}}'",
                f"curl -sN -X POST {url} -H 'Content-Type: application/json' --data '{chat}, \"stream\": true}}'",
                f"curl -sN {url}/1.0/v1/chat/completions -H 'Content-Type: application/json' "
                f"--data '{chat}, \"model\": \"{name}\", \"temperature\": 0, \"stream\": true}}'   # OpenAI-compatible"]
    return [f"curl -s -X POST {url} -H 'Content-Type: text/plain' --data 'tensor parallel inference on CPU'",
            f"""curl -s -X POST {url} -H 'Content-Type: application/json' """
            """--data '{"inputs": ["first text", "second text"]}'""",
            f"""curl -s {url}/1.0/v1/embeddings -H 'Content-Type: application/json' """
            f"""--data '{{"model": "{name}", "input": ["first text"]}}'   # OpenAI-compatible"""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--model-store", type=Path, default=None, help="default: model_store from --config")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    args = parser.parse_args(argv)
    pid_file = args.log_dir / "torchserve.pid"
    if args.command == "stop":
        if not pid_file.is_file():
            print("TorchServe is not running (no logs/torchserve.pid)")
            return 0
        killed = stop(int(pid_file.read_text()))
        pid_file.unlink()
        print("TorchServe stopped" + (f" (SIGKILLed {killed})" if killed else ""))
        return 0
    if pid_file.is_file() and psutil.pid_exists(int(pid_file.read_text())):
        print(f"error: TorchServe is already running (pid {pid_file.read_text()}); `make stop` first", file=sys.stderr)
        return 1
    props = read_properties(args.config)
    store = args.model_store or Path(props.get("model_store", "model_store"))
    try:
        process = start(args.config, store, args.log_dir)
    except (RuntimeError, TimeoutError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"TorchServe is up (pid {process.pid}); logs in {args.log_dir}/\n")
    for entry in [e.strip() for e in props.get("load_models", "").split(",") if e.strip()]:
        print(describe_model(store, entry))
        for command in example_commands(props["inference_address"], store, entry):
            print(f"  {command}")
        print()
    print("  .venv/bin/python -m handler.grpc_client 'some text'\n\nStop it with: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
