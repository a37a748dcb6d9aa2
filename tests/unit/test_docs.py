"""Docs that cannot rot: every command the docs show exists, with the flags shown.

- Every ``edgepin ...`` line in a fenced ``sh`` block of README.md and docs/*.md is parsed by
  the real argument parser (``provisioner.cli.build_parser``), with abbreviations turned off:
  the subcommands, options, choices and required arguments must all be accepted. A ``…``
  placeholder stands for any value.
- Every ``./build.sh ...`` line names a command that ``./build.sh --help`` lists; for
  ``controlplane`` the action and options must be ones its parser defines, for ``test`` the
  ``-m`` markers must be declared in pyproject.toml.
- Any other program in an ``sh`` block must be one of a short list of known tools (only the
  name is checked), so that a typo like ``edgpin`` fails.
- Inline code spans that start with ``edgepin `` or ``./build.sh`` name real subcommands and
  options.
- Relative links between the docs point at files and headings that exist.

Nothing is run: the parsers are built in-process and build.sh is read as text.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
PLACEHOLDER = "PLACEHOLDER"
SEPARATORS = {"|", "||", "&&", ";"}
SHELL_FENCES = {"sh", "shell", "bash", "console"}

# Programs the docs may show besides edgepin and ./build.sh. Only the name is checked.
OTHER_PROGRAMS = {
    ".venv/bin/python",
    ".venv/bin/ruff",
    "apt-get",
    "barbican-manage",
    "base64",
    "cat",
    "cd",
    "ceph",
    "cp",
    "curl",
    "dd",
    "dib-lint",
    "disk-image-create",
    "du",
    "export",
    "git",
    "grep",
    "head",
    "journalctl",
    "jq",
    "less",
    "ls",
    "lsblk",
    "mkdir",
    "mkfs.exfat",
    "mount",
    "openstack",
    "python3",
    "qemu-img",
    "qemu-system-x86_64",
    "rbd",
    "rm",
    "sed",
    "sha256sum",
    "swtpm",
    "swtpm_setup",
    "systemctl",
    "tail",
    "tpm2_createek",
    "tpm2_getekcertificate",
    "tpm2_nvread",
    "tpm2_pcrread",
    "umount",
    "virsh",
    "xz",
}
PREFIXES = {"sudo", "time", "env"}


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}: {shlex.join(self.words)}"


class ParseError(Exception):
    pass


# ----------------------------------------------------------------- reading the docs


def shell_blocks(doc: Path) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block, continuations joined."""
    in_block = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        fence = line.strip()
        if fence.startswith("```"):
            if in_block:
                in_block = False
                if pending:
                    yield start, " ".join(pending)
                    pending = []
            elif fence[3:].strip().lower() in SHELL_FENCES:
                in_block = True
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        stripped = line.strip()
        if stripped.startswith("$ "):  # console style prompt
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(p for p in pending if p)
        pending = []
        if logical:
            yield start, logical


def commands(doc: Path) -> Iterator[Command]:
    for number, logical in shell_blocks(doc):
        try:
            words = shlex.split(logical, comments=True)
        except ValueError as e:  # unbalanced quotes
            raise AssertionError(f"{doc.relative_to(REPO)}:{number}: cannot split: {e}") from e
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                while current and (
                    current[0] in PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0])
                ):
                    current.pop(0)
                if current:
                    yield Command(doc, number, tuple(current))
                current = []
            else:
                current.append(word)


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands(doc)]


def inline_spans(doc: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, line, span) of inline code spans outside fenced blocks."""
    in_block = False
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            yield number, line, span


# ------------------------------------------------------------------- the parsers


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _walk(child)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@functools.lru_cache(maxsize=1)
def edgepin_parser() -> argparse.ArgumentParser:
    """The real ``edgepin`` parser, strict: no abbreviations, errors raise."""
    from provisioner.cli import build_parser

    parser = build_parser([])

    def fail(message: str) -> None:
        raise ParseError(message)

    for p in _walk(parser):
        p.allow_abbrev = False
        p.error = fail  # type: ignore[method-assign]
    return parser


def substitute(words: tuple[str, ...]) -> list[str]:
    return [w.replace("…", PLACEHOLDER) if w != "…" else PLACEHOLDER for w in words]


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    for action in parser._actions:
        if option in action.option_strings:
            return action
    return None


def check_edgepin(args: list[str]) -> None:
    """Parse like the real CLI; ``--help``/``--version`` (which print and exit) are checked
    by walking the subcommands and options that lead to them."""
    parser = edgepin_parser()
    p, expects_value = parser, False
    for word in args:
        if expects_value:
            expects_value = False
            continue
        if word.startswith("-"):
            action = _action(p, word.split("=", 1)[0])
            if action is None:
                break  # parse_args below reports it
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                return
            expects_value = action.nargs != 0 and "=" not in word
            continue
        sub = _subcommands(p)
        if sub and word not in sub:
            raise ParseError(f"unknown subcommand {word!r} (choose from {', '.join(sub)})")
        if sub:
            p = sub[word]
    parser.parse_args(args)


@functools.lru_cache(maxsize=1)
def build_sh_usage() -> dict[str, str]:
    """Commands listed by ``./build.sh --help`` (the usage text in build.sh), with their line."""
    text = (REPO / "build.sh").read_text()
    usage = text.split("Commands:", 1)[1].split("\n\n", 1)[0]
    listed: dict[str, str] = {}
    for line in usage.splitlines():
        # "  image    ...", "  controlplane up|down|status ...", "  -h, --help    ..."
        m = re.match(r"^  (\S+?),? (?:(--\S+))?", line + " ")
        if m:
            for name in m.groups():
                if name:
                    listed[name] = line.strip()
    return listed


@functools.lru_cache(maxsize=1)
def controlplane_cli() -> tuple[set[str], set[str]]:
    """Actions and options of ``./build.sh controlplane`` (tests/testbed/controlplane.py)."""
    source = (REPO / "tests" / "testbed" / "controlplane.py").read_text()
    main = source.split("def main(", 1)[1]
    m = re.search(r'add_argument\("action", choices=\(([^)]*)\)', main)
    assert m, "controlplane.py: no action choices found"
    actions = set(re.findall(r'"([a-z-]+)"', m.group(1)))
    options = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', main)) | {"-h", "--help"}
    return actions, options


@functools.lru_cache(maxsize=1)
def pytest_markers() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    markers = data["tool"]["pytest"]["ini_options"]["markers"]
    return {m.split(":", 1)[0].strip() for m in markers}


def check_build_sh(args: list[str]) -> None:
    listed = build_sh_usage()
    if not args:
        return  # the default command (image)
    command, rest = args[0], args[1:]
    if command not in listed:
        raise ParseError(f"./build.sh {command}: not a command of ./build.sh --help")
    if command == "controlplane":
        actions, options = controlplane_cli()
        if not rest or rest[0] not in actions:
            raise ParseError(f"./build.sh controlplane: action must be one of {sorted(actions)}")
        for word in rest[1:]:
            if word.startswith("-") and word.split("=", 1)[0] not in options:
                raise ParseError(f"./build.sh controlplane: unknown option {word}")
    if command == "test":
        for i, word in enumerate(rest):
            if word == "-m" and i + 1 < len(rest):
                names = set(re.findall(r"[A-Za-z_]+", rest[i + 1])) - {"and", "or", "not"}
                unknown = names - pytest_markers() - {PLACEHOLDER}
                if unknown:
                    raise ParseError(f"./build.sh test -m: unknown markers {sorted(unknown)}")


def check(command: Command) -> None:
    program, *args = command.words
    if program == "edgepin":
        check_edgepin(substitute(tuple(args)))
    elif program == "./build.sh":
        check_build_sh(substitute(tuple(args)))
    elif program not in OTHER_PROGRAMS:
        raise ParseError(
            f"{program!r} is neither edgepin, ./build.sh nor a known tool "
            "(add it to OTHER_PROGRAMS in tests/unit/test_docs.py if it is real)"
        )


# ------------------------------------------------------------------------- tests


def test_the_docs_show_commands() -> None:
    found = all_commands()
    programs = {c.words[0] for c in found}
    assert {"edgepin", "./build.sh"} <= programs, programs
    assert len(found) >= 10


@pytest.mark.parametrize("command", all_commands(), ids=str)
def test_shell_command_exists(command: Command) -> None:
    try:
        check(command)
    except ParseError as e:
        pytest.fail(f"{command}\n  {e}")


def test_inline_edgepin_and_build_sh_spans() -> None:
    problems = []
    parser = edgepin_parser()
    for doc in DOCS:
        for number, _, span in inline_spans(doc):
            where = f"{doc.relative_to(REPO)}:{number}: `{span}`"
            words = span.replace("[", " ").replace("]", " ").split()
            if span.startswith("edgepin ") and not span.startswith("edgepin node ..."):
                p, expects_value = parser, False
                for word in words[1:]:
                    if expects_value:  # the value of the option before it
                        expects_value = False
                    elif word.startswith("--"):
                        action = _action(p, word.split("=", 1)[0])
                        if action is None:
                            problems.append(f"{where}: unknown option {word}")
                        else:
                            expects_value = action.nargs != 0 and "=" not in word
                    elif not word.startswith("-") and _subcommands(p):
                        sub = _subcommands(p)
                        if word not in sub:
                            problems.append(f"{where}: unknown subcommand {word!r}")
                            break
                        p = sub[word]
            elif span.startswith("./build.sh ") and len(words) > 1:
                if words[1].startswith("-"):
                    if words[1] not in build_sh_usage():
                        problems.append(f"{where}: ./build.sh has no option {words[1]}")
                elif words[1] not in build_sh_usage():
                    problems.append(f"{where}: ./build.sh has no command {words[1]!r}")
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_block = False
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_block:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_relative_links_resolve() -> None:
    problems = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # external: not checked here (no network in unit tests)
            path, _, fragment = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{doc.relative_to(REPO)}: link to missing {target}")
                continue
            if fragment and file.suffix == ".md" and fragment not in anchors(file):
                problems.append(f"{doc.relative_to(REPO)}: no heading #{fragment} in {path}")
    assert not problems, "\n".join(problems)
