"""``healthgpt publish``: upload an export folder to a Hugging Face model repository.

The folder must be exactly what ``healthgpt export`` wrote (every file listed in
``healthgpt_export.json`` with a matching sha256, nothing else). Models trained on credentialed
sources (MIMIC: PhysioNet credentialed access), or on data whose access level the export could not
establish, are refused unless ``--i-have-the-rights`` is given: the weights of such a model may
carry what the data-use agreement forbids to share. The upload is one ``upload_folder`` call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from healthgpt.sharing.export import EXPORT_INFO, ExportError, read_export_info, verify_export
from vlhealth.cli_errors import print_error
from vlhealth.publish import PUBLISHABLE_ACCESS

__all__ = ["ModelPublishPlan", "PUBLISH_HELP", "plan_model_publish", "publish_command", "publish_model"]


@dataclass
class ModelPublishPlan:
    folder: Path
    files: list[str]  # paths inside the folder and the repository, sorted
    restricted: list[dict[str, Any]]  # training data whose access level forbids publishing


def plan_model_publish(folder: str | os.PathLike[str], *, i_have_the_rights: bool = False) -> ModelPublishPlan:
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{os.fspath(folder)}: not a folder; give a folder written by `healthgpt export`")
    info = read_export_info(folder)
    listed = dict(info.get("files", {}))
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    extra = sorted(set(on_disk) - set(listed) - {EXPORT_INFO})
    missing = sorted(set(listed) - set(on_disk))
    if extra or missing:
        raise ExportError(f"{folder.name}: the folder differs from what `healthgpt export` wrote (extra: {extra[:5]}, "
                          f"missing: {missing[:5]}); export again")
    verify_export(folder)  # every listed file with its recorded sha256
    data = info.get("training_data") or [{"name": "(training data not recorded)", "source": None, "access": "unknown"}]
    restricted = [d for d in data if d.get("access") not in PUBLISHABLE_ACCESS]
    if restricted and not i_have_the_rights:
        what = ", ".join(f"{d['name']} ({d.get('source') or '?'}: access {d.get('access')})" for d in restricted)
        raise ExportError(f"{folder.name}: trained on data that must not be published: {what}. Credentialed sources "
                          "(e.g. MIMIC) are never shared; if your data-use agreement allows sharing these weights, "
                          "pass --i-have-the-rights (unknown access: export again with --data <shard folders>)")
    return ModelPublishPlan(folder, sorted([*listed, EXPORT_INFO]), restricted)


def publish_model(folder: str | os.PathLike[str], repo_id: str, *, token: str | None = None, private: bool = True,
                  dry_run: bool = False, i_have_the_rights: bool = False) -> ModelPublishPlan:
    plan = plan_model_publish(folder, i_have_the_rights=i_have_the_rights)
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(plan.folder), repo_id=repo_id, repo_type="model", allow_patterns=plan.files,
                      commit_message=f"Add HealthGPT export {plan.folder.name}")
    return plan


PUBLISH_HELP = (
    "Upload a `healthgpt export` folder to a Hugging Face model repository (private unless --public).\n\n"
    "Refuses models trained on credentialed sources (MIMIC) or on data of unknown access unless "
    "--i-have-the-rights. --dry-run lists the files that would be uploaded and uploads nothing.\n\n"
    "Example:\n\n"
    "    healthgpt publish exports/tiny-stage3 --repo-id my-org/healthgpt-tiny --dry-run"
)


def publish_command(
    folder: Annotated[Path, typer.Argument(help="Folder written by `healthgpt export`.")],
    repo_id: Annotated[str, typer.Option(help="Hub repository, ORG/NAME.")],
    dry_run: Annotated[bool, typer.Option(help="List the staged files, upload nothing.")] = False,
    i_have_the_rights: Annotated[bool, typer.Option(
        "--i-have-the-rights", help="Publish although the training data is credentialed or of unknown access.")] = False,
    public: Annotated[bool, typer.Option(help="Create the repository public (default private).")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token (default: the logged-in token).", envvar="HF_TOKEN",
                                              show_envvar=False)] = None,
) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    try:
        plan = publish_model(folder, repo_id, token=token, private=not public, dry_run=dry_run,
                             i_have_the_rights=i_have_the_rights)
    except ExportError as err:
        print_error(err)
        raise typer.Exit(2) from err
    if plan.restricted:
        console.print(f"[yellow]warning:[/yellow] publishing with --i-have-the-rights although trained on "
                      f"{', '.join(d['name'] for d in plan.restricted)}")
    for f in plan.files:
        typer.echo(f)
    console.print(f"{'would upload' if dry_run else 'uploaded'} {len(plan.files)} files to {repo_id}")
