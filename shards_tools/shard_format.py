"""The shard set's on-disk contract, read the same way by every reader: URL schemes, member names and keys,
media extensions, and how a sample's label and JSON record are parsed.

Shards often come from elsewhere, so everything here treats its input as hostile: a URL that would run a
shell is refused unless explicitly allowed, and a label or JSON record that could exhaust memory or the
stack is an error with a reason, never an exception from deep inside a parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shards_tools.errors import UsageError

# Member extensions a shard sample's media may have, per modality (what mmcl writes, what img2dataset
# writes, and LAION-CLAP's audio layout).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg")
MEDIA_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS}
# The small members beside the media: first caption, JSON record, class index; and their size cap.
META_EXTENSIONS = ("txt", "json", "cls")
MAX_META_BYTES = 1 << 20

HTTP_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("file",)
# A URL scheme needs two or more characters, so a Windows drive ("C:\\...") or a file named "1:2.jpg" is
# not mistaken for one.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")

MAX_LABEL_DIGITS = 9  # a class index beyond a billion is a damaged or hostile .cls, not a class
MAX_JSON_DEPTH = 64  # real sample records nest a few levels; Python's parser overflows its stack near 1,000


def url_scheme(url: str) -> str | None:
    """The lower-case scheme of a URL-like string (``https``, ``pipe``, ``s3``, ``file``...), or None for a
    plain local path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def is_local(url: str) -> bool:
    """A plain path or a file:// URL."""
    scheme = url_scheme(url)
    return scheme is None or scheme in LOCAL_SCHEMES


def check_shard_url(url: str, *, allow_pipe: bool, where: str, allow_hint: str) -> None:
    """The one scheme check every shard path passes before anything opens it: local paths and http(s) are
    read, ``pipe:COMMAND`` runs COMMAND in a shell and is refused unless `allow_pipe`, anything else is
    refused. `allow_hint` says how this entry point allows pipes (``set data.allow_pipe: true``)."""
    scheme = url_scheme(url)
    if scheme is None or scheme in LOCAL_SCHEMES or scheme in HTTP_SCHEMES:
        return
    if scheme == "pipe":
        if not allow_pipe:
            raise UsageError(
                f"{where}: {url!r} is a pipe: URL, which runs a shell command; refused unless explicitly "
                f"allowed: {allow_hint} if you trust where it came from"
            )
        return
    raise UsageError(
        f"{where}: {url!r} uses the unsupported scheme {scheme!r}; use a local path, http(s)://, or a pipe: "
        "URL whose command writes the shard to stdout (e.g. 'pipe:aws s3 cp s3://bucket/shard-000000.tar -' "
        f"or 'pipe:curl -s ftp://host/shard.tar'), which runs only when explicitly allowed ({allow_hint})"
    )


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, by webdataset's rule: the key is the path up to the first dot
    of the file name, the extension the rest (lower-cased). A name without a dot has an empty extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def is_shard_name(name: object) -> bool:
    """Whether a manifest's shard name is a plain file name in the shard folder (no folders, no ``..``, not
    absolute), so that a hostile manifest cannot make a reader open any other file."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def parse_label(data: bytes | str) -> int | None:
    """A class index from a ``.cls`` member: a non-negative decimal integer of at most MAX_LABEL_DIGITS
    digits, surrounded by whitespace at most; None for anything else."""
    text = data.decode("ascii", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    if not text or len(text) > MAX_LABEL_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def sample_label(meta: dict, cls: bytes | None) -> int | None:
    """A shard sample's class index: its JSON record's "label_index" when that is a valid index, else its
    ``.cls`` member (parse_label); None if neither has one."""
    value = meta.get("label_index")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**MAX_LABEL_DIGITS:
        return value
    return parse_label(cls) if cls is not None else None


def parse_json_object(data: bytes | str) -> dict[str, Any]:
    """A JSON object from untrusted bytes; ValueError (with the reason) for invalid JSON, another type, or
    nesting deeper than MAX_JSON_DEPTH (which would overflow a recursive consumer's stack)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"invalid JSON ({_short(err)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"JSON is a {type(value).__name__}, not an object")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in node)
    return deepest


def _short(err: Exception, limit: int = 200) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."
