"""What edgepin tells its users to run exists: every ``--option`` that a message, a hint or a
help text in ``provisioner/`` names is an option of edgepin (or of the program named below),
and every `edgepin ...` command in backticks there, or in a unit's ``ExecStart=``, is a
command of edgepin with that command's options.

A node has no login: the hint on its console is all the factory gets, so a hint that names
an option edgepin lacks leaves the factory stuck.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.node.credentials import pcr_values_hint
from tests.testbed.qemuvm import PCR_VALUES_SAID
from tests.unit.test_docs_options import (
    OPENSTACKSDK_PREFIX,
    OPTION,
    _own_options,
    _subcommands,
    edgepin_commands,
    own_parser,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "provisioner"
UNITS = PACKAGE / "units"

# options of other programs that messages name, with the program
FOREIGN_OPTIONS = {
    "--url": "openstack endpoint set",
    "--assignment-cert": "./build.sh image",
    "--release-key": "./build.sh image",
    "--host-version": "./build.sh image",
    "--host-epoch": "./build.sh image",
    "--root-image": "python -m provisioner.imagemanifest (run by ./build.sh image)",
}


def _strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of each string the code shows a user: messages, hints, help texts.
    Left out: docstrings, the elements of list and tuple literals (argument vectors,
    choices) and the option names given to ``add_argument``. An f-string's values are
    replaced by ``X``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple):
            skip.update(id(e) for e in node.elts)
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        ):
            skip.add(id(node.body[0].value))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            skip.update(id(a) for a in node.args)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                str(v.value) if isinstance(v, ast.Constant) else "X" for v in node.values
            )
            yield node.lineno, text


def messages() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _strings(ast.parse(path.read_text())):
            found.append((f"{path.relative_to(REPO)}:{line}", text))
    for unit in sorted(UNITS.iterdir()):
        for number, line in enumerate(unit.read_text().splitlines(), start=1):
            if re.match(r"^ExecStart(Pre)?=", line):
                command = line.split("=", 1)[1].lstrip("-").replace("/usr/bin/edgepin", "edgepin")
                found.append((f"{unit.relative_to(REPO)}:{number}", f"`{command}`"))
    return found


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    for action in parser._actions:
        if option in action.option_strings:
            return action
    return None


def command_problems(span: str) -> list[str]:
    """What in an `edgepin ...` command line is not edgepin's: an unknown subcommand, or an
    option that the command it follows does not have (words that are no subcommand and no
    option, such as ``...`` or ``FILE``, are arguments)."""
    problems = []
    parser, path, expects_value = own_parser(), ["edgepin"], False
    for word in span.split()[1:]:
        if expects_value:
            expects_value = False
        elif word.startswith("--"):
            option = word.split("=", 1)[0]
            if option.startswith(OPENSTACKSDK_PREFIX) and len(path) == 1:
                expects_value = "=" not in word
                continue
            action = _action(parser, option)
            if action is None:
                problems.append(f"`{' '.join(path)}` has no option {option}")
            else:
                expects_value = action.nargs != 0 and "=" not in word
        elif not word.startswith("-") and _subcommands(parser):
            subs = _subcommands(parser)
            if word not in subs:
                problems.append(f"`{' '.join(path)}` has no command {word!r}")
                break
            parser, path = subs[word], [*path, word]
    return problems


def all_options() -> set[str]:
    known = set(FOREIGN_OPTIONS) | _own_options(own_parser())
    for options in edgepin_commands().values():
        known |= options
    return known


# ------------------------------------------------------------------------- tests


def test_the_scan_finds_the_messages() -> None:
    texts = [text for _, text in messages()]
    assert any("--pcr-values" in t for t in texts), "the enroll hints are not found"
    assert any(t.startswith("`edgepin node reconcile") for t in texts), "units not read"
    assert not any(t.startswith("``edgepin``: ") for t in texts), "a docstring was taken"


def test_every_option_and_command_a_message_names_exists() -> None:
    known = all_options()
    problems = []
    for where, text in messages():
        spans = re.findall(r"`(edgepin\b[^`]*)`", text)
        for span in spans:
            problems += [f"{where}: {p} (in {span!r})" for p in command_problems(span)]
        rest = re.sub(r"`edgepin\b[^`]*`", "", text)
        for option in OPTION.findall(rest):
            if option not in known and not option.startswith(OPENSTACKSDK_PREFIX):
                problems.append(
                    f"{where}: {option} is no option of edgepin (another program's? add it "
                    "to FOREIGN_OPTIONS in tests/unit/test_messages.py with its program)"
                )
    assert not problems, "\n".join(problems)


def test_the_pcr_values_hint_says_how_to_enroll_with_the_values_it_gives() -> None:
    """The hint a node prints when its seed is bound to other PCR values: the command and
    options that take the values exist, and the values can be read off the console line as
    the image tier and the demo read them."""
    values = {"0": "ab" * 32, "7": "00" * 32}
    hint = pcr_values_hint((0, 7), values)
    spans = re.findall(r"`(edgepin\b[^`]*)`", hint)
    assert spans and spans[0].split()[:2] == ["edgepin", "enroll"], hint
    assert not command_problems(spans[0]), command_problems(spans[0])
    assert "--pcrs 0,7 " in spans[0] and "--pcr-values FILE" in spans[0]
    enroll = edgepin_commands()[("enroll",)]
    assert {"--pcrs", "--pcr-values"} <= enroll
    said = re.search(PCR_VALUES_SAID, f"  hint: {hint}\r\n")
    assert said, hint
    assert json.loads(said.group(1)) == values
