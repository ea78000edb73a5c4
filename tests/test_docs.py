"""The docs cannot rot silently: README.md and docs/*.md are checked against the code.

Marker: a fenced code block whose info string is `bash runnable` or `python runnable` (GitHub highlights
it by the first word). Blocks without the marker (synopses, outputs, YAML) are not run through the
CLIs, but every page is checked for links, `make` targets, test names and repository paths.

- Shell lines of runnable blocks: `python -m tracer ...` and `python -m handler.X ...` are parsed by
  the CLI's own argparse (its `main(argv)` up to `parse_args`, which stops it: nothing runs);
  `python -m bench.X ...`: the module exists and every flag shown is a string in its source (the
  benchmarks run on import of their `__main__` block and several read `sys.argv` themselves);
  `python -c CODE` compiles like a Python block; `make TARGET VAR=value` names a Makefile target and
  variable; `curl` goes to 127.0.0.1 on a port of config.properties, names a model it loads, sends JSON
  that parses, and its route is run against a live server by a test named in CURL_COVERAGE.
- Python runnable blocks compile, and what they import or reach as attributes of tracer / handler /
  bench resolves in the source tree (read statically: no torch import).
- Every relative link and image resolves; `#anchors` match the target page's headings (GitHub's slugs).
- Every `make ...` in inline code or in any code block names existing targets and variables.
- Every `tests/....py::test_name` named exists, and every inline-code path under tracer/, handler/,
  bench/ or tests/ exists.
- README.md stays the front door (≤ 250 lines); every page of docs/ is in docs/README.md's index and
  opens with its title and one sentence.
- Nothing new goes undocumented: every subcommand and flag of `python -m tracer` is in
  docs/offline-tracer.md, and every file of tracer/ and handler/ is in docs/architecture.md's module map.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "CHANGELOG.md"]  # pages whose links are checked (the changelog names old paths)
MARKER = "runnable"

# The curl examples run against a live TorchServe in these tests (the route: what the docs' URL asks;
# the tests build their own URLs with their own ports). A new route in a runnable block needs a line here.
CURL_COVERAGE = {
    (8080, "/predictions/minilm"): [
        "tests/test_serving.py::test_rest_single_text",
        "tests/test_serving.py::test_rest_list_in_order",
        "tests/test_serving.py::test_accepted_content_types",
    ],
    (8080, "/predictions/smollm2"): [
        "tests/test_generation_serving.py::test_chat_answer_is_right_and_equals_in_process",
        "tests/test_generation_serving.py::test_stream_sends_one_line_per_token_then_finish_and_usage",
        "tests/test_generation_serving.py::test_sampling_is_reproducible_by_seed",
    ],
    (8080, "/predictions/minilm/1.0/v1/embeddings"): [
        "tests/test_serving.py::test_openai_embeddings_with_curl",
        "tests/test_serving.py::test_openai_embeddings_base64_default_and_float_equal_encode",
    ],
    (8080, "/predictions/minilm/1.0/v1/models"): [
        "tests/test_serving.py::test_openai_models_and_errors_in_openai_shape",
    ],
    (8080, "/predictions/smollm2/1.0/v1/chat/completions"): [
        "tests/test_generation_serving.py::test_openai_chat_completion_equals_the_native_route",
        "tests/test_generation_serving.py::test_openai_streamed_chat_is_server_sent_events_ending_in_done",
    ],
    (8080, "/predictions/smollm2/1.0/v1/completions"): [
        "tests/test_generation_serving.py::test_openai_completion_equals_the_native_route",
    ],
    (8080, "/v2/models/minilm/infer"): [
        "tests/test_serving.py::test_open_inference_rest_bytes_in_fp32_out",
    ],
    (8082, "/metrics"): [
        "tests/test_serving.py::test_metrics_in_prometheus_format_count_texts_and_keep_every_observation",
    ],
}
# The client examples (python -m handler.rest_client / grpc_client, the Python clients) against a live server.
CLIENT_COVERAGE = {
    "handler.grpc_client": [
        "tests/test_serving.py::test_grpc_single_list_and_concurrent",
        "tests/test_serving.py::test_open_inference_grpc_model_infer_ready_and_a_bad_request_fails_only_itself",
        "tests/test_generation_serving.py::test_grpc_stream_predictions",
    ],
    "handler.rest_client": [
        "tests/test_serving.py::test_clients_need_neither_torchserve_nor_torch",
        "tests/test_generation_serving.py::test_rest_client_generates_and_streams",
    ],
}


# ---- reading the pages ---------------------------------------------------------------------------
@dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    info: str
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return MARKER in self.info.split()[1:]

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def parse(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """(code blocks, prose lines as (line number, text)) of a Markdown page."""
    blocks, prose, open_block = [], [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if open_block is None:
            match = FENCE.match(line)
            if match:
                open_block = (number, match["fence"], match["info"].strip(), len(match["indent"]), [])
            else:
                prose.append((number, line))
        else:
            start, fence, info, indent, lines = open_block
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                blocks.append(Block(page, start, info, "\n".join(lines)))
                open_block = None
            else:
                lines.append(line[indent:] if line[:indent].strip() == "" else line)
    assert open_block is None, f"{page.relative_to(ROOT)}:{open_block[0]}: unclosed code block"
    return blocks, prose


PARSED = {page: parse(page) for page in LINKED}
BLOCKS = [block for page in PAGES for block in PARSED[page][0]]
RUNNABLE = [b for b in BLOCKS if b.runnable]
SHELL = [b for b in RUNNABLE if b.language in ("bash", "sh", "shell", "console")]
PYTHON = [b for b in RUNNABLE if b.language == "python"]
INLINE_CODE = re.compile(r"(`+)(.+?)\1")


def inline_code(page: Path) -> list[tuple[int, str]]:
    return [(n, m[2].strip()) for n, line in PARSED[page][1] for m in INLINE_CODE.finditer(line)]


def prose_without_code(page: Path) -> list[tuple[int, str]]:
    return [(n, INLINE_CODE.sub("", line)) for n, line in PARSED[page][1]]


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- shell command lines -------------------------------------------------------------------------
def commands(text: str) -> list[list[str]]:
    """Each simple command of a shell block as its words (continuations joined, comments dropped)."""
    result = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                result.append(words)
                words = []
            else:
                words.append(token)
        result.append(words)
    return [words for words in result if words]


def without_environment(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


class _Parsed(Exception):
    pass


def parse_only(module_name: str, argv: list[str]) -> str | None:
    """Run `module.main(argv)` up to argparse's parse_args, which parses and then stops it, so the
    line is checked exactly as the CLI checks it and nothing runs. None, or argparse's complaint."""
    module = importlib.import_module(f"{module_name}.__main__" if module_name == "tracer" else module_name)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with (mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop),
          contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO())):
        try:
            module.main(argv)
        except _Parsed:
            return None
        except SystemExit as exc:
            return None if exc.code == 0 else f"exit {exc.code}: {err.getvalue().strip()}"
    return "main() returned without parsing its arguments"


def source_strings(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def check_python_command(args: list[str]) -> list[str]:
    if "-c" in args:
        return check_python_source(args[args.index("-c") + 1], "python -c")
    if "-m" not in args:
        return [f"python without -m or -c: {args}"]
    module, argv = args[args.index("-m") + 1], args[args.index("-m") + 2:]
    if module == "tracer" or module.startswith("handler."):
        problem = parse_only(module, argv)
        return [f"python -m {module} {shlex.join(argv)}: {problem}"] if problem else []
    if module.startswith("bench."):
        path = ROOT / "bench" / f"{module.split('.', 1)[1]}.py"
        if not path.is_file():
            return [f"python -m {module}: no {path.relative_to(ROOT)}"]
        strings = source_strings(path)
        return [f"python -m {module}: {arg} is not a flag in {path.relative_to(ROOT)}"
                for arg in argv if arg.startswith("--") and arg.split("=")[0] not in strings]
    return [f"python -m {module}: not a module of this project"]


def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile."""
    targets, variables = set(), set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        if not line.strip() or line.startswith(("\t", "#")):
            continue
        if match := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", line):
            variables.add(match[1])
        elif match := re.match(r"^([^:=#]+):(?!=)(.*)$", line):
            targets.update(match[1].split())
            if match[1].strip() == ".PHONY":
                targets.update(match[2].split())
    return targets, variables


def check_make(args: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = [f"make {a}: no such target" for a in args if "=" not in a and not a.startswith("-")
                and a not in targets]
    problems += [f"make ... {a}: {a.split('=')[0]} is not a Makefile variable" for a in args
                 if "=" in a and a.split("=")[0] not in variables]
    return problems


def served_config() -> tuple[set[int], set[str]]:
    """(ports, model names) of config.properties."""
    props = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    ports = {urllib.parse.urlsplit(props[k]).port for k in ("inference_address", "management_address",
                                                            "metrics_address")}
    models = {name.removesuffix(".mar") for name in props["load_models"].split(",")}
    return ports, models


def check_curl(args: list[str]) -> list[str]:
    ports, models = served_config()
    problems = []
    urls = [a for a in args if a.startswith(("http://", "https://"))]
    if not urls:
        return [f"curl without a URL: {args}"]
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname != "127.0.0.1" or parts.port not in ports:
            problems.append(f"{url}: not a listener of config.properties ({sorted(ports)})")
        named = re.match(r"^/(?:predictions|v2/models)/([^/]+)", parts.path)
        if named and named[1] not in models:
            problems.append(f"{url}: {named[1]} is not in config.properties' load_models {sorted(models)}")
        if (parts.port, parts.path) not in CURL_COVERAGE:
            problems.append(f"{url}: no live test named for this route in tests/test_docs.py CURL_COVERAGE")
    headers = [args[i + 1].lower() for i, a in enumerate(args[:-1]) if a in ("-H", "--header")]
    if any("application/json" in h for h in headers):
        for i, a in enumerate(args[:-1]):
            if a in ("-d", "--data", "--data-raw", "--data-binary"):
                try:
                    json.loads(args[i + 1])
                except ValueError as exc:
                    problems.append(f"curl body is not JSON ({exc}): {args[i + 1]}")
    return problems


def check_shell(text: str) -> list[str]:
    problems = []
    for words in map(without_environment, commands(text)):
        if not words:
            continue
        program = os.path.basename(words[0])
        if re.fullmatch(r"python(3(\.\d+)?)?", program):
            problems += check_python_command(words[1:])
        elif program == "make":
            problems += check_make(words[1:])
        elif program == "curl":
            problems += check_curl(words[1:])
    return problems


# ---- Python: compile, and what it takes from this project resolves --------------------------------
PROJECT = ("tracer", "handler", "bench")


def module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def provides(dotted: str, name: str) -> str | None:
    """'module' if `dotted.name` is a submodule, 'name' if the module defines `name`, else None."""
    file = module_file(dotted)
    if file is None:
        return None
    if file.name == "__init__.py" and module_file(f"{dotted}.{name}"):
        return "module"
    source = file.read_text()
    top: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.Assign):
            top |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            top |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if name in top:
        return "name"
    if "sys.modules[__name__]" in source:  # the module replaces itself (the backend's layers.py)
        return "name"
    if "__getattr__" in top and name in source_strings(file):  # names loaded on first use (tracer/__init__.py)
        return "name"
    return None


def check_python_source(source: str, where: str) -> list[str]:
    try:
        tree = ast.parse(compile(source, where, "exec", flags=ast.PyCF_ONLY_AST))
    except SyntaxError as exc:
        return [f"{where}: does not compile: {exc}"]
    problems, modules = [], {}  # local name -> dotted module of this project
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    if module_file(alias.name) is None:
                        problems.append(f"{where}: import {alias.name}: no such module")
                    if alias.asname:  # import tracer.trace as t: t is tracer.trace
                        modules[alias.asname] = alias.name
                    else:  # import tracer.trace: binds tracer
                        modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT:
            for alias in node.names:
                kind = provides(node.module, alias.name)
                if kind is None:
                    problems.append(f"{where}: from {node.module} import {alias.name}: not found")
                elif kind == "module":
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in modules:
            continue
        current = modules[root.id]
        for part in chain:
            kind = provides(current, part)
            if kind is None:
                problems.append(f"{where}: {root.id}.{'.'.join(chain)}: {current} has no {part}")
                break
            if kind == "name":
                break
            current = f"{current}.{part}"
    return sorted(set(problems))


# ---- links and anchors ---------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but - and _ dropped, spaces -."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    prose = PARSED[page][1] if page in PARSED else parse(page)[1]
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def check_links(page: Path) -> list[str]:
    problems = []
    for number, line in prose_without_code(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / urllib.parse.unquote(path)).resolve() if path else page
            where = f"{rel(page)}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor.lower() not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


# ---- the tests -----------------------------------------------------------------------------------
def test_the_marker_is_used():
    assert len(SHELL) >= 10 and len(PYTHON) >= 5, (len(SHELL), len(PYTHON))
    assert not [str(b) for b in BLOCKS if MARKER in b.info and not b.runnable], "the marker goes after the language"


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_runnable_shell_lines_are_accepted_by_their_cli(block):
    assert check_shell(block.text) == []


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_runnable_python_compiles_and_its_imports_resolve(block):
    assert check_python_source(block.text, str(block)) == []


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_links_and_images_resolve(page):
    assert check_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_make_target_named_exists(page):
    named = [(n, code[5:]) for n, code in inline_code(page) if code.startswith("make ")]
    for block in PARSED[page][0]:
        for offset, line in enumerate(block.text.splitlines(), 1):
            if re.match(r"^\s*make\s", line):
                named.append((block.line + offset, line.split("#")[0].strip()[5:]))
    problems = [f"{rel(page)}:{n}: {p}" for n, args in named for p in check_make(shlex.split(args))]
    assert problems == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_tests_and_paths_exist(page):
    text = page.read_text()
    problems = []
    for file, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", text):
        if not (ROOT / file).is_file() or not re.search(rf"^\s*def {name}\(", (ROOT / file).read_text(), re.M):
            problems.append(f"{file}::{name}")
    for number, code in inline_code(page):
        if re.fullmatch(r"(tracer|handler|bench|tests)/[\w./-]*", code) and not (ROOT / code).exists():
            problems.append(f"{rel(page)}:{number}: {code} does not exist")
    assert problems == []


def test_the_live_examples_name_tests_that_exist():
    for node in [n for nodes in (*CURL_COVERAGE.values(), *CLIENT_COVERAGE.values()) for n in nodes]:
        file, name = node.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), node
    used = {words[words.index("-m") + 1] for block in SHELL for words in map(without_environment, commands(block.text))
            if words and "-m" in words and words[words.index("-m") + 1].endswith("_client")}
    assert used <= set(CLIENT_COVERAGE), used - set(CLIENT_COVERAGE)


def test_the_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    index = (ROOT / "docs" / "README.md").read_text()
    pages = [p for p in PAGES if p.parent.name == "docs" and p.name != "README.md"]
    missing = [p.name for p in pages if f"]({p.name})" not in index]
    assert missing == [], "pages missing from docs/README.md"


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=rel)
def test_each_page_opens_with_its_title_and_one_sentence(page):
    lines = [line for line in page.read_text().splitlines()[:4]]
    assert lines[0].startswith("# ") and lines[1] == "", lines
    assert lines[2] and lines[2][0].isupper() and not lines[2].startswith(("#", "|", "```", "-")), lines


def test_every_tracer_command_and_flag_is_documented():
    from tracer.__main__ import _parser

    page = (ROOT / "docs" / "offline-tracer.md").read_text()
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"python -m tracer {name}" for name in commands if f"`python -m tracer {name}`" not in page]
    missing += [f"{name} {flag}" for name, sub in commands.items() for action in sub._actions
                for flag in action.option_strings if flag.startswith("--") and flag != "--help"
                and f"`{flag}" not in page]
    assert missing == [], "not in docs/offline-tracer.md"


def test_every_file_of_the_packages_is_in_the_module_map():
    page = (ROOT / "docs" / "architecture.md").read_text()
    files = [path.relative_to(ROOT).as_posix() for package in ("tracer", "handler")
             for path in sorted((ROOT / package).rglob("*")) if path.is_file()
             and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so")]
    assert [f for f in files if f"`{f}`" not in page] == [], "not in docs/architecture.md's module map"


def test_the_checks_catch_rot():
    """The checkers themselves: a wrong flag, target, link, import, route or JSON body is found."""
    assert check_shell(".venv/bin/python -m tracer build --tp-degree 2 --model-name m --no-such-flag")
    assert check_shell(".venv/bin/python -m tracer build --model-name m")  # --tp-degree is required
    assert check_shell(".venv/bin/python -m tracer build --tp-degree 2 --model-name m") == []
    assert check_shell("python -m handler.server restart")
    assert check_shell("python -m bench.generation --no-such-flag")
    assert check_shell("make no-such-target") and check_shell("make serve NO_SUCH_VARIABLE=1")
    assert check_shell("curl -s http://127.0.0.1:8080/predictions/nosuchmodel")
    assert check_shell("curl -s http://127.0.0.1:8080/predictions/minilm -H 'Content-Type: application/json' "
                       "--data '{\"inputs\": [}'")
    assert check_python_source("import tracer\ntracer.trace.no_such_call()", "t")
    assert check_python_source("from tracer.builder.archive import NoSuchName", "t")
    assert check_python_source("import tracer\ntracer.parallel_layers.layers.ColumnParallelLinear(1, 2)", "t") == []
    assert slug("Ranks as processes: TorchServe's `torchrun` mode") == "ranks-as-processes-torchserves-torchrun-mode"
