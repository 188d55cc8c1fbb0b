"""The outbound allow-list as docs/privacy.md shows it: one row per (method.handler, key), with the methods
each handler function is registered under (from the registry; hence not in :mod:`fedkt.privacy.outbound`,
which the client side imports)."""

from __future__ import annotations

from fedkt import registry
from fedkt.privacy.outbound import ALLOWED
from fedkt.privacy.policy import handler_key


def methods_of(handler: str) -> list[str]:
    """``method.handler`` names under which a handler function is registered."""
    return [f"{m}.{h}" for m, spec in registry.methods().items() for h, fn in spec.handlers.items()
            if handler_key(fn) == handler]


def markdown_table() -> str:
    """The allow-list as docs/privacy.md shows it: one row per (method.handler, key); a key that leaves only
    where a switch of the client's policy is on says so."""
    rows = ["| Method.handler | Key | Justification | Why it may leave |", "|---|---|---|---|"]
    for handler, entries in ALLOWED.items():
        names = ", ".join(methods_of(handler)) or handler
        for a in entries:
            gate = f"; **withheld unless the client's `policy.{a.policy} = true`**" if a.policy else ""
            rows.append(f"| {names} | `{a.pattern}` | {a.category} | {a.why}{gate} |")
    return "\n".join(rows)
