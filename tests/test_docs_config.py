"""docs/configuration.md is generated from the configs' field docstrings: the committed file must be what
``python -m fedkt.docs_config`` writes, and every key of the experiment's own sections must say what it is."""

import dataclasses
import typing

from fedkt import docs_config
from fedkt.config import ExperimentConfig
from fedkt.derive import DeriveConfig


def test_committed_reference_is_the_generated_one():
    assert docs_config.DOC.read_text() == docs_config.render(), "run `python -m fedkt.docs_config`"
    assert docs_config.main(["--check"]) == 0


def test_every_experiment_and_derive_key_has_a_docstring():
    hints = typing.get_type_hints(ExperimentConfig)
    classes = [ExperimentConfig, DeriveConfig] + [hints[f.name] for f in dataclasses.fields(ExperimentConfig)
                                                  if dataclasses.is_dataclass(hints[f.name])]
    missing = [f"{cls.__name__}.{name}" for cls in classes for name, doc in docs_config.field_docs(cls).items()
               if not doc and not dataclasses.is_dataclass(hints.get(name)) and name != "sections"]
    assert not missing


def test_a_row_shows_default_allowed_values_path_and_docstring(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Toy:
        mode: typing.Literal["a", "b"] = "b"
        """How it goes."""
        where: list[str] = dataclasses.field(default_factory=lambda: ["x"], metadata={"path": True})
        bare: float = 1e-5

    assert docs_config.table(Toy)[2:] == [
        '| `mode` | `"b"` | How it goes. (one of `"a"`, `"b"`) |',
        '| `where` | `["x"]` | (*path*) |',
        "| `bare` | `1e-05` |  |",
    ]
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(docs_config, "DOC", stale)
    assert docs_config.main(["--check"]) == 1
    assert docs_config.main([]) == 0 and stale.read_text() == docs_config.render()
