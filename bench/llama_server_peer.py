"""llama.cpp's own C++ server (`llama-server`) as a benchmark-only peer for bench/served_generation.py.

Built once into .bench-venvs/llama-server/ from the llama.cpp source that the llama-cpp-python==0.3.36
sdist vendors (vendor/llama.cpp, with tools/server), with AVX-512 flags and AMX off: the native build
dies at start here (SIGILL), and llama-cpp-python's native AMX build crashes on batched prompts
(docs/performance-notes.md). ~10 minutes on 2 cores the first time. Started on 127.0.0.1 only.

    .venv/bin/python -m bench.llama_server_peer      # build (or say why it cannot), print the binary
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / ".bench-venvs" / "llama-server"
VERSION = "0.3.36"
FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
         "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
         "-DGGML_AVX_VNNI=ON", "-DGGML_BMI2=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]


def binary() -> Path | None:
    """The built llama-server, building it first if needed; None (with a message) where it cannot be."""
    found = ROOT / "build" / "bin" / "llama-server"
    if found.is_file():
        return found
    if not shutil.which("cmake"):
        print("llama-server: skipped, no cmake")
        return None
    ROOT.mkdir(parents=True, exist_ok=True)
    try:
        sdist = next(ROOT.glob("llama_cpp_python-*.tar.gz"), None)
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-binary",
                            ":all:", "--no-deps", "-d", str(ROOT)], check=True, capture_output=True)
            sdist = next(ROOT.glob("llama_cpp_python-*.tar.gz"))
        source = ROOT / "src"
        if not (source / "CMakeLists.txt").is_file():
            with tarfile.open(sdist) as archive:
                top = archive.getnames()[0].split("/")[0]
                archive.extractall(ROOT, filter="data")
            shutil.rmtree(source, ignore_errors=True)
            (ROOT / top / "vendor" / "llama.cpp").rename(source)
        build = ROOT / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *FLAGS], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j2"], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, OSError, StopIteration) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        print(f"llama-server: skipped, it could not be built: {exc} {detail[-500:].decode(errors='replace')}")
        return None
    return found if found.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on 127.0.0.1 with the GGUF: `slots` parallel sequences (each of `context` tokens),
    its prompt cache on (its default), 2 threads as every system here."""

    def __init__(self, gguf: Path, slots: int = 4, context: int = 1024) -> None:
        path = binary()
        if path is None:
            raise RuntimeError("llama-server is not available")
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(path), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(slots),
             "-c", str(context * slots), "-t", "2", "-tb", "2", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    print(binary())
