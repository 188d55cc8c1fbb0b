"""Transport-agnostic federation: the call interface, payload codec and the in-process runtime."""

from fedkt.federation.base import ByteLedger, ClientFailure, Federation, Message
from fedkt.federation.local import ClientContext, LocalFederation

__all__ = ["ByteLedger", "ClientContext", "ClientFailure", "Federation", "LocalFederation", "Message"]
