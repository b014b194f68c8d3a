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

Pushing is implemented for S3 (boto3); for gs:// and as:// the vendors' CLIs do
the same copy and the error says which command.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from tritonhf import TritonHFError
from tritonhf.repository import MARKER

SCHEMES = ("s3", "gs", "as", "pvc")
PUSHING = ".tritonhf.pushing"  # beside the manifest while a push is under way
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
    """A repository's files, read-only: their sizes and their text. Local directories and S3."""

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
        client = self.client
        try:
            body = client.get_object(Bucket=self.location.container, Key=self.location.key(relative))["Body"]
        except client.exceptions.NoSuchKey:
            raise TritonHFError(f"{self.location.uri}: no {relative} (not a repository pushed by tritonhf)") from None
        return body.read().decode()

    def objects(self) -> Iterator[tuple[str, int]]:
        """S3: (path relative to the prefix, size) of every object under it."""
        client, location = self.client, self.location
        prefix = f"{location.prefix}/" if location.prefix else ""
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.container, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"][len(prefix) :], item["Size"]


def check_not_pushing(uri: str | Path) -> None:
    """Refuse an s3:// repository that a tritonhf push is writing (or died writing): a mix of two builds."""
    location = parse(uri)
    if location.scheme != "s3":
        return
    client = s3_client(location)
    try:
        client.head_object(Bucket=location.container, Key=location.key(PUSHING))
    except client.exceptions.ClientError as err:
        if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return
        raise TritonHFError(f"{uri}: {err}") from None
    raise TritonHFError(f"{uri}: a push is under way, or died half-way ({PUSHING}): push again, then serve")


def local_files(root: Path) -> list[str]:
    """A local repository's files, relative; a local server's bytecode (__pycache__) is not the repository's."""
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    )


def push(repository: Path, uri: str) -> int:
    """Copy a built repository to object storage, so that build and serve can run on different machines.

    A push replaces everything under the prefix: objects the new repository lacks are
    deleted, so the server never loads a model left over from an earlier build. So it
    refuses a bucket's root, and a prefix holding objects it did not push. The earlier
    manifest goes first and the new one last: ``tritonhf deploy`` reads a prefix only
    when its push completed. Returns the number of files copied.
    """
    location = parse(uri)
    if not (repository / MARKER).exists():
        raise TritonHFError(f"{repository} is not a repository built by tritonhf (no {MARKER})")
    if location.scheme != "s3":
        account, _, container = location.container.partition("/")
        commands = {
            "gs": f"gcloud storage rsync --recursive --delete-unmatched-destination-objects {repository} {uri}",
            "as": f"az storage blob sync --account-name {account} --container {container} --source {repository}"
            f" --destination {location.prefix or '.'}",
        }
        if location.scheme not in commands:
            raise TritonHFError(f"{uri}: not object storage")
        raise TritonHFError(f"tritonhf pushes to s3:// only; for {uri} use: {commands[location.scheme]}")
    if not location.prefix:
        raise TritonHFError(f"{uri}: push under a prefix (s3://bucket/prefix): a push replaces everything under it")
    files = local_files(repository)
    remote = Files(uri)
    client = remote.client
    existing = {key for key, _ in remote.objects()}  # listed before the upload
    if existing and not {MARKER, PUSHING} & existing:
        raise TritonHFError(
            f"{uri} holds objects that tritonhf did not push (no {MARKER}); a push would replace them:"
            " choose another prefix, or remove them first"
        )
    stale = sorted(existing - set(files) - {PUSHING})

    def put(name: str, source: Path) -> None:
        client.upload_file(str(source), location.container, location.key(name))

    put(PUSHING, repository / MARKER)  # a push under way: the next one may replace it, even if this one dies
    if MARKER in existing:  # the earlier manifest must not vouch for the mix of two builds in between
        client.delete_object(Bucket=location.container, Key=location.key(MARKER))
    for name in tqdm([f for f in files if f != MARKER], desc=f"push to {uri}", unit="file"):
        put(name, repository / name)
    for start in range(0, len(stale), 1000):  # S3's bulk delete takes 1000 keys
        keys = [{"Key": location.key(name)} for name in stale[start : start + 1000]]
        failed = client.delete_objects(Bucket=location.container, Delete={"Objects": keys}).get("Errors", [])
        if failed:  # S3 answers 200 and lists the keys it did not delete
            raise TritonHFError(f"{uri}: could not delete {len(failed)} stale objects: {failed[:3]}")
    put(MARKER, repository / MARKER)  # complete
    client.delete_object(Bucket=location.container, Key=location.key(PUSHING))
    return len(files)
