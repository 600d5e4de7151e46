"""Fetch a model's tokenizer and/or weights from the Hugging Face Hub.

    python -m titan.tools.download meta-llama/Llama-3.2-1B --tokenizer-only
    python -m titan.tools.download Qwen/Qwen2.5-0.5B --dir checkpoints/qwen

Files go to the Hub's local cache (HF_HUB_CACHE / HF_HOME, shared with transformers) unless
--dir is given; a repo already cached is not fetched again, and with HF_HUB_OFFLINE=1 the cache
is used without the network. Gated repos (Llama) need an accepted license and a token: HF_TOKEN
in the environment, or `hf auth login`. Prints the local directory (use it as
`tokenizer=hf tokenizer.path=DIR`, or `checkpoint.initial_load=hf:DIR`).

Exit status: 0 done, 1 the download failed (one line says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "config.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]


class DownloadError(Exception):
    """One line for the user: what failed and what to do."""


def download(repo: str, tokenizer_only: bool = False, directory: Optional[str] = None,
             revision: Optional[str] = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    patterns = TOKENIZER_FILES if tokenizer_only else TOKENIZER_FILES + WEIGHT_FILES
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                       local_dir=directory))
    except GatedRepoError:
        has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        fix = ("this token has no access: accept the license on https://huggingface.co/" + repo
               if has_token else "accept its license on https://huggingface.co/" + repo +
               " and set HF_TOKEN (or run `hf auth login`)")
        raise DownloadError(f"{repo} is a gated repo: {fix}") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"no repo {repo!r} on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        local = _copy_from_cache(repo, revision, patterns, directory) if directory else None
        if local is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (no network?)"
            raise DownloadError(f"{repo} is not in the local cache and {why}; connect, or copy "
                                "the files into a directory and point tokenizer.path at it") from None
    if not (local / "tokenizer.json").is_file():
        have = sorted(p.name for p in local.iterdir()) if local.is_dir() else []
        raise DownloadError(f"{repo} has no tokenizer.json (it has: {', '.join(have) or 'nothing'}); "
                            "titan's tokenizer=hf needs the fast-tokenizer file")
    if not tokenizer_only and not any(local.glob("*.safetensors")):
        raise DownloadError(f"{repo} has no .safetensors weights in {local}; "
                            "use --tokenizer-only to fetch only the tokenizer")
    return local


def _copy_from_cache(repo: str, revision: Optional[str], patterns: list[str],
                     directory: str) -> Optional[Path]:
    """--dir without the Hub (offline, no network): huggingface_hub then looks only in the
    directory itself, so copy the wanted files from the local cache when it holds the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    target = Path(directory)
    for path in sorted(cached.rglob("*")):
        name = path.relative_to(cached).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(name, p) for p in patterns):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / name)  # the file, not the cache's symlink to a blob
    return target.resolve()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan.tools.download", description=__doc__.splitlines()[0])
    parser.add_argument("repo", help="a Hub repo id, e.g. meta-llama/Llama-3.2-1B")
    parser.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer and config files")
    parser.add_argument("--dir", help="write the files here instead of the Hub cache")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    args = parser.parse_args(argv)
    try:
        local = download(args.repo, args.tokenizer_only, args.dir, args.revision)
    except DownloadError as e:
        print(f"download error: {e}", file=sys.stderr)
        return 1
    print(local)
    return 0


if __name__ == "__main__":
    sys.exit(main())
