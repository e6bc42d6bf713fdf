"""WebDataset tar shards as a training source: shard URLs, the manifest, and reading samples.

A shard spec is what users write for `--data`: a local path or brace pattern
(`/data/in1k-train-{000000..001023}.tar`), an `http(s)://` URL or pattern, a
`pipe:` command (`pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`), several
of those joined by `::`, or a folder holding a `manifest.json` (all its shards).
Braces and `::` are expanded by the webdataset package (`expand_urls`).

Every shard set needs its manifest (written by `byol-fast convert-shards`): the
sample count of each shard (so an epoch is a fixed number of steps on every rank,
planned before any shard is read), the class names, and each shard's size and
SHA-256. It is found beside the shards: the shard's file name in the first URL is
replaced by `manifest.json` (for a pipe: command, inside the command), or given
explicitly with `shard_manifest`.

Samples are read through webdataset's tar iterator (`tar_file_iterator`, then
`group_by_keys`), never by a tar parser of ours; shards are opened by us so that a
missing, unreachable or non-tar shard fails with its URL and the fix: local
files with open(), http(s) with urllib (stdlib, real status codes; webdataset's
opener would shell out to curl), everything else (pipe:, gs://, ...) through
webdataset's gopen.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.sources import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""Member extensions that hold a sample's image (the first present is used)."""
LABEL_EXTENSION = "cls"
"""Member extension of a sample's class index, as text ("3")."""
_SHARD_NAME = re.compile(r"[^/\s'\"]+\.tar(?=$|[\s'\"])")
_HTTP_TIMEOUT_S = 60.0


class ShardError(DataError):
    """A shard (or the manifest) is missing, unreachable or not a tar; the message names it and the fix."""


def is_shard_spec(data: str | os.PathLike) -> bool:
    """True when `data` names shards (a URL, pipe:, *.tar pattern, or a folder with a manifest.json),
    not an image folder, a list file, a .beton or a .pt."""
    text = str(data)
    if text.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", text):
        return True
    if "::" in text or re.search(r"\.tar(\}|$)", text) or (".tar" in text and "{" in text):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def expand_shard_urls(spec: str) -> list[str]:
    """The shard URLs of a spec, in order: braces and `::` expanded (webdataset), a manifest folder listed."""
    from webdataset.shardlists import expand_urls

    folder = Path(spec).expanduser()
    if "://" not in spec and not spec.startswith("pipe:") and folder.is_dir():
        manifest = read_manifest(str(folder / MANIFEST_NAME))
        return [str(folder / shard.name) for shard in manifest.shards]
    urls = expand_urls(spec)
    if not urls:
        raise ShardError(f"shard spec {spec!r} names no shards: e.g. /data/train-{{000000..000015}}.tar")
    return urls


def shard_name(url: str) -> str:
    """The shard's file name (the manifest's key): `train-000003.tar` of any URL or pipe: command."""
    found = _SHARD_NAME.findall(url)
    if not found:
        raise ShardError(f"cannot find a *.tar shard name in {url!r}: shard URLs must name .tar files "
                         f"(e.g. pipe:aws s3 cp s3://bucket/train-000000.tar -)")
    return found[-1].rsplit("/", 1)[-1]


def manifest_url_for(shard_url: str) -> str:
    """Where the manifest of a shard lives: its URL with the shard's file name replaced by manifest.json."""
    name = shard_name(shard_url)
    index = shard_url.rfind(name)
    return shard_url[:index] + MANIFEST_NAME + shard_url[index + len(name):]


class _WholeBody(io.RawIOBase):
    """An HTTP response's body that raises IncompleteRead when the connection ends before Content-Length bytes
    came: http.client then returns b"" as at a normal end, and a tar reader would take the shard for truncated
    instead of the read for one to try again."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._response.readinto(buffer)
        if count == 0 and len(buffer) and self._response.length:  # length: the bytes still due (None: unknown)
            raise http.client.IncompleteRead(b"", self._response.length)
        return count

    def close(self) -> None:
        self._response.close()
        super().close()


def open_url(url: str, what: str = "shard") -> io.IOBase:
    """A binary stream of a local path, file://, http(s):// URL or anything webdataset's gopen opens (pipe:).

    Raises ShardError naming `url` and the fix when it is missing or unreachable.
    """
    if url.startswith("file://"):
        url = url[len("file://"):]
    if url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S)  # noqa: S310 - a URL the user gave
            return _WholeBody(response)
        except urllib.error.HTTPError as err:
            if err.code == 429 or err.code >= 500:  # the server is busy or failing, not the URL wrong
                raise ShardUnreachableError(f"{what} {url} could not be fetched: HTTP {err.code} {err.reason}; "
                                            f"check the server") from err
            raise ShardError(f"{what} {url} could not be fetched: HTTP {err.code} {err.reason}; check the URL "
                             f"and the brace range against what the server holds") from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ShardUnreachableError(f"{what} {url} is unreachable ({reason}): check the host, port and "
                                        f"network") from err
    if url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", url):
        from webdataset.gopen import gopen

        try:
            return gopen(url, "rb")
        except Exception as err:  # noqa: BLE001 - gopen raises whatever its scheme handler raises
            raise ShardError(f"{what} {url} could not be opened ({type(err).__name__}: {err}): check the "
                             f"command or URL scheme (pipe:, http(s)://, gs://, ais://)") from err
    path = Path(url).expanduser()
    try:
        return open(path, "rb")
    except FileNotFoundError as err:
        raise ShardError(f"{what} {path} does not exist: check the path and the brace range "
                         f"(`ls {path.parent}`), or write shards with `byol-fast convert-shards SRC OUT`") from err
    except IsADirectoryError as err:
        raise ShardError(f"{what} {path} is a folder, not a tar file: pass the shard files, "
                         f"e.g. {path}/train-{{000000..000015}}.tar") from err
    except PermissionError as err:
        raise ShardError(f"{what} {path} is not readable ({err.strerror}): fix its permissions") from err


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    """File name (train-000003.tar): the key matched against the URLs' names."""
    samples: int
    """Samples in the shard (each an image and a label)."""
    bytes: int = 0
    """Size of the tar file."""
    sha256: str = ""
    """SHA-256 of the tar file (hex)."""


@dataclass
class ShardManifest:
    """The manifest of a shard set (`manifest.json`, written by convert-shards)."""

    shards: list[ShardInfo]
    classes: list[str]
    """Name of each class index."""
    source: str = ""
    """What the shards were converted from (informational)."""
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def to_json(self) -> str:
        shards = [dict(name=s.name, samples=s.samples, bytes=s.bytes, sha256=s.sha256) for s in self.shards]
        return json.dumps({"version": MANIFEST_VERSION, "total": self.total, "classes": self.classes,
                           "source": self.source, "shards": shards, **self.extra}, indent=1)

    def counts_for(self, urls: list[str], where: str) -> list[int]:
        """Sample counts of the shards `urls` name; ShardError for a shard the manifest does not list."""
        known = {shard.name: shard.samples for shard in self.shards}
        missing = [url for url in urls if shard_name(url) not in known]
        if missing:
            raise ShardError(f"{len(missing)} shard(s) are not listed in the manifest {where}, e.g. {missing[0]}: "
                             f"the pattern names shards the manifest does not know (check the brace range), or "
                             f"rewrite the manifest with `byol-fast convert-shards`")
        return [known[shard_name(url)] for url in urls]


def parse_manifest(text: str, where: str) -> ShardManifest:
    """A ShardManifest from manifest.json's text; ShardError naming `where` when it is not one."""
    try:
        raw = json.loads(text)
        shards = [ShardInfo(str(s["name"]), int(s["samples"]), int(s.get("bytes", 0)), str(s.get("sha256", "")))
                  for s in raw["shards"]]
        classes = [str(c) for c in raw["classes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{where} is not a shard manifest ({type(err).__name__}: {err}): rewrite it with "
                         f"`byol-fast convert-shards`") from err
    extra = {k: v for k, v in raw.items() if k not in ("version", "total", "classes", "source", "shards")}
    return ShardManifest(shards, classes, str(raw.get("source", "")), extra)


def read_manifest(url: str) -> ShardManifest:
    """Read and parse a manifest from a path or URL."""
    with open_url(url, what="shard manifest") as stream:
        try:
            text = stream.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ShardError(f"shard manifest {url} could not be read ({err})") from err
    return parse_manifest(text, url)


@dataclass(frozen=True)
class ShardSet:
    """The shards a spec names, with their sample counts and the class names from the manifest."""

    urls: list[str]
    counts: list[int]
    classes: list[str]
    manifest_url: str

    @property
    def total(self) -> int:
        return sum(self.counts)


def resolve_shards(spec: str, manifest: str | None = None) -> ShardSet:
    """Expand `spec`, read its manifest (beside the first shard unless `manifest` is given) and look up every
    shard's count. Cheap: reads only the manifest, so a bad spec fails before any heavy work."""
    urls = expand_shard_urls(spec)
    where = manifest or manifest_url_for(urls[0])
    try:
        parsed = read_manifest(where)
    except ShardError as err:
        raise ShardError(f"{err}. Shards need the manifest.json that `byol-fast convert-shards` writes beside "
                         f"them (sample counts fix each epoch's steps); for shards made elsewhere write one with "
                         f"`byol-fast convert-shards --index-only '{spec}' OUT` (or point shard_manifest at it)"
                         ) from err
    return ShardSet(urls, parsed.counts_for(urls, where), parsed.classes, where)


@dataclass
class RawSample:
    """One sample as read from a shard, before decoding."""

    key: str
    shard: str
    image: bytes | None
    """The image member's bytes; None when the sample has none."""
    label: int | None
    """The class index; None when the sample has no (valid) label member."""


class TruncatedShardError(ShardError):
    """A shard ended inside a member or header (an interrupted download or copy)."""


class ShardUnreachableError(ShardError):
    """An http(s) shard could not be opened for a reason that may pass: the connection was refused or timed
    out, or the server answered 429 or 5xx. Readers retry it (reader.shard_samples)."""


class ShardConnectionLostError(TruncatedShardError):
    """An http(s) shard's connection dropped or stalled in the middle of the shard. Readers retry it."""


TRANSIENT_SHARD_ERRORS = (ShardUnreachableError, ShardConnectionLostError)
"""The failures of a network read that a second try may not meet."""


def _to_raw(sample: dict, shard: str) -> RawSample:
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    label = None
    text = sample.get(LABEL_EXTENSION)
    if text is not None:
        try:
            label = int(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = None
        if label is not None and label < 0:
            label = None
    return RawSample(sample["__key__"], shard, image, label)


class _Hashing(io.RawIOBase):
    """A read-only stream that feeds every byte read through a hash (check-data's SHA-256 of a streamed shard)."""

    def __init__(self, stream, digest) -> None:
        self.stream, self.digest = stream, digest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def iter_shard(url: str, digest=None) -> Iterator[RawSample]:
    """The samples of one shard in stored order, read with webdataset's tar iterator; with a hashlib `digest`,
    every byte of the shard (the tail after the last member too) goes through it.

    Raises ShardError when the shard cannot be opened or is not a tar archive (ShardUnreachableError when
    that may pass), and TruncatedShardError (after the complete samples before it) when it ends inside a
    member: ShardConnectionLostError when an http(s) connection dropped or stalled. Python's tarfile takes a
    shard cut at a header boundary for a normal end, so callers compare the count read with the manifest's.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = open_url(url)
    if digest is not None:
        stream = _Hashing(stream, digest)
    try:
        members = ({**member, "__url__": url} for member in tar_file_iterator(stream))
        for sample in group_by_keys(members):
            yield _to_raw(sample, url)
        while digest is not None and stream.read(1 << 20):
            pass  # the end-of-archive blocks and padding tarfile leaves unread
    except tarfile.ReadError as err:
        reason = str(err).split(" @ ")[0]  # webdataset appends " @ <stream object>"
        if "unexpected end" in reason:
            raise TruncatedShardError(f"shard {url} is truncated ({reason}): re-download or re-copy it") from err
        raise ShardError(f"shard {url} is not a tar archive ({reason}): re-download it, or re-write the shards "
                         f"with `byol-fast convert-shards`") from err
    except (http.client.HTTPException, ConnectionError, TimeoutError) as err:  # e.g. IncompleteRead: a drop
        reason = str(err).split(" @ ")[0]  # webdataset appends " @ <stream object>"
        raise ShardConnectionLostError(f"shard {url}: the connection was lost in the middle of the shard "
                                       f"({type(err).__name__}: {reason}); check the server and network") from err
    except (EOFError, tarfile.TarError) as err:
        raise TruncatedShardError(f"shard {url} is truncated ({type(err).__name__}: {err}): re-download or "
                                  f"re-copy it") from err
    except OSError as err:  # a pipe: command that failed
        raise ShardError(f"shard {url} could not be read ({err}): check the command, URL or network") from err
    finally:
        try:
            stream.close()
        except OSError:  # a failed pipe: command reports its status again on close; already raised above
            pass
