"""`efficientvlm push`: upload a Hub-ready folder (from export or demo) with huggingface_hub."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class PushArguments:
    """Arguments of `efficientvlm push`."""

    folder: str = field(default="", metadata={"help": "A Hub-ready folder (from export or demo)."})
    repo_id: str = field(default="", metadata={"help": "Target repo, e.g. user/efficientvlm-retrieval."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / the login cache)."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub URL (default: HF_ENDPOINT or huggingface.co)."})
    commit_message: str = field(default="Upload EfficientVLM model", metadata={"help": "Commit message."})

    def __post_init__(self):
        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise ValueError(f"--folder must be a Hub-ready folder with a config.json, got {self.folder!r}")
        if "/" not in self.repo_id:
            raise ValueError(f"--repo_id must look like 'user/name', got {self.repo_id!r}")


def push_folder(args: PushArguments) -> str:
    """Creates the repo if needed and uploads the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=args.endpoint or os.environ.get("HF_ENDPOINT"), token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(folder_path=args.folder, repo_id=args.repo_id, commit_message=args.commit_message)
    return str(getattr(info, "commit_url", info))
