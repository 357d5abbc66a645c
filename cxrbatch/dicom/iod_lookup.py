"""highdicom's "is this attribute in that IOD" answered once per question.

highdicom asks its tables of the standard whether an IOD has pixel data or frames each
time it references an image (every presentation-state annotation, every contributing
equipment item, every SR image region) and answers by scanning every attribute of every
module of the IOD, up to 0.9 ms a call: about 4 % of a study's host-side time (issue 37,
docs/performance.md). The answer depends only on the tables highdicom ships, which never
change while a process runs, so it is kept per (attribute, SOP class, excluded paths).

highdicom has no option for this (0.28), so its private lookup is wrapped where it lives:
`does_iod_have_pixel_data` and `is_multiframe_image` call it through their module, and
the two modules that imported it by name get the wrapper too. Where a later highdicom
lacks those names nothing is wrapped and highdicom runs as shipped (slower, never wrong);
tests/test_iod_lookup.py checks the wrapper's answers against highdicom's own.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# Modules that bound highdicom's lookup to their own name at import (highdicom 0.28).
_IMPORTED_BY_NAME = ("highdicom.base", "highdicom.sr.content")


def memoize_iod_lookups() -> bool:
    """Wrap highdicom's IOD attribute lookup in a cache (once per process); False where
    this highdicom has no such function (then nothing is changed)."""
    try:
        tables = importlib.import_module("highdicom._standard_utils")
    except ImportError:
        return False
    original = getattr(tables, "is_attribute_in_iod", None)
    if original is None:
        log.debug("highdicom has no is_attribute_in_iod: its IOD lookups are not cached")
        return False
    if getattr(original, "cxrbatch_memoized", False):
        return True
    memoized = _memoized(original)
    setattr(tables, "is_attribute_in_iod", memoized)  # noqa: B010
    for name in _IMPORTED_BY_NAME:
        module = importlib.import_module(name)
        if getattr(module, "is_attribute_in_iod", None) is original:
            setattr(module, "is_attribute_in_iod", memoized)  # noqa: B010
    return True


def _memoized(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.lru_cache(maxsize=1024)
    def answer(attribute: str, sop_class_uid: str, excluded: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, excluded))

    @functools.wraps(original)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        excluded = None if exclude_path_elements is None else tuple(exclude_path_elements)
        # An unknown SOP class raises KeyError every time: lru_cache keeps no exceptions.
        return answer(str(attribute), str(sop_class_uid), excluded)

    is_attribute_in_iod.cxrbatch_memoized = True  # type: ignore[attr-defined]
    return is_attribute_in_iod
