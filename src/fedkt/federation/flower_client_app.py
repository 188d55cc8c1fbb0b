"""The client half of the Flower runtime: a ``ClientApp`` serving fedkt's client handlers.

:func:`make_client_app` registers each client handler ``name`` as ``@app.query(name)``, so Flower's own
routing dispatches each message type to the same handler functions ``LocalFederation`` runs. A handler
sees a fedkt :class:`~fedkt.clients.ClientContext` built by a *context factory* from the client id and
the Flower ``Context``; the default, :class:`SpecContextFactory`, builds it from the
:class:`~fedkt.clients.ClientSpec` in the node config (``fedkt-client-spec``,
:mod:`~fedkt.federation.flower_spec`) with ``ClientFactory(share_base=False)`` and caches it for the life
of the process; a node without a spec gets a bare ``ClientContext(cid)`` (handlers that need no model).
Before each call the context's state is restored from a state store (:mod:`~fedkt.federation.flower_state`);
after it, it is stored again, even when the handler raised (as in-process, where the context object keeps
what the handler changed), and ``ctx.save_state()`` writes it to the workdir after a successful call,
exactly as ``LocalFederation`` does. A handler exception goes back as an error reply
(:func:`~fedkt.federation.flower_protocol.error_reply`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedkt.clients import ClientContext, ClientFactory, Handler
from fedkt.federation import flower_codec  # flower_codec sets FLOWER_ENV before importing flwr
from fedkt.federation import flower_secagg
from fedkt.message import Message
from fedkt.federation.flower_protocol import IDENTIFY, SCOPE_SEP, client_id_of, error_reply
from fedkt.federation.flower_spec import SPEC_KEY, spec_from_json, spec_text
from fedkt.federation.flower_state import ContextStateStore, DirStateStore, restore_state
from fedkt.federation.validate import check_request

from flwr.app import Context  # noqa: E402  (after FLOWER_ENV)
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

ContextFactory = Callable[[str, Context], ClientContext]
"""Builds the fedkt client context for client id ``cid`` on this node (may cache across messages)."""


class SpecContextFactory:
    """The default context factory: the node's ClientSpec (node config ``fedkt-client-spec``) built with
    ``ClientFactory(share_base=False)``, once per process and spec (Flower may rebuild the ClientApp per
    message; the in-process engine keeps the process, so the model is loaded once). Without a spec in
    the node config, a bare ``ClientContext(cid)``."""

    def __init__(self) -> None:
        self._factory = ClientFactory(share_base=False)
        self._built: dict[str, ClientContext] = {}

    def __call__(self, cid: str, context: Context) -> ClientContext:
        raw = context.node_config.get(SPEC_KEY)
        if raw is None:
            return ClientContext(cid)
        text = spec_text(raw)
        ctx = self._built.get(text)
        if ctx is None:
            spec = spec_from_json(text)
            if spec.cid != cid:
                raise ValueError(f"node serves client {cid!r} but its {SPEC_KEY} is for client {spec.cid!r}")
            ctx = self._built[text] = self._factory.build(spec)
        return ctx



def make_client_app(handlers: dict[str, Handler], context_factory: ContextFactory | None = None,
                    state_store: ContextStateStore | DirStateStore | None = None,
                    max_bytes: int = flower_codec.DEFAULT_MAX_BYTES) -> ClientApp:
    """A ``ClientApp`` serving ``handlers`` (the same dict ``LocalFederation`` takes).

    ``context_factory(cid, flower_context)`` returns the client's ``ClientContext`` (default: a
    :class:`SpecContextFactory` of this app); its ``state`` is restored from ``state_store`` before each
    call and stored after it. Handler ``name`` answers message type ``"query.<name>"``; an app serving
    several methods whose handler names collide names them ``"<method>__<handler>"`` (the server's
    :class:`FlowerFederation` then takes ``action_prefix="<method>__"``), and each method's client state
    and context are kept apart (``scope``: the factory is called as ``factory(cid, context, method)``).
    Payloads and replies above
    ``max_bytes`` are refused with an error naming the limit. The app also serves secure aggregation
    (``FlowerFederation.aggregate``: a ``train`` function behind Flower's ``secaggplus_mod``).
    """
    for name in handlers:
        if not name.isidentifier() or name.startswith("_fedkt"):
            raise ValueError(f"client handler name {name!r} cannot be a Flower message action: use a "
                             "Python identifier that does not start with '_fedkt'")
    factory = context_factory or SpecContextFactory()
    store = state_store or ContextStateStore()
    app = ClientApp()

    def run_handler(name: str, payload: Message, context: Context) -> Message:
        """Run fedkt handler ``name`` for this node's client: context, state restore/store, checks."""
        handler = handlers.get(name)
        if handler is None:
            raise KeyError(f"this node serves no handler {name!r}; it serves {', '.join(handlers)}")
        check_request(name.split(SCOPE_SEP)[-1], payload)  # an absurd request fails here, clearly
        cid = client_id_of(context)
        scope = name.split(SCOPE_SEP)[0] if SCOPE_SEP in name else ""
        ctx = factory(cid, context, scope) if scope else factory(cid, context)  # type: ignore[call-arg]
        key = f"{cid}/{scope}" if scope else cid
        ctx.state = restore_state(store.load(context, key), ctx, f"the node's {type(store).__name__}")
        try:
            reply = handler(ctx, payload)
        finally:
            store.save(context, key, ctx.state.to_bytes())
        if not isinstance(reply, Message):
            raise TypeError(f"client handler {name!r} returned {type(reply).__name__}, expected a fedkt Message")
        ctx.save_state()
        return reply

    def serve(name: str) -> Callable[[FlMessage, Context], FlMessage]:
        def run(message: FlMessage, context: Context) -> FlMessage:
            try:
                payload = flower_codec.decode(message.content, max_bytes)
                reply = run_handler(name, payload, context)
                return FlMessage(flower_codec.encode(reply, max_bytes), reply_to=message)
            except Exception as e:  # noqa: BLE001 - reported to the server, which applies its policy
                return error_reply(message, e)
        run.__name__ = name
        return run

    for name in handlers:
        app.query(name)(serve(name))

    def errors_as_replies(message: FlMessage, context: Context, call_next: Callable) -> FlMessage:
        try:
            return call_next(message, context)
        except Exception as e:  # noqa: BLE001 - the node drops out of this SecAgg+ round, the server is told
            return error_reply(message, e)

    # secure aggregation (FlowerFederation.aggregate): Flower's SecAgg+ client mod around the handler call
    app.train(mods=[errors_as_replies, *flower_secagg.MODS])(flower_secagg.make_secure_train(run_handler))

    @app.query(IDENTIFY)
    def identify(message: FlMessage, context: Context) -> FlMessage:
        meta = {"client_id": client_id_of(context), "handlers": list(handlers)}
        return FlMessage(flower_codec.encode(Message(meta=meta)), reply_to=message)

    return app
