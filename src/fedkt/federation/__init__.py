"""Transport-agnostic federation: the call interface, payload codec and the in-process runtime."""

from fedkt.federation.base import (Aggregate, AllClientsFailed, ByteLedger, ClientFailure, Delivery, Federation,
                                   Message, weighted_mean)

__all__ = ["Aggregate", "AllClientsFailed", "ByteLedger", "ClientFailure", "Delivery", "Federation", "Message",
           "weighted_mean"]
