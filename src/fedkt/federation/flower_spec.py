"""A Flower node's client spec: the :class:`~fedkt.clients.ClientSpec` a SuperNode builds its client from,
as JSON in its node config (``fedkt-client-spec``: the JSON object itself or a path to a file holding it).

This module imports nothing from ``flwr``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fedkt.clients import ClientSpec
from fedkt.config import EvalConfig, LoraSettings, TrainConfig, from_dict
from fedkt.data.tasks import Example
from fedkt.privacy.policy import ClientPolicy

CLIENT_ID_KEY = "fedkt-client-id"
"""Node-config key naming the fedkt client a SuperNode serves."""
SPEC_KEY = "fedkt-client-spec"
"""Node-config key holding the node's ClientSpec: a JSON object (:func:`spec_to_json`) or a path to one."""


def _example_to_dict(e: Any) -> dict[str, Any]:
    d = dataclasses.asdict(e)
    d["choices"] = list(d["choices"])
    return d


def _example_from_dict(d: dict[str, Any]) -> Example:
    return Example(**{**d, "choices": tuple(d.get("choices", ()))})


def spec_to_json(spec: ClientSpec) -> str:
    """The JSON text of a :class:`ClientSpec` (what a node config's ``fedkt-client-spec`` holds)."""
    d = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    for key in ("lora", "train", "eval", "policy"):
        d[key] = dataclasses.asdict(d[key])
    d["examples"] = None if spec.examples is None else [_example_to_dict(e) for e in spec.examples]
    d["eval_sets"] = {k: [_example_to_dict(e) for e in v] for k, v in spec.eval_sets.items()}
    d["workdir"] = None if spec.workdir is None else str(spec.workdir)
    d["data_files"] = [str(f) for f in spec.data_files]
    return json.dumps(d, ensure_ascii=False)


def spec_from_json(text: str) -> ClientSpec:
    """Rebuild a :class:`ClientSpec` from :func:`spec_to_json`'s text; sections are validated like config."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{SPEC_KEY} is not valid JSON ({e}); write it with fedkt.federation."
                         "flower_spec.spec_to_json") from e
    if not isinstance(d, dict):
        raise ValueError(f"{SPEC_KEY} must be a JSON object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(ClientSpec)]
    unknown = sorted(set(d) - set(names))
    if unknown or "cid" not in d or "model" not in d:
        raise ValueError(f"{SPEC_KEY}: unknown keys {unknown} or missing cid/model; allowed keys: "
                         f"{', '.join(names)}")
    for key, cls in (("lora", LoraSettings), ("train", TrainConfig), ("eval", EvalConfig), ("policy", ClientPolicy)):
        if key in d:
            d[key] = from_dict(cls, d[key], prefix=key + ".")
    if d.get("examples") is not None:
        d["examples"] = [_example_from_dict(e) for e in d["examples"]]
    if "eval_sets" in d:
        d["eval_sets"] = {k: [_example_from_dict(e) for e in v] for k, v in d["eval_sets"].items()}
    if d.get("workdir") is not None:
        d["workdir"] = Path(d["workdir"])
    return ClientSpec(**d)


def spec_text(value: Any) -> str:
    """The JSON text of a node config's ``fedkt-client-spec`` value (the JSON itself or a file's path)."""
    text = str(value)
    if text.lstrip().startswith("{"):
        return text
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"node config {SPEC_KEY} = {text!r} is neither a JSON object nor an existing file")
    return path.read_text(encoding="utf-8")
