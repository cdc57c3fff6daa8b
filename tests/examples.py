"""The command examples of the README and of every `--help` text, extracted from the same text users read
(no hand-made copies), and a parser that checks one against the real command line."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
PROGRAMS = ("vlhealth", "healthgpt")
# placeholders of the examples that stand for values a real run has
ENV = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "IMG": "iVBORw0KGgo="}


@dataclass(frozen=True)
class Example:
    where: str  # README.md line N, or `<command> --help`
    text: str  # the line as written (continuations joined)
    argv: tuple[str, ...]  # program first: ("vlhealth", "build", ...)
    elided: bool  # the example leaves options out ("...")


def _joined(lines: list[str]) -> Iterator[tuple[int, str]]:
    buf, start = "", 0
    for i, line in enumerate(lines):
        if not buf:
            start = i
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        yield start, buf + stripped
        buf = ""
    if buf:
        yield start, buf


def _commands(text: str, variables: dict[str, str]) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """The vlhealth/healthgpt invocations in one shell line (also after `&&`, under torchrun)."""
    line = text.split(" #", 1)[0].strip()
    if not line or line.startswith("#"):
        return
    m = re.match(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)$", line)
    if m:
        variables[m.group(1)] = m.group(2).strip('"')
        return
    for name, value in variables.items():
        line = line.replace(f"${name}", value)
    for name, value in ENV.items():
        line = line.replace(f"${name}", value)
    for part in line.split("&&"):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        if not words:
            continue
        if words[0] == "torchrun":
            for i, w in enumerate(words):
                if w in ("healthgpt.cli", "healthgpt.training") and words[i - 1] == "-m":
                    rest = words[i + 1:]
                    words = ["healthgpt", *(["train"] if w == "healthgpt.training" else []), *rest]
                    break
                if w == "healthgpt" and i > 0 and words[i - 1] == "--no-python":
                    words = words[i:]
                    break
            else:
                continue
        if words[0] not in PROGRAMS:
            continue
        elided = any(w in ("...", "…") or "[" in w for w in words)
        words = [w for w in words if w not in ("...", "…")]
        yield part.strip(), tuple(words), elided


def readme_examples(path: Path = README) -> list[Example]:
    out: list[Example] = []
    lines = path.read_text("utf-8").splitlines()
    in_block, block, block_start = False, [], 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            if in_block:
                variables: dict[str, str] = {}
                for j, joined in _joined(block):
                    for text, argv, elided in _commands(joined, variables):
                        out.append(Example(f"README.md line {block_start + j + 1}", text, argv, elided))
                in_block, block = False, []
            else:
                in_block, block, block_start = True, [], i + 1
            continue
        if in_block:
            block.append(line)
    return out


def _all_commands() -> Iterator[tuple[str, object]]:
    from typer.main import get_command

    from healthgpt.cli import app as hg
    from vlhealth.cli import app as vl

    def walk(cmd: object, path: str) -> Iterator[tuple[str, object]]:
        yield path, cmd
        for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
            yield from walk(sub, f"{path} {name}")

    yield from walk(get_command(vl), "vlhealth")
    yield from walk(get_command(hg), "healthgpt")


def help_examples() -> list[Example]:
    """Every `Example:` block of every command's help (the text `--help` prints)."""
    out: list[Example] = []
    for path, cmd in _all_commands():
        text = getattr(cmd, "help", None) or ""
        if "Example:" not in text:
            continue
        block = text.split("Example:", 1)[1]
        variables: dict[str, str] = {}
        for _, joined in _joined([ln.strip() for ln in block.splitlines()]):
            for piece, argv, elided in _commands(joined, variables):
                out.append(Example(f"`{path} --help`", piece, argv, elided))
    return out


def command_help_texts() -> dict[str, str]:
    return {path: getattr(cmd, "help", None) or "" for path, cmd in _all_commands()}


def parse(argv: tuple[str, ...]) -> list[str]:
    """Parse ``argv`` against the real command line, as the program would before running; returns the command
    path. A wrong command or option raises Click's usage error."""
    from typer.main import get_command

    from healthgpt.cli import app as hg
    from vlhealth.cli import app as vl

    cmd = get_command(vl if argv[0] == "vlhealth" else hg)
    args = list(argv[1:])
    names = [argv[0]]
    parent = None
    while True:
        ctx = cmd.make_context(names[-1], list(args), parent=parent, resilient_parsing=False)
        if not hasattr(cmd, "commands"):
            return names
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            raise AssertionError(f"{' '.join(names)}: no sub-command")
        name, sub, args = cmd.resolve_command(ctx, rest)
        names.append(name)
        cmd, parent = sub, ctx
