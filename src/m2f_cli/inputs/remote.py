"""Remote inputs through fsspec: walking a URL (folder, object or glob) and reading one object.

Which arguments are URLs, and where their backends and credentials come from: urls.py. Walking
follows the naming rule of walk.py; read_bytes also reads local files, so a decoder needs one call.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from m2f_cli.urls import filesystem, is_url, local_path, url_for


def read_bytes(path: str) -> bytes:
    """A whole input file, local or remote (DataLoader workers call this; fsspec makes a fresh
    filesystem object per process)."""
    if not is_url(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def walk_url(url: str, is_image: Callable[[str], bool], exclude: Optional[str] = None
             ) -> Iterator[tuple[str, str, Optional[str]]]:
    """(url, name, error) for the images at url: a folder (listed recursively, hidden names skipped,
    sorted like a local walk), a single object, or a glob pattern. Names follow walk.py's rule:
    relative to a folder argument, otherwise the path without the protocol."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    skip = filesystem(exclude)[1].rstrip("/") + "/" if exclude and is_url(exclude) else None
    if any(c in root for c in "*?["):
        matches = fs.glob(root, detail=True)  # one listing, with each match's type
        if not matches:
            raise FileNotFoundError(f"{url}: no object matches this pattern")
        for m in sorted(matches):
            if matches[m]["type"] == "directory":
                yield from _walk_dir(fs, url, m, is_image, skip)
            elif is_image(m):
                yield url_for(url, m), m.lstrip("/"), None
        return
    if fs.isdir(root):
        yield from _walk_dir(fs, url, root, is_image, skip)
    elif fs.isfile(root):
        yield url_for(url, root), root.lstrip("/"), None
    else:
        raise FileNotFoundError(f"{url}: no such object or folder")


def _walk_dir(fs, url: str, root: str, is_image, skip: Optional[str]):
    found = []
    for key in fs.find(root):
        if skip and (key + "/").startswith(skip):
            continue
        rel = key[len(root):].lstrip("/")
        parts = rel.split("/")
        if not rel or any(p.startswith(".") for p in parts) or not is_image(parts[-1]):
            continue
        found.append((tuple(parts), key, rel))
    for _, key, rel in sorted(found):
        yield url_for(url, key), rel, None
