"""`efficientvlm push`: upload a Hub-ready folder (from export or demo) with huggingface_hub."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class PushArguments:
    """Arguments of `efficientvlm push`."""

    model: str = field(default="", metadata={"help": "A Hub-ready model folder (from export or demo).",
                                             "aliases": ["--folder"]})
    repo_id: str = field(default="", metadata={"help": "Target repo, e.g. user/efficientvlm-retrieval."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / the login cache)."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub URL (default: HF_ENDPOINT or huggingface.co)."})
    commit_message: str = field(default="Upload EfficientVLM model", metadata={"help": "Commit message."})

    def __post_init__(self):
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model must be a Hub-ready folder with a config.json, got {self.model!r}")
        if "/" not in self.repo_id:
            raise ValueError(f"--repo_id must look like 'user/name', got {self.repo_id!r}")


def card_for_repo(card: str, repo_id: str) -> str:
    """The exported card with the repo id in its usage snippets (`from_pretrained("user/name", ...)`) instead of the
    local-folder placeholder `export.LOCAL_REPO`."""
    from .export import LOCAL_REPO

    return card.replace(f'"{LOCAL_REPO}"', f'"{repo_id}"')


def _upload_operations(folder: str, repo_id: str) -> list:
    """One commit's additions: every file of the folder (links followed, hidden entries such as .git skipped), the
    README rewritten for `repo_id` in memory, so the local folder stays as exported (still loadable by its path and
    pushable to another repo) and the upload is one commit, with no staging copy of the weights."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            in_repo = os.path.relpath(path, folder).replace(os.sep, "/")
            if in_repo == "README.md":
                with open(path, encoding="utf-8") as f:
                    content = card_for_repo(f.read(), repo_id).encode("utf-8")
                operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=content))
            else:
                operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    return operations


def push_folder(args: PushArguments) -> str:
    """Creates the repo if needed and uploads the folder in one commit (the card's usage names the repo); returns the
    commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=args.endpoint or os.environ.get("HF_ENDPOINT"), token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.create_commit(args.repo_id, _upload_operations(args.model, args.repo_id),
                             commit_message=args.commit_message)
    return str(getattr(info, "commit_url", info))
