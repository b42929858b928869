"""Turn the `data.sources` entries into concrete shard lists with known sizes, failing early and clearly.

Folders become their `*.tar` files (sorted), brace patterns are expanded, local shards must exist,
and the sample counts come from the `manifest.json` / `sizes.json` that `mmcl shard` (and open_clip's
tooling) write beside the shards; a source's `num_samples` overrides them. For http(s) shards the
same files are fetched from the shards' folder URL, and a missing one only leaves the size unknown.
An index file that is there but malformed stops the run with a message naming it: its counts decide
what a truncated shard is.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from braceexpand import braceexpand

from mmcl.data.common import logger
from mmcl.data.config import DataConfig, SourceConfig
from mmcl.errors import UsageError
from shards_tools.http_client import USER_AGENT, BodyTooLarge, Deadline, read_body, watched_opener
from shards_tools.manifest import MANIFEST, SIZES, shard_list_problem, sizes_problem
from shards_tools.scores import scored_shards, sidecar_path
from shards_tools.shard_format import (
    HTTP_SCHEMES,
    MAX_META_BYTES,
    is_local,
    parse_json_object,
    url_scheme,
)

INDEX_TIMEOUT_S = 10
MAX_INDEX_BYTES = 64 * MAX_META_BYTES  # a manifest lists every shard: ~100 bytes each


@dataclass(frozen=True)
class Source:
    """One resolved source: its shard URLs in a fixed order, its mixing weight and its size."""

    urls: tuple[str, ...]
    weight: float
    num_samples: int | None  # None when neither the config nor an index file says
    name: str  # for messages: the config's first url entry
    shard_counts: Mapping[str, int] = field(default_factory=dict)  # url -> samples, where an index file says
    scores: str | None = None  # a `mmcl shard score` folder for these shards (shards_tools.scores)
    score_field: str = "score"


def local_path(url: str) -> Path:
    """The filesystem path of a local shard URL (a plain path or file://)."""
    return Path(url2pathname(urlparse(url).path)) if url.startswith("file:") else Path(url)


def literal_path(path: str) -> str:
    """A local path as the shard reader must be given it: a name that parses as a URL (a shard in the current
    folder named "pipe:CMD.tar" or "gs:x.tar") becomes ./NAME, so it is opened as a file, never run or
    fetched. One-letter schemes (Windows drives) are never read as URLs and are left as they are."""
    return f"./{path}" if len(urlparse(path).scheme) > 1 else path


def expand_urls(entries: list[str], where: str) -> list[str]:
    """Folders -> their *.tar (sorted), brace patterns -> their URLs; local shards must exist."""
    urls: list[str] = []
    for entry in entries:
        if is_local(entry) and local_path(entry).is_dir():
            folder = local_path(entry)
            names = sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))
            found = [literal_path(name) for name in names]
            if not found:
                raise UsageError(
                    f"{where}: the folder {folder} holds no *.tar shards; run `mmcl shard` into it first"
                )
            urls.extend(found)
            continue
        expanded = list(braceexpand(entry))
        if len(urlparse(entry).scheme) <= 1:  # a plain path: none of its expansions may be read as a URL
            expanded = [literal_path(u) for u in expanded]
        if is_local(entry):
            missing = [u for u in expanded if not local_path(u).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UsageError(
                    f"{where}: shard not found: {missing[0]}{more}; fix the path or pattern {entry!r}"
                )
        urls.extend(expanded)
    return urls


def _read_index(location: str, timeout: float) -> dict | None:
    """A JSON index file beside the shards (local path, or http URL read within `timeout` seconds in all);
    None if absent or unreachable, UsageError if it is there but not a JSON object."""
    try:
        if url_scheme(location) in HTTP_SCHEMES:
            with Deadline(timeout) as deadline:
                request = urllib.request.Request(location, headers={"User-Agent": USER_AGENT})
                with watched_opener(deadline).open(request, timeout=timeout) as response:
                    data = read_body(response, MAX_INDEX_BYTES)
                if deadline.expired:
                    raise TimeoutError(f"no complete answer within {timeout:g} s")
        else:
            path = local_path(location)
            if not path.is_file():
                return None
            if path.stat().st_size > MAX_INDEX_BYTES:
                raise BodyTooLarge(path.stat().st_size, MAX_INDEX_BYTES, announced=True)
            data = path.read_bytes()
    except urllib.error.HTTPError as err:
        if err.code != 404:
            logger.warning("could not read %s (%s): shard sizes unknown there", location, err)
        return None
    except (OSError, BodyTooLarge) as err:
        logger.warning("could not read %s (%s): shard sizes unknown there", location, err)
        return None
    try:
        return parse_json_object(data)
    except ValueError as err:
        raise UsageError(
            f"{location}: {err}; fix or delete it (it gives the shards' sample counts)"
        ) from None


@dataclass(frozen=True)
class ShardIndex:
    """What the index files beside a folder of shards say: samples per shard name, and from manifest.json
    the modality and class names (None where they do not say)."""

    counts: Mapping[str, int]
    modality: str | None = None
    class_names: tuple[str, ...] | None = None


def folder_index(folder: str, timeout: float = INDEX_TIMEOUT_S) -> ShardIndex:
    """The index of a shard folder (local path or http URL) from its manifest.json, else its sizes.json;
    empty without either, UsageError naming the file when one is malformed."""
    manifest = _read_index(f"{folder}/{MANIFEST}", timeout)
    if manifest is not None and "shards" in manifest:
        problem = shard_list_problem(manifest)
        names = manifest.get("class_names")
        if (
            problem is None
            and names is not None
            and not (isinstance(names, list) and all(isinstance(c, str) for c in names))
        ):
            problem = "class_names is not a list of names"
        if problem is not None:
            raise UsageError(
                f"{folder}/{MANIFEST}: {problem}; fix or delete it (it gives the shards' sample counts)"
            )
        counts = {s["name"]: s["count"] for s in manifest["shards"]}
        return ShardIndex(counts, manifest.get("modality"), tuple(names) if names is not None else None)
    sizes = _read_index(f"{folder}/{SIZES}", timeout)
    if sizes is None:
        return ShardIndex({})
    problem = sizes_problem(sizes)
    if problem is not None:
        raise UsageError(
            f"{folder}/{SIZES}: {problem}; fix or delete it (it gives the shards' sample counts)"
        )
    return ShardIndex(dict(sizes))


def shard_counts(
    urls: list[str], modality: str, where: str, timeout: float = INDEX_TIMEOUT_S
) -> dict[str, int]:
    """Samples per shard URL from the index files beside the shards (shards no index lists are left out).

    Raises UsageError if a manifest says the shards hold another modality than the model's.
    """
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        if url_scheme(url) == "pipe":  # no folder to look in
            continue
        folder, _, name = url.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    counts: dict[str, int] = {}
    for folder, names in by_folder.items():
        index = folder_index(folder or ".", timeout)
        if index.modality is not None and index.modality != modality:
            raise UsageError(
                f"{where}: {folder or '.'}/{MANIFEST} says these shards hold {index.modality}-text pairs, "
                f"but the model is an {modality}-text model; point it at {modality} shards"
            )
        counts.update(
            {
                f"{folder}/{name}" if folder else name: index.counts[name]
                for name in names
                if name in index.counts
            }
        )
    return counts


def resolve_source(
    source: SourceConfig, modality: str, where: str, timeout: float = INDEX_TIMEOUT_S
) -> Source:
    entries = source.url_list()
    urls = expand_urls(entries, where)
    counts = shard_counts(urls, modality, where, timeout)
    size = source.num_samples
    if size is None and all(url in counts for url in urls):
        size = sum(counts[url] for url in urls)
    if source.scores is not None:
        folder = Path(source.scores).expanduser()
        if not folder.is_dir() or not scored_shards(folder):
            raise UsageError(
                f"{where}.scores: {folder} is not a folder of score sidecars; write it with "
                f"`mmcl shard score {entries[0]} --output {folder} ...`"
            )
        if not any(sidecar_path(folder, url).is_file() for url in urls):
            raise UsageError(f"{where}.scores: {folder} holds no sidecar for any of these shards")
    return Source(
        urls=tuple(urls),
        weight=source.weight,
        num_samples=size,
        name=entries[0],
        shard_counts=counts,
        scores=str(Path(source.scores).expanduser()) if source.scores is not None else None,
        score_field=source.score_field,
    )


def resolve_sources(cfg: DataConfig, modality: str) -> list[Source]:
    """All configured sources, expanded and checked (raises UsageError naming the bad entry)."""
    timeout = min(INDEX_TIMEOUT_S, cfg.http_timeout)  # index files beside http shards
    return [resolve_source(s, modality, f"data.sources[{i}]", timeout) for i, s in enumerate(cfg.sources)]
