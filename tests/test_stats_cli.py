import json

from typer.testing import CliRunner

from tests.helpers import generation_sample, vqa_sample
from vlhealth.cli import app
from vlhealth.shards import ShardWriter, write_index
from vlhealth.stats import compute_stats

runner = CliRunner()


def make_shards(tmp_path):
    with ShardWriter(tmp_path / "vqa", prefix="vqa") as w:
        for i in range(6):
            w.write(vqa_sample(i, split="test" if i < 2 else "train", answer_type="open" if i % 2 else "closed"))
    write_index(tmp_path / "vqa", w.shards)
    with ShardWriter(tmp_path / "gen", prefix="gen") as w:
        for i in range(3):
            w.write(generation_sample(i))
    write_index(tmp_path / "gen", w.shards)
    return [tmp_path / "vqa", tmp_path / "gen"]


def test_compute_stats_counts(tmp_path):
    stats = compute_stats(make_shards(tmp_path))
    assert stats["samples"] == 9 and stats["shards"] == 2
    assert stats["images"] == 6 + 3 * 2
    assert stats["vq_tokens"] == 3 * 1024
    assert stats["by"]["task"] == {"comprehension": 6, "generation": 3}
    assert stats["by"]["answer_type"] == {"closed": 3, "open": 3, "unspecified": 3}
    assert stats["by_task_subtask_split"] == {
        "comprehension/vqa/test": 2, "comprehension/vqa/train": 4, "generation/ct2mri/train": 3}
    assert stats["by_task_subtask_anatomy_split"] == {
        "comprehension/vqa/all/test": 2, "comprehension/vqa/all/train": 4, "generation/ct2mri/brain/train": 3}


def test_stats_command_json_table_and_plot(tmp_path):
    shards = [str(p) for p in make_shards(tmp_path)]
    result = runner.invoke(app, ["stats", *shards, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by"]["subtask"] == {"ct2mri": 3, "vqa": 6}
    plot = tmp_path / "stats.png"
    result = runner.invoke(app, ["stats", *shards, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "ct2mri" in result.stdout and "comprehension" in result.stdout and "brain" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_verify_command(tmp_path):
    shards = make_shards(tmp_path)
    assert runner.invoke(app, ["verify", str(shards[0])]).exit_code == 0
    tar = next(shards[0].glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:-10] + b"0123456789")
    result = runner.invoke(app, ["verify", str(shards[0])])
    assert result.exit_code == 1 and "sha256" in result.output


def test_help_shows_examples():
    for args in (["--help"], ["demo-data", "--help"], ["stats", "--help"], ["build", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Example" in result.stdout and "vlhealth" in result.stdout, args


def test_verify_reports_unusable_folders_without_a_traceback(tmp_path):
    shards = make_shards(tmp_path)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["verify", str(shards[1]), str(tmp_path / "empty")])
    # a folder that is not a shard folder at all is a wrong input: one error line, exit 2, before any check
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "empty" in errors[0] and "index.json" in errors[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = runner.invoke(app, ["verify", str(shards[1])])
    assert result.exit_code == 0 and "ok gen: 3 samples" in result.output
