"""Resolving "a local folder or a Hub repo id" to a local folder, with errors that name what was asked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled


def local_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    what: str,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    check_files: Callable[[list[str]], None] | None = None,
) -> Path:
    """Return ``path_or_repo_id`` itself when it is a local folder, else its Hub snapshot (downloaded or cached).

    ``what`` names the thing for error messages ("Parrot bundle", "expander"). ``check_files`` is given the repo's
    file list before anything is downloaded, and raises to refuse the repo.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {str(path_or_repo_id)!r} is a file; expected a folder or a Hub repo id.")
    if check_files is not None and not (local_files_only or constants.HF_HUB_OFFLINE):
        try:
            files = HfApi(token=token).list_repo_files(str(path_or_repo_id), revision=revision)
        except Exception:  # noqa: BLE001  (offline, unreachable, no such repo: the download below says which)
            files = None
        if files is not None:
            check_files(files)
    try:
        return Path(
            snapshot_download(
                str(path_or_repo_id),
                allow_patterns=allow_patterns,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except HFValidationError as error:
        raise ValueError(
            f"{what} {str(path_or_repo_id)!r} is neither an existing local folder nor a valid Hub repo id "
            f"('owner/name'): {error}"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as error:
        raise OSError(
            f"Could not get {what} {str(path_or_repo_id)!r}: it is not a local folder and the Hub did not provide it "
            f"({type(error).__name__}). If you are offline, download it once where the Hub is reachable "
            f"(`hf download {path_or_repo_id}`) or pass the path of a local copy."
        ) from error
