"""The runtimes' wire codec: :func:`fedkt.message.encode`/:func:`~fedkt.message.decode`, which every runtime
meters with (``len(codec.encode(msg))`` down and up, whatever the transport).

Runtimes call the codec through this module, so a test can record or alter what any runtime sends by
patching ``fedkt.federation.codec.encode`` in one place (tests/test_golden.py does). The format itself is
documented in :mod:`fedkt.message`.
"""

from __future__ import annotations

from fedkt.message import MAGIC, decode, encode

__all__ = ["MAGIC", "decode", "encode"]
