"""In-process simulation of a federation: split the data, build each client from its own spec, run them
behind a :class:`~fedkt.federation.local.LocalFederation`.

This is the only place that sees every client's data at once (it plays the partitioner). The server
gets its auxiliary set and the evaluation sets; each client gets a :class:`~fedkt.clients.ClientSpec`
holding its shard, and the :class:`~fedkt.clients.ClientFactory` builds it (sharing one frozen base
model among all simulated clients).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedkt.algorithms.fdkt import FDKTConfig
from fedkt.algorithms.fedcot import FedCoTConfig
from fedkt.clients import ClientFactory, ClientSpec
from fedkt.config import ConfigError, ExperimentConfig
from fedkt.data.partition import partition, split_aux, subsample
from fedkt.data.prompts import with_format
from fedkt.data.tasks import Example, load_jsonl, load_task
from fedkt.federation.local import LocalFederation
from fedkt.privacy.policy import ClientPolicy
from fedkt.registry import MethodSpec
from fedkt.seeds import derive_seed
from fedkt.server import ServerContext


def content_key(ex: Example) -> tuple:
    """What makes two examples the same question, whatever their task tag or id."""
    return (" ".join(ex.question.split()).lower(), tuple(" ".join(c.split()).lower() for c in ex.choices))


def policy_for_experiment(cfg: ExperimentConfig) -> ClientPolicy:
    """The policy of a simulated client: exactly what the experiment asks (the simulator plays every party
    and trusts itself), so today's experiments run unchanged. Never used by a deployed client."""
    eps_cot = [*cfg.section(FedCoTConfig).client_epsilons, cfg.section(FedCoTConfig).epsilon]
    fd = cfg.section(FDKTConfig)
    eps_fdkt = [*fd.client_epsilons, fd.epsilon]
    finite = [e for e in eps_cot + eps_fdkt if math.isfinite(e)]
    token_cap = max([e for e in eps_cot if math.isfinite(e)] or finite or [10.0])
    if cfg.section(FedCoTConfig).mechanism == "adaptive":
        # the adaptive mechanism spends ε·n̄ on every prompt, so a short prompt's tokens get more than ε each:
        # the experiment asks for that (a deployed client sets its own fedcot_max_token_epsilon)
        token_cap = math.inf
    # per-question correctness for the paired statistics whenever the experiment records them (a deployed
    # client's own policy withholds it by default: policy.allow_per_question)
    return ClientPolicy(allowed_methods=list(cfg.methods), allow_per_question=cfg.eval.per_question,
                        allow_infinite_epsilon=any(math.isinf(e) for e in eps_cot + eps_fdkt),
                        fedcot_max_token_epsilon=token_cap,
                        fdkt_max_epsilon=max([e for e in eps_fdkt if math.isfinite(e)] or finite or [10.0]),
                        fdkt_max_delta=fd.delta, allow_clear_adapters=True, max_epochs=math.inf,
                        max_steps=2**62, max_new_tokens=2**62, max_samples=2**62)


def load_client_data(cfg: ExperimentConfig) -> tuple[list[list[Example]], list[Example]]:
    """Clients' private training sets and the server's auxiliary set (disjoint, seeded), in the prompt
    format of ``eval.format``."""
    clients, aux = _load_client_data(cfg)
    return [with_format(c, cfg.eval) for c in clients], with_format(aux, cfg.eval)


def _load_client_data(cfg: ExperimentConfig) -> tuple[list[list[Example]], list[Example]]:
    d, p = cfg.data, cfg.partition
    if p.scheme == "files":
        clients = [load_jsonl(f, task=d.tasks[0] if d.tasks else "custom", on_bad_line=d.on_bad_line)
                   for f in p.files]
        aux: list[Example] = []
        if p.aux_size:
            # the server's public set comes from the tasks' train splits, minus anything a client holds
            # (compared by content: client rows carry their file's ids and the first task's tag)
            held = {content_key(e) for c in clients for e in c}
            candidates = [e for t in d.tasks for e in load_task(t, d.train_split, d.dir, d.on_bad_line)
                          if content_key(e) not in held]
            if len(candidates) < p.aux_size:
                raise ConfigError(f"partition.aux_size = {p.aux_size} but only {len(candidates)} examples of "
                                  f"data.tasks are not held by a client; lower partition.aux_size")
            aux = subsample(candidates, p.aux_size, derive_seed(cfg.seed, "aux"))
        return clients, aux
    pooled: list[Example] = []
    for t in d.tasks:
        rows = load_task(t, d.train_split, d.dir, d.on_bad_line)
        pooled += subsample(rows, d.max_train_examples, derive_seed(cfg.seed, "train", t))
    rest, aux = split_aux(pooled, p.aux_size, derive_seed(cfg.seed, "aux"))
    return partition(rest, p.num_clients, p.scheme, derive_seed(cfg.seed, "partition"), p.alpha, p.key), aux


def load_eval_sets(cfg: ExperimentConfig) -> dict[str, list[Example]]:
    """{task: its seeded eval subsample} in the prompt format of ``eval.format``."""
    return {t: with_format(subsample(load_task(t, cfg.data.eval_split, cfg.data.dir, cfg.data.on_bad_line),
                                     cfg.eval.limit, derive_seed(cfg.seed, "eval", t)), cfg.eval)
            for t in cfg.eval_tasks}


class Simulation:
    """The clients of one run, simulated in this process."""

    def __init__(self, cfg: ExperimentConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.clients_data, self.aux = load_client_data(cfg)
        self.eval_sets = load_eval_sets(cfg)
        self.factory = ClientFactory(share_base=True)

    def client_spec(self, i: int, method: str) -> ClientSpec:
        cfg = self.cfg
        cid = f"client{i}"
        return ClientSpec(cid=cid, model=cfg.model.slm, **cfg.model.client_fields(), lora=cfg.lora, train=cfg.train,
                          eval=cfg.eval, seed=cfg.seed, examples=self.clients_data[i], eval_sets=self.eval_sets,
                          workdir=self.out / "clients" / cid / method, policy=policy_for_experiment(cfg),
                          simulation=True)

    def federation(self, method: MethodSpec) -> LocalFederation:
        """Fresh clients (fresh state) for ``method``, answering its handlers."""
        contexts = [self.factory.build(self.client_spec(i, method.name)) for i in range(len(self.clients_data))]
        return LocalFederation(contexts, method.handlers, on_failure=self.cfg.federation.on_client_failure,
                               min_clients=self.cfg.federation.min_clients)

    def server(self) -> ServerContext:
        return ServerContext(cfg=self.cfg, out=self.out, open_federation=self.federation, aux=self.aux,
                             eval_sets=self.eval_sets,
                             pooled_client_data=lambda: [e for c in self.clients_data for e in c])

    def data_summary(self) -> dict:
        return {"clients": [len(c) for c in self.clients_data], "aux": len(self.aux),
                "eval": {t: len(e) for t, e in self.eval_sets.items()},
                "format": {t: self.cfg.eval.format_of(t) for t in self.eval_sets}}
