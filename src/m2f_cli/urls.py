"""Which paths are fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...), and their filesystems.

Any argument with a ``protocol://`` prefix (other than ``file://``) goes through fsspec; everything
else is a local path, handled by inputs/walk.py and outputs/local.py directly. S3 needs
``pip install 'm2f[s3]'`` (s3fs), GCS ``'m2f[gcs]'`` (gcsfs). Credentials and endpoints come from the
usual places (AWS_* and GOOGLE_* variables, ~/.aws, instance roles) or from fsspec's own
configuration, e.g. ``FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000`` for a MinIO or moto server.

Used by the inputs (inputs/remote.py: walking and reading) and the outputs (outputs/remote.py);
fsspec is imported on first use only, so importing this module costs nothing.
"""

from __future__ import annotations

from m2f_cli.errors import RemoteError


def is_url(path: str) -> bool:
    """True for fsspec URLs (s3://b/k, memory://x); False for local paths and file:// URLs."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier() and head.lower() not in ("file", "local")


def local_path(path: str) -> str:
    """file:///a/b -> /a/b; other strings unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def filesystem(url: str):
    """(fsspec filesystem, path without protocol) for url. Raises RemoteError naming the URL."""
    import fsspec
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.partition("://")[0]
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(proto)
        hint = f": pip install 'm2f[{extra}]'" if extra else f" ({e})"
        raise RemoteError(f"{url}: no fsspec backend for {proto}://{hint}") from None
    except (ValueError, OSError) as e:
        raise RemoteError(f"{url}: {e}") from None


def url_for(url: str, path: str) -> str:
    """The URL of fs path `path` on the same filesystem as `url`."""
    return f"{url.partition('://')[0]}://{path}"
