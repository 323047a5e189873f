"""Hugging Face Hub model ids (`--model ORG/NAME[@REVISION]`) -> a local config.json / snapshot dir.

Order: the local cache first (huggingface_hub.try_to_load_from_cache: HF_HUB_CACHE / HF_HOME, no
network), then, unless HF_HUB_OFFLINE=1, one `hf_hub_download` of config.json (the weights are the
runtime's business: `from_pretrained` on the same snapshot). Every failure is one line naming the id
and the fix (gated repo, unknown repo or revision, offline and not cached, network down).
huggingface_hub is imported only here, only when an id is given: `shardtrain plan --model PRESET`
never pays for it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


#: File extensions of data and config files: `data/train.jsonl` is a local path that is missing, not the
#: Hub repository "data/train.jsonl" (issue 22: a missing local data.train got an `hf download` hint).
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".txt", ".csv", ".tsv", ".gz", ".zst", ".bz2", ".xz",
                  ".jinja", ".yaml", ".yml", ".safetensors", ".bin", ".pt")


def looks_local(name: str) -> bool:
    """A path the user meant as a local one: starts with / ./ ../ ~, has a data/config file extension,
    or its first component is a directory here."""
    s = name.strip()
    if s.startswith(("/", "./", "../", "~", ".\\")):
        return True
    if s.split("@")[0].lower().endswith(_FILE_SUFFIXES):
        return True
    first = s.split("/", 1)[0]
    return "/" in s and bool(first) and Path(first).is_dir()


def is_hub_id(name: str) -> bool:
    return (isinstance(name, str) and bool(_ID.match(name.strip())) and not Path(name).expanduser().exists()
            and not looks_local(name))


def network_cause(e: BaseException) -> BaseException | None:
    """The connection/timeout/proxy error behind a huggingface_hub failure, or None. huggingface_hub raises
    LocalEntryNotFoundError (an EntryNotFoundError: "has no config.json" before issue 22) with the network
    error as its cause; its HTTP client's classes are matched by name (httpx/httpx2: ConnectError,
    ConnectTimeout, ReadTimeout, ProxyError, NetworkError) to stay version-proof."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or any(
                k in t.__name__ for t in type(e).__mro__ for k in ("Connect", "Timeout", "ProxyError", "NetworkError")):
            return e
        e = e.__cause__ or e.__context__
    return None


def _unreachable(name: str, repo: str, rev: str | None, cause: BaseException) -> ValueError:
    why = " ".join(str(cause).split())[:160] or type(cause).__name__
    return ValueError(f"could not reach the Hugging Face Hub (network: {type(cause).__name__}: {why}) for "
                      f"{name.strip()!r}; fix: pre-download it where there is internet with `hf download {repo}"
                      f"{' --revision ' + rev if rev else ''}` (same HF_HOME/HF_HUB_CACHE), or pass a local path")


def _probe(repo: str, rev: str | None) -> None:
    """One HEAD of config.json without retries (huggingface_hub's hf_hub_download backs off for ~23 s on a
    dead network before it gives up): network errors surface in seconds; 401/404 raise the Hub's errors."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=rev), timeout=PROBE_TIMEOUT_S)


#: Seconds the reachability probe waits for the Hub (a dead network fails at once; a slow one here).
PROBE_TIMEOUT_S = 10.0


def split_id(name: str) -> tuple[str, str | None]:
    repo, _, rev = name.strip().partition("@")
    return repo, (rev or None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    return str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None


def cached_config(name: str) -> Path | None:
    """config.json of ORG/NAME[@REV] in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    repo, rev = split_id(name)
    hit = try_to_load_from_cache(repo, "config.json", revision=rev, cache_dir=cache_dir())
    return Path(hit) if isinstance(hit, str) else None


def resolve_config(name: str) -> Path:
    """config.json path for a Hub id: cache, else download (not when offline); ValueError otherwise."""
    repo, rev = split_id(name)
    hit = cached_config(name)
    if hit is not None:
        return hit
    if offline():
        raise ValueError(f"{name.strip()!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; fix: "
                         f"on a machine with internet run `hf download {repo} config.json"
                         f"{' --revision ' + rev if rev else ''}` (same HF_HOME/HF_HUB_CACHE), or unset "
                         "HF_HUB_OFFLINE, or pass a local config.json / checkpoint directory")
    from huggingface_hub import hf_hub_download
    try:
        _probe(repo, rev)
        return Path(hf_hub_download(repo, "config.json", revision=rev, cache_dir=cache_dir()))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming its cause
        raise _download_error(e, name, repo, rev) from None


def _download_error(e: BaseException, name: str, repo: str, rev: str | None) -> ValueError:
    """The one-line ValueError for a failed config.json download; a network failure is named as such first
    (huggingface_hub wraps it in LocalEntryNotFoundError, an EntryNotFoundError)."""
    from huggingface_hub import errors as E
    at = f"@{rev}" if rev else ""
    if (cause := network_cause(e)) is not None:
        return _unreachable(name, repo, rev, cause)
    if isinstance(e, E.GatedRepoError):
        return ValueError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
                          "(`hf auth login` or HF_TOKEN), or pass a local config.json")
    if isinstance(e, E.RevisionNotFoundError):
        return ValueError(f"{repo} has no revision {rev!r}; fix: use a branch, tag or commit that exists "
                          "(or drop @REVISION)")
    if isinstance(e, E.RepositoryNotFoundError):
        return ValueError(f"{repo} is not a Hub repository (or it is private: log in with `hf auth login`); "
                          "fix: check the id, or pass a preset (`shardtrain presets`) or a local config.json")
    if isinstance(e, E.LocalEntryNotFoundError):  # not cached, and the Hub did not answer for another reason
        return ValueError(f"{name.strip()!r} is not cached and the Hub did not answer; fix: pre-download it where "
                          f"there is internet with `hf download {repo}` (same HF_HOME/HF_HUB_CACHE), or pass a "
                          "local config.json")
    if isinstance(e, E.EntryNotFoundError):
        return ValueError(f"{repo}{at} has no config.json; fix: pass a local config.json")
    return ValueError(f"{name.strip()!r} is not cached and the Hub could not be read ({type(e).__name__}); fix: "
                      f"download it where there is internet (`hf download {repo} config.json`), set HF_HOME to "
                      "that cache, or pass a local config.json")


def snapshot_dir(name: str) -> Path | None:
    """The cached snapshot directory of a Hub id (config.json's folder: weights/tokenizer live there
    when downloaded), for the runtime's from_pretrained; None when not cached."""
    hit = cached_config(name)
    return hit.parent if hit is not None else None


def dataset_snapshot(name: str) -> Path | None:
    """The cached snapshot directory of a Hub *dataset* id (refs/<rev> -> snapshots/<sha>), or None.
    Layout of huggingface_hub's cache: datasets--ORG--NAME/{refs,snapshots}."""
    from huggingface_hub import constants
    repo, rev = split_id(name)
    root = Path(cache_dir() or constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    ref = root / "refs" / (rev or "main")
    sha = ref.read_text().strip() if ref.is_file() else (rev or "")
    snap = root / "snapshots" / sha
    return snap if sha and snap.is_dir() else None


def dataset_source(path: str | Path) -> Path:
    """A local data path as given, else a Hub dataset id ORG/NAME[@REV] from the local Hugging Face cache
    (`hf download --repo-type dataset ORG/NAME`): its snapshot directory. Never downloads: data is read
    by every rank, so it must be on disk before the launch (the run dir's plan.json carries the result,
    emit/runtime.py). FileNotFoundError for a missing path, ValueError (with the fix) for an uncached id."""
    from shardtrain.demo_corpus import CORPUS, is_demo
    if is_demo(str(path)):  # the bundled demo corpus, named explicitly (issue 22)
        return CORPUS
    p = Path(path).expanduser()
    if p.exists():
        return p
    if is_hub_id(str(path)):
        snap = dataset_snapshot(str(path))
        if snap is not None:
            return snap
        repo, rev = split_id(str(path))
        raise ValueError(f"{path}: not a local file, and the dataset {repo!r} is not in the local Hugging Face "
                         f"cache; fix: `hf download --repo-type dataset {repo}"
                         f"{' --revision ' + rev if rev else ''}` (same HF_HOME/HF_HUB_CACHE), or give a path")
    raise FileNotFoundError(f"no such file or directory: {str(p)!r}")
