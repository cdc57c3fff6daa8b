"""One line per wrong input: every command of `vlhealth` and `healthgpt` (and their sub-apps, and the torchrun
entry point `python -m healthgpt.training`), given a missing path, a file of the wrong kind and an empty folder
where it expects data, exits 2 with exactly one `error:` line that shows the path as typed, and no traceback;
`--debug` / HEALTHGPT_DEBUG=1 give the traceback instead."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from healthgpt.cli import app as healthgpt_app
from healthgpt.training.train import torchrun_app
from vlhealth.cli import app as vlhealth_app
from vlhealth.cli import builder_modules

MISSING, WRONG, EMPTY = "missing/data", "notes.txt", "empty"
CASES = (MISSING, WRONG, EMPTY)

# (app, argv with {P} where the bad path goes, the cases that are wrong input for that argument)
VL, HG, TR = "vlhealth", "healthgpt", "python -m healthgpt.training"  # TR: the torchrun entry point
COMMANDS: list[tuple[str, list[str], tuple[str, ...]]] = [
    (VL, ["demo-data", "{P}"], (WRONG,)),  # demo-data writes into a new or empty folder
    (VL, ["stats", "{P}"], CASES),
    (VL, ["verify", "{P}"], CASES),
    (VL, ["publish", "{P}", "--repo-id", "org/name", "--dry-run"], CASES),
    (VL, ["merge-index", "{P}", "--expect", "2"], CASES),
    (VL, ["check-leaks", "{P}"], CASES),
    (VL, ["check-leaks", "ok_shards", "--test", "{P}"], CASES),
    (VL, ["mix", "--from", "{P}", "--out", "mix_out"], CASES),
    (VL, ["vq", "convert", "{P}", "out.safetensors"], (MISSING, WRONG)),
    (VL, ["vq", "encode", "{P}"], (MISSING, WRONG)),
    (VL, ["vq", "encode", "scan.png", "--vqgan", "{P}"], (MISSING, WRONG)),
    (VL, ["vq", "train", "{P}", "--out", "vq_out", "--steps", "1"], CASES),
    *[(VL, ["build", name, "{P}", "--out", f"out_{name}"], CASES) for name in builder_modules()],
    (VL, ["build", "vqa-rad", "empty", "--out", "out_drop", "--drop-leaks", "{P}"], CASES),
    (VL, ["build", "synthrad", "empty", "--out", "out_vq", "--vqgan", "{P}"], (MISSING, WRONG)),
    (HG, ["infer", "--image", "{P}", "--question", "What is shown?"], (MISSING, WRONG)),
    (HG, ["infer", "--checkpoint", "{P}", "--question", "What is shown?"], CASES),
    (HG, ["infer", "--task", "generation", "--instruction", "x", "--vq", "{P}", "--output", "g.png"], (MISSING, WRONG)),
    (HG, ["eval", "--shards", "{P}", "--out", "ev"], CASES),
    (HG, ["eval", "--shards", "ok_shards", "--checkpoint", "{P}", "--out", "ev2"], CASES),
    (HG, ["eval-volumes", "--shards", "{P}", "--source-root", "empty", "--oracle", "--out", "vol"], CASES),
    (HG, ["eval-volumes", "--shards", "ok_shards", "--source-root", "empty", "--checkpoint", "{P}", "--out", "v2"],
     CASES),
    (HG, ["train", "--stage", "3", "--task", "comprehension", "--shards", "{P}", "--out", "tr", "--steps", "1"], CASES),
    (HG, ["train", "--stage", "3", "--task", "comprehension", "--shards", "ok_shards", "--init", "{P}", "--out", "tr2",
          "--steps", "1"], CASES),
    (HG, ["pretrain-text", "--shards", "{P}", "--out", "pt", "--steps", "1"], CASES),
    (HG, ["pretrain-vision", "--shards", "{P}", "--out", "pv", "--steps", "1"], CASES),
    (HG, ["export", "{P}", "--out", "exp"], CASES),
    (HG, ["publish", "{P}", "--repo-id", "org/name", "--dry-run"], CASES),
    (HG, ["serve", "--checkpoint", "{P}"], CASES),
    (HG, ["plan", "--preset", "tiny", "--shards", "{P}", "--no-search"], CASES),
    (HG, ["verdict", "--eval", "{P}"], CASES),
    (HG, ["verdict", "--eval", "ok_eval", "--runs", "{P}"], (MISSING, WRONG)),
    (HG, ["experiment", "run", "{P}", "--out", "xp", "--dry-run"], CASES),
    (HG, ["experiment", "collect", "{P}"], CASES),
    (TR, ["--stage", "3", "--task", "comprehension", "--shards", "{P}", "--out", "tr3", "--steps", "1"], CASES),
    (TR, ["--stage", "3", "--task", "comprehension", "--shards", "ok_shards", "--init", "{P}", "--out", "tr4",
          "--steps", "1"], CASES),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with the bad inputs, one good shard folder and one image."""
    from PIL import Image

    from tests.helpers import vqa_sample
    from vlhealth.shards import ShardWriter, write_index

    root = tmp_path_factory.mktemp("wrong")
    (root / WRONG).write_text("not what any command reads\n", "utf-8")
    (root / EMPTY).mkdir()
    with ShardWriter(root / "ok_shards", prefix="vqa") as w:
        for i in range(4):
            w.write(vqa_sample(i, split="test" if i % 2 else "train"))
        shards = w.close()
    write_index(root / "ok_shards", shards, source="vqa_rad")
    Image.new("L", (32, 32), 90).save(root / "scan.png")
    (root / "ok_eval").mkdir()
    (root / "ok_eval" / "report.json").write_text("{}", "utf-8")
    return root


def _run(which: str, argv: list[str], env: dict[str, str] | None = None):
    app = {VL: vlhealth_app, HG: healthgpt_app}.get(which) or torchrun_app()
    return CliRunner().invoke(app, argv, env=env)


def _cases() -> list[tuple[str, list[str], str]]:
    return [pytest.param(which, argv, case, id=f"{which} {' '.join(argv[:2])} {argv.index('{P}')} {case}")
            for which, argv, cases in COMMANDS for case in cases]


@pytest.mark.parametrize(("which", "argv", "case"), _cases())
def test_every_command_gives_one_error_line(workdir: Path, monkeypatch: pytest.MonkeyPatch, which: str,
                                            argv: list[str], case: str) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("HEALTHGPT_DEBUG", raising=False)
    result = _run(which, [case if a == "{P}" else a for a in argv])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert case in errors[0], errors[0]  # the path as typed
    assert str(workdir) not in result.output  # never the absolute working folder


@pytest.mark.parametrize("how", ["--debug", "HEALTHGPT_DEBUG"])
def test_debug_shows_the_traceback(workdir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.chdir(workdir)
    argv = ["stats", MISSING]
    result = _run(VL, ["--debug", *argv] if how == "--debug" else argv,
                  env={"HEALTHGPT_DEBUG": "1"} if how != "--debug" else None)
    assert result.exception is not None and not isinstance(result.exception, SystemExit)
    assert MISSING in str(result.exception)
    # --debug anywhere on the line, healthgpt too
    result = _run(HG, ["verdict", "--eval", MISSING, "--debug"])
    assert result.exception is not None and not isinstance(result.exception, SystemExit)
    # and the torchrun entry point
    result = _run(TR, ["--stage", "3", "--task", "comprehension", "--shards", MISSING, "--out", "tr5", "--debug"])
    assert result.exception is not None and not isinstance(result.exception, SystemExit)
    assert MISSING in str(result.exception)


@pytest.mark.parametrize("which", [HG, TR])
def test_a_bad_option_value_is_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """A value Click itself rejects (parsed before the command runs) is one line too, naming the option and
    where the help is (never a Rich panel)."""
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("HEALTHGPT_DEBUG", raising=False)
    argv = ["--stage", "three", "--task", "comprehension", "--shards", "ok_shards", "--out", "tr6"]
    result = _run(which, ["train", *argv] if which == HG else argv)
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1, result.output
    assert "--stage" in errors[0] and "--help`" in errors[0], errors[0]
    assert [ln for ln in result.output.splitlines() if ln.strip()] == errors, result.output


def test_every_command_is_covered() -> None:
    """A new command must be added to the table above."""
    from typer.main import get_command

    def leaves(cmd, prefix):
        sub = getattr(cmd, "commands", None)
        if not sub:
            return {prefix}
        return set().union(*(leaves(c, f"{prefix} {n}".strip()) for n, c in sub.items()))

    have = leaves(get_command(vlhealth_app), VL) | leaves(get_command(healthgpt_app), HG)
    covered = set()
    for which, argv, _ in COMMANDS:
        words = [which]
        for a in argv:
            if a.startswith("-") or a == "{P}" or "/" in a or a in ("ok_shards", "ok_eval", "empty", "scan.png"):
                break
            words.append(a)
            if " ".join(words) in have:
                break
        covered.add(" ".join(words))
    assert have - covered == {"healthgpt experiment list"}  # takes no path
