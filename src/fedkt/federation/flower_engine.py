"""An in-process Flower engine: Flower's simulation engine without Ray, for tests and ``fedkt run``.

:class:`InProcessFlower` runs Flower's simulation engine (``vce.run_api``: the in-memory LinkState,
``InMemoryGrid``, message queues, worker threads) with a thread backend in place of Ray, so
``flwr[simulation]`` is not needed. This uses Flower internals (``flwr.server.superlink.fleet.vce``),
pinned by the ``flower`` extra's exact version.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable
from typing import Any

from fedkt.federation import flower_codec  # noqa: F401  (sets FLOWER_ENV before flwr is imported)
from fedkt.federation.flower_spec import CLIENT_ID_KEY

from flwr.app import Context  # noqa: E402  (after FLOWER_ENV)
from flwr.app import Message as FlMessage  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: E402
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore  # noqa: E402
from flwr.proto.task_pb2 import Task  # noqa: E402  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.fleet.vce.backend import Backend  # noqa: E402
from flwr.server.superlink.fleet.vce.metrics import VceMetrics  # noqa: E402
from flwr.server.superlink.linkstate import LinkStateFactory  # noqa: E402
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord  # noqa: E402
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: E402
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID  # noqa: E402
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.superlink.federation import NoOpFederationManager  # noqa: E402
from flwr.superlink.grid import InMemoryGrid  # noqa: E402


class InProcessFlower:
    """Flower's simulation engine without Ray: nodes in this process, ClientApps on worker threads.

    Builds the in-memory LinkState, registers one node per client id (node config
    ``fedkt-client-id``, ``partition-id``, ``num-partitions``, plus ``node_configs[cid]``), and runs
    ``vce.run_api`` (Flower's message pump: LinkState -> queue -> backend -> LinkState) on a background
    thread with :class:`_ThreadBackend`. :attr:`grid` is an ``InMemoryGrid`` for a ServerApp main loop.
    """

    def __init__(self, client_app: ClientApp, client_ids: list[str], num_workers: int = 1,
                 pull_interval: float = 0.005, node_configs: dict[str, dict[str, Any]] | None = None):
        if len(set(client_ids)) != len(client_ids) or not client_ids:
            raise ValueError(f"client ids must be unique and non-empty, got {client_ids}")
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        state = factory.state()
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
        # Messages built in this process are the ServerApp's (what flwr's run_simulation does too)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID

        mapping = vce_api._register_nodes(len(client_ids), factory)  # node_id -> partition index
        stores: dict[int, Any] = {}
        for node_id, i in mapping.items():
            config = {CLIENT_ID_KEY: client_ids[i], "partition-id": i, "num-partitions": len(client_ids),
                      **(node_configs or {}).get(client_ids[i], {})}
            stores[node_id] = DeprecatedRunInfoStore(node_id, config)
            stores[node_id].register_context(run_id=run.run_id, run=run)
        class EngineGrid(InMemoryGrid):
            """Stamps pushed messages with this engine's run: TaskIdentity, which ``Message()`` reads,
            is process-global, so a message built while another engine was created would be refused."""

            def push_messages(self, messages: Iterable[FlMessage]) -> Iterable[str]:
                messages = list(messages)
                for m in messages:
                    m.metadata.__dict__["_run_id"] = run.run_id
                return super().push_messages(messages)

        self.grid = EngineGrid(state_factory=factory, pull_interval=pull_interval)
        self.grid.set_run(run)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []

        def pump() -> None:
            try:
                vce_api.run_api(lambda: client_app, lambda: _ThreadBackend(num_workers), mapping, factory,
                            stores, self._stop, VceMetrics())
            except BaseException as e:  # noqa: BLE001 - surfaced by close()
                self._errors.append(e)

        self._thread = threading.Thread(target=pump, name="fedkt-flower-engine", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if the engine thread died (so the server does not wait for replies that never come)."""
        if self._errors:
            raise RuntimeError("the in-process Flower engine failed") from self._errors[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.check()


class _ThreadBackend(Backend):
    """Runs the ClientApp directly on Flower's worker threads (Ray's role in flwr's simulation)."""

    def __init__(self, num_workers: int = 1):
        super().__init__({})
        self._n = num_workers
        self._app: ClientApp | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app = app_fn()

    @property
    def num_workers(self) -> int:
        return self._n

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: FlMessage, context: Context) -> tuple[FlMessage, Context]:
        assert self._app is not None, "build() the backend first"
        # a deployed node gets its own deserialised copy of each message; in process the pushed object
        # itself arrives, and a RecordDict shared by several messages (SecAgg+'s setup stage sends one
        # to every node) would be mutated by the first node's mod under the others
        message = copy.deepcopy(message)
        return self._app(message, context), context
