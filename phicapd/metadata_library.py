"""Whether pyexiv2, the library behind the ``xmp`` and ``embed`` formats, can be loaded.

On the bottom floor, beside ``config``, so that checking a configuration that asks for those
formats does not import the pipeline.
"""

from __future__ import annotations

from types import ModuleType


class MetadataUnavailable(RuntimeError):
    """pyexiv2 cannot be imported."""


def require_pyexiv2() -> ModuleType:
    """pyexiv2, or ``MetadataUnavailable`` saying how to get it."""
    try:
        import pyexiv2
    except ImportError as e:  # also a wheel whose bundled exiv2 fails to load
        raise MetadataUnavailable(
            f"needs the pyexiv2 package (pip install 'phicapd[metadata]'), which cannot be imported: {e}"
        ) from None
    return pyexiv2
