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


def is_hub_id(name: str) -> bool:
    return isinstance(name, str) and bool(_ID.match(name.strip())) and not Path(name).expanduser().exists()


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
    at = f"@{rev}" if rev else ""
    hit = cached_config(name)
    if hit is not None:
        return hit
    if offline():
        raise ValueError(f"{name.strip()!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; fix: "
                         f"on a machine with internet run `hf download {repo} config.json"
                         f"{' --revision ' + rev if rev else ''}` (same HF_HOME/HF_HUB_CACHE), or unset "
                         "HF_HUB_OFFLINE, or pass a local config.json / checkpoint directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as E
    try:
        return Path(hf_hub_download(repo, "config.json", revision=rev, cache_dir=cache_dir()))
    except E.GatedRepoError:
        raise ValueError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
                         "(`hf auth login` or HF_TOKEN), or pass a local config.json") from None
    except E.RevisionNotFoundError:
        raise ValueError(f"{repo} has no revision {rev!r}; fix: use a branch, tag or commit that exists "
                         "(or drop @REVISION)") from None
    except E.RepositoryNotFoundError:
        raise ValueError(f"{repo} is not a Hub repository (or it is private: log in with `hf auth login`); "
                         "fix: check the id, or pass a preset (`shardtrain presets`) or a local config.json") from None
    except E.EntryNotFoundError:
        raise ValueError(f"{repo}{at} has no config.json; fix: pass a local config.json") from None
    except Exception as e:  # noqa: BLE001 - network down, proxy, timeouts: LocalEntryNotFoundError & co
        raise ValueError(f"{name.strip()!r} is not cached and the Hub is unreachable ({type(e).__name__}); fix: "
                         "download it where there is internet (`hf download "
                         f"{repo} config.json`), set HF_HOME to that cache, or pass a local config.json") from None


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
    raise FileNotFoundError(f"data file {str(p)!r} does not exist")
