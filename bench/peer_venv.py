"""A benchmark-only peer's own virtualenv: <repo>/.bench-venvs/NAME (git-ignored), made on first use.

Peers (infinity-emb, llama.cpp) pin dependencies that clash with the project's (numpy < 2, older
transformers) or compile for minutes, so they never go into the project's .venv. Plain pip: its
configuration here adds the on-disk wheel directory (where the CPU torch wheel lies).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ensure_venv(name: str, packages: list[str], check: str, env: dict[str, str] | None = None) -> Path | None:
    """The python of .bench-venvs/NAME with `packages` installed (installing them once, `env` added to
    pip's environment: build options) and the Python statement `check` passing, or None (with a
    message) where that cannot be done."""
    root = REPO / ".bench-venvs" / name
    python, marker, log = root / "bin" / "python", root / f".{name}-installed", root / "install.log"
    wanted = " ".join(packages) + "".join(f" {key}={value}" for key, value in sorted((env or {}).items()))
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ".gitignore").write_text("*\n")  # as Python 3.13's venv does: git never sees the venv
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(root)], check=True, capture_output=True, timeout=300)
        with open(log, "w") as out:
            subprocess.run([str(python), "-m", "pip", "install", *packages], check=True, stdout=out,
                           stderr=subprocess.STDOUT, timeout=3600, env={**os.environ, **(env or {})})
        subprocess.run([str(python), "-c", check], check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        print(f"{name} peer unavailable ({error}); see {log}", file=sys.stderr)
        return None
    marker.write_text(wanted)
    return python
