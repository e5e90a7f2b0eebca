"""The one base of every error DisagFusion raises on purpose.

``except DisagFusionError`` catches what the system reports as a known failure (bad input, a
missing tensor, a stack that is not running) and lets programming errors through. Each
subclass also derives from the builtin it refines (``ValueError``, ``LookupError``, ...), so
code that catches those keeps working. The subclasses live beside what raises them:
``protocol`` (``DecodeError``, ``MissingBlobError``, ``ChecksumError``), ``models.base``
(``SpecError``), ``client``, ``launcher``, ``deployment`` and ``engram``.
"""


class DisagFusionError(Exception):
    """Base class of every error DisagFusion raises on purpose."""
