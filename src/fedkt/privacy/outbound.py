"""The outbound allow-list: every key a client may send, per handler, with the reason it may leave.

A client's reply is a :class:`~fedkt.federation.base.Message`: named tensors, texts and JSON meta. Each
key of it (``tensors.<name>``, ``texts``, ``meta.<dotted path>``) must match an entry of
:data:`ALLOWED` for the handler that produced it (derived from the one declaration of each handler's replies,
:data:`fedkt.reply_schemas.REPLIES`, which the server's reply schemas come from too), and each entry names its
justification:

* ``DP output``: the output of the client's DP mechanism (text-DP prompts);
* ``post-processing of DP output``: computed from a DP output alone (samples of a DP-SGD adapter,
  their parse counts), so it carries the same guarantee;
* ``public``: known to the server already or public by construction (ε it asked for, task tags of a
  public schedule, the DP accountant's figures, which depend only on public settings and n);
* ``declared disclosure``: not covered by a DP guarantee and disclosed on purpose, written down here
  (counts, lengths, local evaluation metrics, FedAvg's training loss);
* ``protected by secure aggregation``: an adapter trained on private data; it leaves only masked and
  summed (SecAgg+), or in the clear where the client's policy allows it (``allow_clear_adapters``).

:func:`check_reply` enforces the list on the client at run time (a reply with an unlisted key is refused
before it is sent). A key declared with a ``policy`` switch (:data:`GATED`; ``meta.correct``:
``policy.allow_per_question``) leaves only where the client's own policy turns that switch on; otherwise
:func:`withhold` removes it from the reply before the check, whatever the handler put there (the reply
leaves without it; the server records the client as lacking that data). ``tests/test_outbound.py`` runs
every method and checks every key of every reply, and that docs/privacy.md's table is
:func:`fedkt.privacy.outbound_table.markdown_table`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any, Iterator

from fedkt.reply_schemas import CATEGORIES, DECLARED, DP, POST, PUBLIC, REPLIES, SECAGG  # noqa: F401  (the categories)

class OutboundViolation(PermissionError):
    """A reply key that is not on the allow-list: the client refuses to send the reply."""


@dataclass(frozen=True)
class Allowed:
    pattern: str
    """``texts``, ``tensors.<fnmatch pattern>`` or ``meta.<dotted path fnmatch pattern>``."""
    category: str
    why: str
    policy: str = ""
    """The client's policy switch (a boolean of ``ClientPolicy``) that must be on for the key to leave; ""
    for none."""


ALLOWED: dict[str, tuple[Allowed, ...]] = {
    r.function: tuple(Allowed(*entry) for k in r.keys for entry in k.allowed()) for r in REPLIES}
"""Handler (``module:function``) -> the keys its replies may hold, derived from
:data:`fedkt.reply_schemas.REPLIES` (the declaration the server's reply schemas are derived from too)."""

GATED: dict[str, dict[str, str]] = {
    r.function: {k.pattern.removeprefix("meta."): k.policy for k in r.keys if k.policy} for r in REPLIES}
"""Handler (``module:function``) -> {top-level meta key: the policy switch that must be on for it to leave}."""


def reply_keys(msg) -> Iterator[str]:
    """Every key of a reply: ``texts`` (when there are any), ``tensors.<name>``, ``meta.<dotted path>``
    (dicts are walked, an empty one holds no key; any other value is a leaf)."""
    if msg.texts:
        yield "texts"
    for name in msg.tensors:
        yield f"tensors.{name}"

    def walk(prefix: str, v: Any) -> Iterator[str]:
        if isinstance(v, dict):  # an empty dict holds no key (e.g. no parse failures)
            for k, x in v.items():
                yield from walk(f"{prefix}.{k}", x)
        else:
            yield prefix

    for k, v in msg.meta.items():
        yield from walk(f"meta.{k}", v)


def unlisted(handler: str, msg) -> list[str]:
    """The keys of ``msg`` that no allow-list entry of ``handler`` covers (all of them for an unknown handler)."""
    allowed = ALLOWED.get(handler, ())
    return [k for k in reply_keys(msg) if not any(fnmatchcase(k, a.pattern) for a in allowed)]


def withheld(handler: str, msg, policy) -> list[str]:
    """The top-level meta keys of ``msg`` that ``policy`` (the client's ``ClientPolicy``) does not let leave:
    those of :data:`GATED` whose switch is off (a switch the policy lacks counts as off)."""
    return [k for k, switch in GATED.get(handler, {}).items()
            if k in msg.meta and getattr(policy, switch, False) is not True]


def withhold(handler: str, msg, policy):
    """``msg`` without the keys :func:`withheld` names (the same object when there are none)."""
    drop = withheld(handler, msg, policy)
    if not drop:
        return msg
    return replace(msg, meta={k: v for k, v in msg.meta.items() if k not in drop})


def check_reply(handler: str, request: str, msg) -> None:
    """Refuse to send a reply holding a key that is not on ``handler``'s allow-list."""
    bad = unlisted(handler, msg)
    if bad:
        raise OutboundViolation(f"the reply to {request} holds {', '.join(bad)}, not on the outbound allow-list "
                                f"of {handler} (fedkt.privacy.outbound.ALLOWED); the client does not send it")
