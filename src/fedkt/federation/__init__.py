"""Transport-agnostic federation: the call interface, payload codec and the in-process runtime."""

from fedkt.federation.base import (AllClientsFailed, ByteLedger, ClientFailure, Delivery, Federation,
                                   Message)

__all__ = ["AllClientsFailed", "ByteLedger", "ClientFailure", "Delivery", "Federation", "Message"]
