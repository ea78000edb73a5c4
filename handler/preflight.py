"""What `make serve` checks before it installs, traces or starts anything: Java 17+ and free ports.

Standard library only: `python3 handler/preflight.py config.properties` runs before the venv exists.
Each problem is one `error:` line (exit 1).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

JAVA_MIN = 17
# config.properties keys of the listeners TorchServe opens, and their defaults
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_PORT_KEYS = {"grpc_inference_port": 7070, "grpc_management_port": 7071}


class PreflightError(Exception):
    pass


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def java_executable() -> str:
    if os.environ.get("JAVA_HOME"):
        return str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    return shutil.which("java") or "java"


def check_java() -> str:
    """The java that will run TorchServe, if it is 17 or newer."""
    java = java_executable()
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        raise PreflightError(f"no Java found ({java}): TorchServe needs Java {JAVA_MIN}+ "
                             "(e.g. apt-get install openjdk-17-jre-headless, or set JAVA_HOME)") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match.group(2):  # "1.8.0" is Java 8
        major = int(match.group(2))
    if major < JAVA_MIN:
        raise PreflightError(f"{java} is Java {major or 'of an unknown version'}; TorchServe needs Java {JAVA_MIN}+")
    return java


def listeners(props: dict[str, str]) -> list[tuple[str, str, int]]:
    """(config key, host, port) of every listener the config asks TorchServe to open."""
    found = []
    for key in ADDRESS_KEYS:
        if key in props:
            url = urlparse(props[key])
            found.append((key, url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)))
    for key, default in GRPC_PORT_KEYS.items():
        host_key = key.replace("_port", "_address")
        found.append((key, props.get(host_key, "127.0.0.1"), int(props.get(key, default))))
    return found


def check_ports(props: dict[str, str]) -> None:
    for key, host, port in listeners(props):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TorchServe binds: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as exc:
                raise PreflightError(f"port {port} on {host} ({key} in the config) is in use or not available: "
                                     f"{exc.strerror}; stop what holds it (`make stop` if it is tpserve) "
                                     f"or change {key}") from None


def main(argv: list[str]) -> int:
    config = Path(argv[0] if argv else "config.properties")
    try:
        check_java()
        check_ports(read_properties(config))
    except (PreflightError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
