"""Every command, option and setting the code defines is documented, and the docs name no
option the code lacks.

What the code defines is read from the code itself, never from a list kept here:

- ``edgepin``: the argparse tree that ``provisioner.cli.build_parser`` builds (the operator
  commands and ``edgepin node ...``), built the way ``edgepin node ...`` builds it, without
  openstacksdk's loader: the ``--os-*`` options and the few others that loader registers
  (``--insecure``, ``--timeout``, ...) are openstacksdk's and left to its documentation.
- ``./build.sh``: its commands from the ``case`` in ``main()``, the ``image`` options from the
  ``case`` in ``cmd_image()``, and the options of the Python programs that ``controlplane``,
  ``demo`` and ``bench`` run (``-m MODULE`` in ``cmd_*``), from their ``add_argument`` calls
  (read with ``ast``: nothing is imported or run).
- the node's settings: ``provisioner.node.config.SETTINGS``.
- ``DIB_*`` variables: each element's ``environment.d`` files and any ``DIB_EDGEPIN_*`` its
  files read.
- ``EDGEPIN_*`` variables a user sets: ``${EDGEPIN_X:-...}`` in build.sh and
  ``environ.get("EDGEPIN_X"`` (or ``env.get``, ``getenv``, ``_env``) in ``provisioner/``,
  ``tests/`` (the unit tests aside) and ``benchmarks/``.

Where the docs say it:

- a command and its options: one row of a Markdown table whose first cell starts with the
  command in backticks (```edgepin signing-cert create```, ```./build.sh bench```); every
  option of that command is named in that row, and every option the row names is one of the
  command's. Operator commands are in docs/operator.md#commands-and-options, the node's in
  docs/node.md, build.sh's in docs/testbed.md#buildsh.
- a node setting: a row of docs/node.md#configuration with its default.
- a ``DIB_*`` variable: its element's README.rst, with the default its environment.d sets.
- an ``EDGEPIN_*`` variable: named in README.md or docs/*.md.
- any ``EDGEPIN_*`` or ``DIB_EDGEPIN_*`` name in any file of the code (Python, element
  hooks and ``environment.d``, units, build.sh, ``.ci/run``; however it is read): named in
  README.md or docs/*.md.

And the other way: every ``--option`` in a code span anywhere in the docs is an option of
edgepin or of a build.sh command, or one of a few other programs' options named below with
their program; every ``./build.sh`` command line shown uses options of that command; every
``EDGEPIN_*`` and ``DIB_EDGEPIN_*`` name in the docs (element READMEs included) is one the
code has.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.test_docs import (
    DOCS,
    REPO,
    all_commands,
    build_sh_usage,
    edgepin_parser,
    inline_spans,
)

pytestmark = pytest.mark.unit

BUILD_SH = REPO / "build.sh"
ELEMENTS = REPO / "elements"
OPENSTACKSDK_PREFIX = "--os-"
HELP = {"-h", "--help"}

# Options of other programs that the docs name in code spans, with the program.
FOREIGN_OPTIONS = {
    "--mount": "unshare",
    "--object": "qemu-img",
    "--offset": "mkfs.vfat and syslinux",
    "--hash-offset": "veritysetup",
    "--skip-sig": "GRUB's load_env",
    "--no-block": "systemctl (EDGEPIN_RESTART_COMMAND's default)",
    "--panic-on-corruption": "veritysetup",
    "--removable": "grub-install",
    "--system-site-packages": "python3 -m venv",
    "--unrestricted": "GRUB's menuentry",
    "--user": "openstack application credential delete",
    "--tags": "openstack project list",
    "--tag": "openstack project set",
    "--durations": "pytest",
}

# where each kind of row belongs (named in failure messages)
OPERATOR_TABLE = "docs/operator.md, section 'Commands and options'"
NODE_TABLE = "docs/node.md, the table of commands at the top"
BUILD_SH_TABLE = "docs/testbed.md, section 'build.sh'"

OPTION = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


# ------------------------------------------------------------- what the code defines


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _own_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - HELP


@functools.lru_cache(maxsize=1)
def own_parser() -> argparse.ArgumentParser:
    """edgepin's parser without openstacksdk's options (as `edgepin node ...` builds it)."""
    from provisioner.cli import build_parser

    return build_parser(["node"])


@functools.lru_cache(maxsize=1)
def openstacksdk_options() -> set[str]:
    """The options openstacksdk's loader adds to an operator command's parser."""
    return _own_options(edgepin_parser()) - _own_options(own_parser())


@functools.lru_cache(maxsize=1)
def edgepin_commands() -> dict[tuple[str, ...], set[str]]:
    """Command path (``()`` for ``edgepin`` itself) -> its long options. A path is listed
    when it runs something (no subcommands) or has options of its own."""
    found: dict[tuple[str, ...], set[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = _subcommands(parser)
        options = _own_options(parser)
        if options or not subs:
            found[path] = options
        for name, child in subs.items():
            walk(child, (*path, name))

    walk(own_parser(), ())
    return found


def _shell_function(text: str, name: str) -> str:
    m = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", text, re.M | re.S)
    assert m, f"build.sh: no function {name}()"
    return m.group(1)


@functools.lru_cache(maxsize=1)
def build_sh_commands() -> dict[str, set[str]]:
    """./build.sh command -> its options, from build.sh and the programs it runs."""
    text = BUILD_SH.read_text()
    main = _shell_function(text, "main")
    commands: dict[str, set[str]] = {}
    for names, function in re.findall(r"^\s+([a-z][a-z| -]*)\)\s+(cmd_\w+|setup)\b", main, re.M):
        for name in (n.strip() for n in names.split("|")):
            if not name.startswith("-") and name != "help":
                is_cmd = function.startswith("cmd_")
                commands[name] = _shell_command_options(text, function) if is_cmd else set()
    assert {"image", "test", "controlplane"} <= set(commands), commands
    return commands


def _shell_command_options(text: str, function: str) -> set[str]:
    body = _shell_function(text, function)
    options = set(re.findall(r"^\s+(?:-\w \| )?(--[a-z][a-z0-9-]*)(?: \| -\w)?\)", body, re.M))
    module = re.search(r"-m ([\w.]+) \"\$@\"", body)
    if module and not module.group(1).startswith("pytest"):
        options |= python_options(REPO / (module.group(1).replace(".", "/")))
    return options - HELP


def python_options(module: Path) -> set[str]:
    """Long options of every ``add_argument`` call in a module (or a package's __main__)."""
    path = module / "__main__.py" if module.is_dir() else module.with_suffix(".py")
    tree = ast.parse(path.read_text())
    options: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    options.add(str(arg.value))
    assert options, f"{path.relative_to(REPO)}: no options found"
    return options


def image_usage_text() -> str:
    return _shell_function(BUILD_SH.read_text(), "image_usage")


@functools.lru_cache(maxsize=1)
def node_settings() -> dict[str, str]:
    from provisioner.node.config import SETTINGS

    return {key: default for key, (default, _) in SETTINGS.items()}


@dataclass(frozen=True)
class DibVariable:
    element: str
    name: str
    default: str | None  # None: read by a hook, no environment.d default


def _unquote(value: str) -> str:
    return value.strip().strip('"').strip("'")


@functools.lru_cache(maxsize=1)
def dib_variables() -> list[DibVariable]:
    found: list[DibVariable] = []
    for element in sorted(p for p in ELEMENTS.iterdir() if p.is_dir()):
        defaults: dict[str, str] = {}
        for env in sorted((element / "environment.d").glob("*")):
            for name, value in re.findall(r"^export (DIB_[A-Z0-9_]+)=(.*)$", env.read_text(), re.M):
                m = re.fullmatch(rf"\$\{{{name}:-(.*)\}}", value.strip())
                defaults[name] = _unquote(m.group(1) if m else value)
        read: set[str] = set()
        for path in element.rglob("*"):
            if path.is_file() and "host-shims" not in path.parts and path.name != "README.rst":
                read |= set(re.findall(r"\bDIB_EDGEPIN_[A-Z0-9_]+\b", path.read_text("latin-1")))
        for name in sorted(set(defaults) | read):
            found.append(DibVariable(element.name, name, defaults.get(name)))
    assert found
    return found


ENV_READ = re.compile(r"""(?:environ\.get|env\.get|getenv|_env)\(\s*["'](EDGEPIN_[A-Z0-9_]+)["']""")


@functools.lru_cache(maxsize=1)
def user_environment() -> dict[str, str]:
    """EDGEPIN_* variable -> the first file that reads it (a user sets these)."""
    found: dict[str, str] = {}
    for name in re.findall(r"\$\{(EDGEPIN_[A-Z0-9_]+):-", BUILD_SH.read_text()):
        found.setdefault(name, "build.sh")
    unit = REPO / "tests" / "unit"
    for top in ("provisioner", "tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            if unit in path.parents:
                continue
            for name in ENV_READ.findall(path.read_text()):
                found.setdefault(name, str(path.relative_to(REPO)))
    assert "EDGEPIN_EDGE_DOMAIN" in found and "EDGEPIN_VENV" in found, found
    return found


SETTING = re.compile(r"\b(?:DIB_)?EDGEPIN_[A-Z0-9_]+")


def _code_files() -> Iterator[Path]:
    """The files the code is made of: what builds, runs and tests edgepin (the unit tests,
    which invent names to test with, and the elements' READMEs, which are docs, aside)."""
    yield BUILD_SH
    yield REPO / ".ci" / "run"
    unit = REPO / "tests" / "unit"
    for top in ("provisioner", "elements", "tests", "benchmarks"):
        for path in sorted((REPO / top).rglob("*")):
            if (
                path.is_file()
                and unit not in path.parents
                and "__pycache__" not in path.parts
                and path.name != "README.rst"
            ):
                yield path


@functools.lru_cache(maxsize=1)
def settings_in_code() -> dict[str, str]:
    """Every EDGEPIN_* and DIB_EDGEPIN_* name the code holds -> the first file naming it.
    A name that ends in ``_`` is a prefix (``EDGEPIN_X_``: keys the node ignores)."""
    found: dict[str, str] = {}
    for path in _code_files():
        for name in SETTING.findall(path.read_text("latin-1")):
            found.setdefault(name, str(path.relative_to(REPO)))
    assert {"EDGEPIN_ROOT", "DIB_EDGEPIN_PCRS", "EDGEPIN_CP_SHAPE"} <= set(found), found
    return found


def _settings_named(paths: list[Path]) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for name in SETTING.findall(line):
                found.setdefault(name, f"{path.relative_to(REPO)}:{number}")
    return found


# ------------------------------------------------------------------ what the docs say


@dataclass(frozen=True)
class Row:
    doc: Path
    line: int
    cells: tuple[str, ...]
    text: str

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    def options(self) -> set[str]:
        """The options the row names: in its first span and in spans that are no other
        command line (a row may point at `edgepin enroll --pcr-values`)."""
        spans = re.findall(r"`([^`]+)`", self.text)
        own = spans[:1] + [s for s in spans[1:] if s.split()[0] not in ("edgepin", "./build.sh")]
        return {o for span in own for o in OPTION.findall(span)}


def table_rows() -> Iterator[Row]:
    for doc in DOCS:
        in_block = False
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            if line.strip().startswith("```"):
                in_block = not in_block
            if in_block or not line.startswith("|") or re.match(r"^\|[\s|:-]+\|?$", line):
                continue
            cells = tuple(c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|")))
            yield Row(doc, number, cells, line)


def _first_span(cell: str) -> str | None:
    m = re.match(r"^`([^`]+)`", cell)
    return m.group(1) if m else None


def edgepin_rows() -> dict[tuple[str, ...], list[Row]]:
    """Rows whose first cell starts with `edgepin ...`, by the command path they name."""
    rows: dict[tuple[str, ...], list[Row]] = {}
    for row in table_rows():
        span = _first_span(row.cells[0])
        if not span or span.split()[0] != "edgepin":
            continue
        path: tuple[str, ...] = ()
        parser = own_parser()
        for word in span.split()[1:]:
            subs = _subcommands(parser)
            if word not in subs:
                break
            path, parser = (*path, word), subs[word]
        rows.setdefault(path, []).append(row)
    return rows


def build_sh_rows() -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    for row in table_rows():
        span = _first_span(row.cells[0])
        if not span or span.split()[0] != "./build.sh":
            continue
        words = span.replace("[", " ").replace("]", " ").split()[1:]
        command = words[0] if words and not words[0].startswith("-") else "image"
        rows.setdefault(command, []).append(row)
    return rows


def doc_text() -> str:
    return "\n".join(doc.read_text() for doc in DOCS)


def _edgepin_name(path: tuple[str, ...]) -> str:
    return " ".join(("edgepin", *path))


def _edgepin_table(path: tuple[str, ...]) -> str:
    return NODE_TABLE if path[:1] == ("node",) else OPERATOR_TABLE


# ------------------------------------------------------------------------- tests


def test_the_code_is_enumerated() -> None:
    """The enumerations find what is known to be there (so that an empty list cannot pass)."""
    commands = edgepin_commands()
    assert ("signing-cert", "create") in commands and ("node", "reconcile") in commands
    assert "--days" in commands[("signing-cert", "create")]
    assert "--no-progress" in commands[()] and "--root" in commands[("node",)]
    assert not any(o.startswith(OPENSTACKSDK_PREFIX) for opts in commands.values() for o in opts)
    assert {"--os-cloud", "--insecure"} <= openstacksdk_options()
    assert "--release" in build_sh_commands()["image"]
    assert "--store" in build_sh_commands()["controlplane"]
    assert "--down" in build_sh_commands()["demo"]
    assert "EDGEPIN_PCRS" in node_settings()
    assert any(v.name == "DIB_EDGEPIN_PCRS" and v.default for v in dib_variables())


@pytest.mark.parametrize("path", sorted(edgepin_commands()), ids=_edgepin_name)
def test_every_edgepin_command_and_option_is_in_a_table_row(path: tuple[str, ...]) -> None:
    name = _edgepin_name(path)
    rows = edgepin_rows().get(path)
    assert rows, (
        f"`{name}` has no row in the docs: add a row whose first cell starts with `{name}` "
        f"to {_edgepin_table(path)}, naming its options {sorted(edgepin_commands()[path])}"
    )
    named = set().union(*(r.options() for r in rows))
    missing = sorted(edgepin_commands()[path] - named)
    assert not missing, (
        f"`{name}` options {missing} are not documented: name them in its row "
        f"({', '.join(r.where() for r in rows)})"
    )


def test_edgepin_rows_name_only_real_options() -> None:
    problems = []
    parser_options = edgepin_commands()
    for path, rows in edgepin_rows().items():
        known = parser_options.get(path, set()) | (openstacksdk_options() if not path else set())
        for row in rows:
            for option in sorted(row.options() - known):
                if not option.startswith(OPENSTACKSDK_PREFIX):
                    problems.append(
                        f"{row.where()}: `{_edgepin_name(path)}` has no option {option}"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(build_sh_commands()))
def test_every_build_sh_command_and_option_is_in_a_table_row(command: str) -> None:
    rows = build_sh_rows().get(command)
    assert rows, f"`./build.sh {command}` has no row in {BUILD_SH_TABLE}"
    named = set().union(*(r.options() for r in rows))
    missing = sorted(build_sh_commands()[command] - named)
    assert not missing, (
        f"`./build.sh {command}` options {missing} are not documented: name them in its row "
        f"({', '.join(r.where() for r in rows)})"
    )


def test_build_sh_rows_name_only_real_options() -> None:
    problems = []
    for command, rows in build_sh_rows().items():
        known = build_sh_commands().get(command)
        if known is None:
            problems.append(f"{rows[0].where()}: ./build.sh has no command {command!r}")
            continue
        for row in rows:
            for option in sorted(row.options() - known - HELP):
                problems.append(f"{row.where()}: `./build.sh {command}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_build_sh_help_lists_every_command_and_image_option() -> None:
    """`./build.sh --help` and `./build.sh image --help` list what build.sh accepts."""
    listed = build_sh_usage()
    missing = sorted(c for c in build_sh_commands() if c not in listed)
    assert not missing, f"build.sh: usage() does not list the commands {missing}"
    usage = image_usage_text()
    text = BUILD_SH.read_text()
    image_options = set(
        re.findall(r"^\s+(--[a-z][a-z0-9-]*)\)", _shell_function(text, "cmd_image"), re.M)
    )
    missing = sorted(o for o in image_options if not re.search(rf"^  {o}\b", usage, re.M))
    assert not missing, f"build.sh: image_usage() does not list {missing}"
    undefined = sorted(set(re.findall(r"^  (--[a-z][a-z0-9-]*)", usage, re.M)) - image_options)
    assert not undefined, f"build.sh: image_usage() lists options cmd_image lacks: {undefined}"


def test_build_sh_command_lines_use_real_options() -> None:
    """`./build.sh COMMAND --option` in shell blocks and code spans: the option is the
    command's (test_docs.py checks the commands and controlplane's actions)."""
    problems = []
    lines = [(f"{c.doc.relative_to(REPO)}:{c.line}", list(c.words)) for c in all_commands()]
    for doc in DOCS:
        for number, _, span in inline_spans(doc):
            if span.startswith("./build.sh"):
                words = span.replace("[", " ").replace("]", " ").split()
                lines.append((f"{doc.relative_to(REPO)}:{number}", words))
    for where, words in lines:
        if words[0] != "./build.sh":
            continue
        command = words[1] if len(words) > 1 and not words[1].startswith("-") else "image"
        if command == "test" or command not in build_sh_commands():
            continue  # pytest's options; unknown commands: test_docs.py
        if len(words) == 2 and words[1] in HELP:
            continue
        known = build_sh_commands()[command] | HELP
        for word in words[1:]:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in known:
                problems.append(f"{where}: `./build.sh {command}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_every_option_in_a_code_span_exists() -> None:
    known = set(FOREIGN_OPTIONS) | HELP | openstacksdk_options()
    for options in edgepin_commands().values():
        known |= options
    for options in build_sh_commands().values():
        known |= options
    problems = []
    docs = [*DOCS, *sorted(ELEMENTS.glob("*/README.rst"))]
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            for span in re.findall(r"``([^`]+)``|`([^`]+)`", line):
                for option in OPTION.findall(span[0] or span[1]):
                    if option not in known and not option.startswith(OPENSTACKSDK_PREFIX):
                        problems.append(
                            f"{doc.relative_to(REPO)}:{number}: {option} is no option of "
                            "edgepin or ./build.sh (another program's? add it to "
                            "FOREIGN_OPTIONS in tests/unit/test_docs_options.py with its program)"
                        )
    assert not problems, "\n".join(problems)


def test_every_node_setting_is_in_the_configuration_table_with_its_default() -> None:
    node_md = REPO / "docs" / "node.md"
    rows = {
        r.cells[0].strip("`"): r for r in table_rows() if r.doc == node_md and len(r.cells) >= 3
    }
    problems = []
    for key, default in node_settings().items():
        row = rows.get(key)
        if row is None:
            problems.append(
                f"{key} (default {default!r}) has no row in docs/node.md#configuration: "
                f"add `| `{key}` | `{default}` | meaning |`"
            )
        elif row.cells[1].strip("`") != default:
            problems.append(
                f"{row.where()}: {key}'s default is {default!r} in provisioner/node/config.py, "
                f"the row says {row.cells[1]}"
            )
    assert not problems, "\n".join(problems)


def test_element_defaults_are_the_node_defaults() -> None:
    """A build-time DIB_EDGEPIN_X that becomes the node's EDGEPIN_X has the same default."""
    settings = node_settings()
    problems = [
        f"elements/{v.element}: {v.name} defaults to {v.default!r}, "
        f"provisioner/node/config.py's {v.name[4:]} to {settings[v.name[4:]]!r}"
        for v in dib_variables()
        if v.default is not None and settings.get(v.name[4:], v.default) != v.default
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variable", dib_variables(), ids=lambda v: f"{v.element}:{v.name}")
def test_every_dib_variable_is_in_its_readme_with_its_default(variable: DibVariable) -> None:
    readme = ELEMENTS / variable.element / "README.rst"
    m = re.search(rf"^{variable.name}\n  :Default: (.+)$", readme.read_text(), re.M)
    assert m, (
        f"{variable.name} is not documented in elements/{variable.element}/README.rst: add it "
        f"under 'Environment variables' as\n{variable.name}\n  :Default: "
        f"``{variable.default}``\n  :Description: ..."
    )
    documented = m.group(1)
    if variable.default:
        assert f"``{variable.default}``" in documented, (
            f"elements/{variable.element}/README.rst: {variable.name}'s default is "
            f"``{variable.default}`` in environment.d, the README says {documented}"
        )
    elif variable.default == "":
        assert re.match(r"(empty|none)\b", documented), (
            f"elements/{variable.element}/README.rst: {variable.name} is empty by default, "
            f"the README says {documented}"
        )


def test_build_sh_sets_only_documented_dib_variables() -> None:
    documented = {v.name for v in dib_variables()}
    set_by_build = set(re.findall(r"export (DIB_EDGEPIN_[A-Z0-9_]+)=", BUILD_SH.read_text()))
    missing = sorted(set_by_build - documented)
    assert not missing, (
        f"build.sh sets {missing}, which no element declares in environment.d and documents "
        "in its README.rst"
    )


@pytest.mark.parametrize("name", sorted(user_environment()))
def test_every_edgepin_environment_variable_is_documented(name: str) -> None:
    source = user_environment()[name]
    if source == "build.sh":
        where = "docs/testbed.md#buildsh (and build.sh's usage, Environment)"
        assert re.search(rf"^  {name}\b", _shell_function(BUILD_SH.read_text(), "usage"), re.M), (
            f"build.sh reads {name} but `./build.sh --help` does not list it under Environment"
        )
    elif source.startswith("provisioner/node/"):
        where = "docs/node.md#configuration"
    elif source.startswith("provisioner/"):
        where = "docs/operator.md"
    elif source.startswith("tests/image/") or "qemuvm" in source:
        where = "docs/qa.md"
    elif source.startswith("benchmarks/"):
        where = "docs/performance.md"
    else:
        where = "docs/testbed.md"
    assert re.search(rf"\b{name}\b", doc_text()), (
        f"{name} (read by {source}) is documented nowhere: name it in {where}"
    )


@pytest.mark.parametrize("name", sorted(settings_in_code()))
def test_every_setting_the_code_names_is_in_the_docs(name: str) -> None:
    """However the code reads it (``os.environ[...]``, ``${X:?}`` in a hook, a unit), a
    setting is named in README.md or docs/*.md; the DIB_* ones in their element's README.rst
    as well (with their default: test_every_dib_variable_is_in_its_readme...)."""
    where = settings_in_code()[name]
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![A-Z0-9_])", doc_text()), (
        f"{name} ({where}) is named in no doc: say what it does in docs/ "
        f"({'docs/host-image.md#build-time-settings' if name.startswith('DIB_') else where})"
    )


def test_every_setting_the_docs_name_is_in_the_code() -> None:
    docs = [*DOCS, *sorted(ELEMENTS.glob("*/README.rst"))]
    code = settings_in_code()
    problems = [
        f"{where}: {name} is no setting of the code (renamed or removed?)"
        for name, where in sorted(_settings_named(docs).items())
        if name not in code and not (name.endswith("_") and any(c.startswith(name) for c in code))
    ]
    assert not problems, "\n".join(problems)
