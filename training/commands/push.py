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


class HubError(ValueError):
    """The Hub could not be reached or refused the upload (the CLI prints it on one line and exits with 2)."""


def hub_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a failed Hub call: huggingface_hub's HTTP / offline / token errors and the HTTP
    client's connection and protocol errors (httpx, or requests with older huggingface_hub versions)."""
    import importlib

    from huggingface_hub import errors

    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("HfHubHTTPError", "OfflineModeIsEnabled", "LocalTokenNotFoundError", "HFValidationError"):
        if hasattr(errors, name):
            types.append(getattr(errors, name))
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def push_folder(args: PushArguments) -> str:
    """Creates the repo if needed and uploads the folder in one commit (the card's usage names the repo); returns the
    commit URL.

    Raises:
        HubError: the Hub is unreachable (no network, offline mode, a wrong --endpoint) or refused the request
            (authentication, permissions), naming the endpoint and the cause in one line.
    """
    return upload(_upload_operations(args.model, args.repo_id), what=f"{args.model} to {args.repo_id}",
                  repo_id=args.repo_id, endpoint=args.endpoint, token=args.token, private=args.private,
                  commit_message=args.commit_message)


def upload(operations: list, *, what: str, repo_id: str, endpoint: str | None, token: str | None, private: bool,
           commit_message: str, repo_type: str = "model", space_sdk: str | None = None) -> str:
    """Creates the repo if needed and commits `operations` in one commit; returns the commit URL. Hub and network
    failures become one `HubError` naming `what` ("<folder> to <repo>"), the endpoint and the cause."""
    from huggingface_hub import HfApi, constants

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, repo_type=repo_type, space_sdk=space_sdk, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type=repo_type, commit_message=commit_message)
    except hub_errors() as error:
        cause = " ".join(str(error).split())[:300] or type(error).__name__
        raise HubError(f"cannot push {what} on {endpoint}: {type(error).__name__}: {cause}") from error
    return str(getattr(info, "commit_url", info))
