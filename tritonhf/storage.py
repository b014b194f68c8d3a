"""Where a model repository lives: a local directory, object storage (s3://, gs://, as://) or a Kubernetes PVC.

The URIs are Triton's own (docs: model_repository.md, "Cloud Storage"), so one
string names the repository for ``tritonhf build --output``, ``tritonhf push``,
``tritonhf serve`` and ``tritonhf deploy``:

- ``s3://bucket/prefix`` (AWS), ``s3://host:port/bucket/prefix`` (an S3-compatible
  endpoint, plain HTTP) or ``s3://https://host:port/bucket/prefix``;
- ``gs://bucket/prefix``; ``as://account/container/prefix`` (Azure Blob Storage);
- ``pvc://claim/subpath`` (Kubernetes only: KServe's form, mounted into the pod);
- anything else is a local path.

Credentials never appear in a URI: the server and boto3 both read the standard
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION;
GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_ACCOUNT, AZURE_STORAGE_KEY), which
Kubernetes fills from a Secret (kubernetes.py).

Builds are immutable on object storage. ``tritonhf push DIR s3://bucket/prefix``
writes the build to ``prefix/<build id>/`` (the id is derived from the build's
sha256 record, repository.seal), never into another build, its manifest last,
and only then names it in the pointer ``prefix/.tritonhf.latest``. ``deploy``
and ``serve`` resolve a parent prefix through the pointer to the exact build;
``serve`` downloads that build to a local directory, checking every file's
sha256, and Triton serves those bytes, so a model reloaded after a crash gets
the same build whatever was pushed meanwhile.

Pushing is implemented for S3 (boto3); for gs:// and as:// the vendors' CLIs do
the copy (the error says which command), and Triton reads them itself, unverified.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tqdm import tqdm

from tritonhf import TritonHFError
from tritonhf.repository import (
    BUILD_ID,
    HASHES,
    MARKER,
    build_id,
    check_listing,
    local_files,
    mismatch,
    parse_record,
    sealed_id,
    verify,
)

logger = logging.getLogger(__name__)
SCHEMES = ("s3", "gs", "as", "pvc")
POINTER = ".tritonhf.latest"  # at the parent prefix: the id of the build pushed last
BUILDS = "tritonhf-builds"  # serve's verified copies, under the system's temporary directory
CHUNK = 8 * 2**20
DOWNLOADS = 8  # files fetched at once
# Triton's S3 path grammar (s3.h): an endpoint is named only together with its port.
S3_ENDPOINT = re.compile(r"^(?P<protocol>https?://)?(?P<host>[0-9A-Za-z.\-]+):(?P<port>[0-9]+)/(?P<rest>.*)$")


@dataclass(frozen=True)
class Location:
    """A parsed repository URI. ``container`` is the bucket (s3, gs), account/container (as) or the PVC's name."""

    uri: str
    scheme: str  # "" for a local path
    container: str = ""
    prefix: str = ""  # inside the container, no leading or trailing slash
    endpoint: str | None = None  # s3 only: http(s)://host:port of an S3-compatible server

    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def remote(self) -> bool:
        """Read by the server itself (object storage), not mounted."""
        return self.scheme in ("s3", "gs", "as")

    def key(self, relative: str) -> str:
        return str(PurePosixPath(self.prefix, relative)) if self.prefix else relative

    @property
    def build(self) -> str | None:
        """The build id, if the URI names one build (``.../<build id>``) rather than the prefix of its builds."""
        last = self.prefix.rsplit("/", 1)[-1]
        return last if BUILD_ID.match(last) else None

    def child(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def parse(uri: str | Path) -> Location:
    text = str(uri)
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in SCHEMES:
        return Location(text, "")
    endpoint = None
    if scheme == "s3" and (match := S3_ENDPOINT.match(rest)):
        endpoint = f"{match['protocol'] or 'http://'}{match['host']}:{match['port']}"
        rest = match["rest"]
    parts = [part for part in rest.split("/") if part]
    width = 2 if scheme == "as" else 1  # Azure: account and container
    if len(parts) < width:
        raise TritonHFError(f"{text}: no {'account/container' if scheme == 'as' else 'bucket'} in the URI")
    return Location(text, scheme, "/".join(parts[:width]), "/".join(parts[width:]), endpoint)


def s3_client(location: Location) -> Any:
    import boto3  # only where S3 is used: the serving path never needs it

    return boto3.client("s3", endpoint_url=location.endpoint)


class Files:
    """A build's files, read-only: their sizes and their text. Local directories and S3.

    An s3:// prefix of builds is read through its pointer: the build pushed last.
    """

    def __init__(self, uri: str | Path) -> None:
        self.location = parse(uri)
        if self.location.scheme not in ("", "s3"):
            raise TritonHFError(
                f"{self.location.uri}: tritonhf reads local and s3:// repositories; for {self.location.scheme}://"
                " pass a local copy of the built repository (--built DIR)"
            )
        self.root = Path(self.location.uri) if self.location.local else None
        if self.root is not None and not (self.root / MARKER).exists():
            raise TritonHFError(f"{self.root} is not a repository built by tritonhf (no {MARKER})")
        if self.root is None and self.location.build is None:
            self.location = parse(resolve(self.location.uri, self.client))

    @functools.cached_property
    def client(self) -> Any:
        """One S3 client for every read (deploy reads each model's config.pbtxt)."""
        return s3_client(self.location)

    def sizes(self) -> dict[str, int]:
        """Relative path -> bytes, every file."""
        if self.root is not None:
            return {name: (self.root / name).stat().st_size for name in local_files(self.root)}
        return dict(self.objects())

    def read(self, relative: str) -> str:
        if self.root is not None:
            return (self.root / relative).read_text()
        return read_object(self.client, self.location, relative)

    def objects(self) -> Iterator[tuple[str, int]]:
        """S3: (path relative to the prefix, size) of every object under it."""
        return objects(self.client, self.location)


def objects(client: Any, location: Location) -> Iterator[tuple[str, int]]:
    """(key relative to the location's prefix, size) of every object under it."""
    prefix = f"{location.prefix}/" if location.prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.container, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"][len(prefix) :], item["Size"]


def read_object(client: Any, location: Location, relative: str) -> str:
    try:
        body = client.get_object(Bucket=location.container, Key=location.key(relative))["Body"]
    except client.exceptions.NoSuchKey:
        raise TritonHFError(
            f"{location.uri}: no {relative} (not a build pushed by tritonhf, or not complete)"
        ) from None
    return body.read().decode()


def resolve(uri: str, client: Any = None) -> str:
    """The exact build an s3:// URI names: a build's URI as is, a prefix of builds through its pointer.

    Other URIs are returned as given: gs:// and as:// can't be read here (no SDK).
    """
    location = parse(uri)
    if location.scheme != "s3" or location.build is not None:
        return str(uri)
    try:
        build = read_object(client or s3_client(location), location, POINTER).strip()
    except TritonHFError:
        raise TritonHFError(
            f"{uri}: no build pushed there (no {POINTER}); push one (tritonhf push DIR {uri}) or name a build"
            f" ({uri.rstrip('/')}/<build id>)"
        ) from None
    if not BUILD_ID.match(build):
        raise TritonHFError(f"{location.child(POINTER)}: not a build id: {build[:40]!r}")
    return location.child(build)


@dataclass(frozen=True)
class Pushed:
    uri: str  # the exact build: s3://.../prefix/<build id>
    build: str
    uploaded: int  # files copied; 0: the build was there already

    def __str__(self) -> str:
        """What the CLI prints: the exact build URI, to deploy or serve."""
        done = f"pushed {self.uploaded} files" if self.uploaded else "already there, nothing uploaded"
        return f"build {self.build}: {done}; the prefix's pointer names it: {self.uri}"


def push(repository: Path, uri: str) -> Pushed:
    """Copy a built repository to object storage as a build of its own: ``uri/<build id>/``.

    A build, once there, is never written again: pods reading it (a heal, a scale-up,
    KServe's storage initializer) get the same bytes whatever is pushed later. Its
    manifest is written last (a build without it is incomplete, and nothing reads it),
    then the pointer ``uri/.tritonhf.latest`` names it. The same build pushed again
    uploads nothing and moves the pointer back to it. Refuses a bucket's root, a
    build's own prefix, and a prefix holding objects tritonhf did not push.
    """
    location = parse(uri)
    if not (repository / MARKER).exists():
        raise TritonHFError(f"{repository} is not a repository built by tritonhf (no {MARKER})")
    if sealed_id(repository) is None:
        raise TritonHFError(f"{repository} has no {HASHES} (built by an earlier tritonhf): build it again")
    build = verify(repository)  # what is pushed is what was built
    if location.scheme != "s3":
        account, _, container = location.container.partition("/")
        target = str(PurePosixPath(location.prefix, build))
        commands = {
            "gs": f"gcloud storage rsync --recursive {repository} {location.child(build)}",
            "as": f"az storage blob sync --account-name {account} --container {container} --source {repository}"
            f" --destination {target}",
        }
        if location.scheme not in commands:
            raise TritonHFError(f"{uri}: not object storage")
        raise TritonHFError(
            f"tritonhf pushes to s3:// only; for {uri} copy build {build} to a prefix of its own, then deploy and"
            f" serve that exact URI ({location.child(build)}): {commands[location.scheme]}"
        )
    if not location.prefix:
        raise TritonHFError(f"{uri}: push under a prefix (s3://bucket/prefix): builds go below it")
    if location.build is not None:
        raise TritonHFError(f"{uri} is a build's own prefix: push to the prefix above it")
    client = s3_client(location)
    existing = dict(objects(client, location))
    if foreign := sorted(key for key in existing if key != POINTER and not BUILD_ID.match(key.split("/")[0])):
        raise TritonHFError(
            f"{uri} holds objects that tritonhf did not push (e.g. {foreign[0]}): choose another prefix, or remove"
            " them first"
        )
    files, target = local_files(repository), parse(location.child(build))
    there = {key.split("/", 1)[1]: size for key, size in existing.items() if key.startswith(f"{build}/")}
    sizes = {name: (repository / name).stat().st_size for name in files}
    if unexpected := sorted(set(there) - set(files)):
        raise TritonHFError(f"{target.uri} holds {unexpected[0]}, which build {build} lacks: remove that prefix")
    complete = MARKER in there
    if complete and (there != sizes or read_object(client, target, HASHES) != (repository / HASHES).read_text()):
        raise TritonHFError(f"{target.uri} differs from build {build} (changed after its push): remove that prefix")
    if not complete:  # new, or a push that died half-way: the same bytes again, the manifest last
        for name in tqdm([f for f in files if f != MARKER], desc=f"push to {target.uri}", unit="file"):
            client.upload_file(str(repository / name), target.container, target.key(name))
        client.upload_file(str(repository / MARKER), target.container, target.key(MARKER))
    client.put_object(Bucket=location.container, Key=location.key(POINTER), Body=f"{build}\n".encode())
    return Pushed(target.uri, build, 0 if complete else len(files))


# serve's copies: fcntl locks held for the life of the process (a killed one releases them), so that two servers
# sharing a temporary directory never download at once, nor remove a build the other serves.
HELD: list[IO[bytes]] = []


def lock(path: Path, mode: int) -> IO[bytes] | None:
    """An flock on ``path`` (created); None if ``mode`` has LOCK_NB and another process holds it."""
    file = path.open("ab")
    try:
        fcntl.flock(file, mode)
    except BlockingIOError:
        file.close()
        return None
    return file


def materialize(uri: str | Path, builds: Path | None = None, build: str | None = None) -> Path | str:
    """What ``tritonhf serve`` hands the server: a verified local copy of the exact build.

    s3://: the build (a prefix's through its pointer) is downloaded to
    ``<tmp>/tritonhf-builds/<build id>/`` (``builds``), each file checked against the
    build's record, and the record against the build's id, while it arrives; a complete
    copy there is checked and reused (in a pod, /tmp outlives a container's restart), and
    other builds' copies that no running server holds are removed. A local repository
    with a record is checked in place (KServe's copy in /mnt/models). gs:// and as://
    are handed to Triton unverified (no SDK here), with a warning. A mismatch, a missing
    file or one the build lacks refuses with the file's name. ``build``: the id a local
    copy must have (one somebody else copied, KServe's): then its seal is required too.
    """
    location = parse(uri)
    if location.local:
        if build is not None and not (Path(uri) / HASHES).exists():
            raise TritonHFError(f"{uri}: no {HASHES}, so not provably build {build}: refusing to serve it")
        if (Path(uri) / HASHES).exists():
            logger.info("build %s: every file of %s matches its sha256", verify(Path(uri), build), uri)
        else:
            logger.warning("%s has no %s (built by an earlier tritonhf): served unverified", uri, HASHES)
        return uri
    if location.scheme == "pvc":  # mounted into a pod by Kubernetes: serve the mounted path
        return uri
    if location.scheme != "s3":
        logger.warning(
            "%s: NOT VERIFIED. tritonhf reads s3:// only; Triton reads %s:// itself, without checking any hash,"
            " and again each time a model reloads: serve an exact build's prefix that nothing writes into",
            uri,
            location.scheme,
        )
        return uri
    exact = parse(resolve(str(uri)))
    root = builds or Path(tempfile.gettempdir()) / BUILDS
    root.mkdir(parents=True, exist_ok=True)
    serialized = lock(root / ".lock", fcntl.LOCK_EX)
    try:
        HELD.append(lock(root / f"{exact.build}.lock", fcntl.LOCK_SH))
        prune(root, exact.build)
        copy = root / exact.build
        if copy.is_dir():
            try:
                verify(copy, exact.build)
                logger.info("build %s: the verified copy %s, reused", exact.uri, copy)
                return copy
            except TritonHFError as err:
                logger.warning("%s; downloading it again", err)
                shutil.rmtree(copy)
        staging = Path(tempfile.mkdtemp(prefix=f".{exact.build}.", dir=root))
        try:
            download(exact, staging)
            staging.rename(copy)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("build %s: downloaded to %s, every file matches its sha256", exact.uri, copy)
        return copy
    finally:
        serialized.close()


def prune(root: Path, keep: str) -> None:
    """Remove what no server uses: half-done downloads (none runs: we hold the directory's lock), and copies of
    other builds whose lock no running server holds."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)
        elif (
            entry.is_dir()
            and BUILD_ID.match(entry.name)
            and entry.name != keep
            and (held := lock(root / f"{entry.name}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)) is not None
        ):
            shutil.rmtree(entry, ignore_errors=True)
            (root / f"{entry.name}.lock").unlink(missing_ok=True)  # no one waits on it: we hold root's lock
            held.close()
            logger.info("removed the copy of build %s, which no server uses", entry.name)


def download(build: Location, into: Path) -> None:
    """Fetch a complete build, checking each file's sha256 as it arrives, and the record against the build id."""
    client = s3_client(build)
    listed = dict(objects(client, build))
    if MARKER not in listed:
        raise TritonHFError(f"{build.uri}: not a complete build (no {MARKER}): its push is under way or died")
    text = read_object(client, build, HASHES)
    if build_id(text) != build.build:
        raise TritonHFError(f"{build.uri}: {HASHES} is not this build's record (its id is {build_id(text)})")
    hashes = parse_record(text, build.uri)
    check_listing(build.uri, hashes, listed)
    (into / HASHES).write_text(text)

    def fetch(name: str) -> None:
        path = into / name
        path.parent.mkdir(parents=True, exist_ok=True)
        body, digest = client.get_object(Bucket=build.container, Key=build.key(name))["Body"], hashlib.sha256()
        with path.open("wb") as file:
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
                file.write(chunk)
        if (found := digest.hexdigest()) != hashes[name]:
            raise mismatch(build.uri, name, found, hashes[name])

    pool = ThreadPoolExecutor(DOWNLOADS)
    try:  # the first mismatch (or a signal) ends the download: what is queued is not fetched
        for done in as_completed([pool.submit(fetch, name) for name in sorted(hashes)]):
            done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
