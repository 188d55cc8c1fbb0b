import pytest

from fedkt.algorithms.fedcot import FedCoTConfig
from fedkt.config import ConfigError
from fedkt.registry import load_config


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_override(tmp_path):
    cfg = load_config(write(tmp_path, 'name = "x"\n[train]\nlr = 0.001\n'), ["train.batch_size=4", "eval.limit=10",
                                                                              'model.slm="some/dir"'])
    assert cfg.train.lr == 0.001 and cfg.train.batch_size == 4 and cfg.eval.limit == 10
    assert cfg.model.slm == "some/dir"
    assert cfg.eval_tasks == ["arc_easy"]


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr in \[train\]; allowed keys: lr, epochs"):
        load_config(write(tmp_path, "[train]\nlrr = 1\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key trian in the top level"):
        load_config(write(tmp_path, "[trian]\nlr = 1\n"))


def test_bad_enum_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"partition.scheme = 'random' is not allowed; allowed values: 'iid', 'dirichlet', 'files'"):
        load_config(write(tmp_path, '[partition]\nscheme = "random"\n'))


def test_bad_method_and_task(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\[1\] = 'fedfoo' is not a method; allowed values: zero_shot"):
        load_config(write(tmp_path, 'methods = ["fedavg", "fedfoo"]\n'))
    with pytest.raises(ConfigError, match=r"data.tasks\[0\] = 'mmlu' is not a task"):
        load_config(write(tmp_path, '[data]\ntasks = ["mmlu"]\n'))


def test_type_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size must be an integer, got 'eight'"):
        load_config(None, ['train.batch_size="eight"'])
    with pytest.raises(ConfigError, match=r"train.batch_size must be > 0"):
        load_config(None, ["train.batch_size=0"])


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="method 'fedcollm' needs a server LLM: set model.llm"):
        load_config(None, ['methods=["fedcollm"]'])
    with pytest.raises(ConfigError, match="partition.files lists 1 files but partition.num_clients = 4"):
        load_config(None, ['partition.scheme="files"', 'partition.files=["a.jsonl"]'])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_examples_parse():
    from pathlib import Path

    from fedkt.config import load_section
    from fedkt.derive import DEFAULT_SLM, DeriveConfig

    for p in sorted((Path(__file__).parent.parent / "examples").glob("*.toml")):
        if p.name.startswith("derive_"):
            continue
        load_config(p)
    # the shipped recipe of builtin:smollm2-slm is the one in the code
    assert load_section(DeriveConfig, Path(__file__).parent.parent / "examples" / "derive_smollm2_slm.toml",
                        "derive") == DEFAULT_SLM


def test_section_file_without_its_table_is_an_error_not_the_defaults(tmp_path):
    from fedkt.config import load_section
    from fedkt.derive import DeriveConfig

    p = tmp_path / "d.toml"
    p.write_text("num_layers = 16\nsteps = 5\n")  # the [derive] line forgotten
    with pytest.raises(ConfigError, match=r"no \[derive\] table \(found top-level keys num_layers, steps"):
        load_section(DeriveConfig, p, "derive")
    p.write_text("[derive]\nnum_layers = 16\nsteps = 5\n")
    cfg = load_section(DeriveConfig, p, "derive", ["lr=0.01"])
    assert (cfg.num_layers, cfg.steps, cfg.lr) == (16, 5, 0.01)
    assert load_section(DeriveConfig, None, "derive").num_layers == DeriveConfig().num_layers


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    """A config runs from any directory: its relative data/model paths are the file's, not the cwd's;
    ``--set`` values stay relative to the cwd; ``builtin:``/``hf:``/``openai:`` specs are untouched."""
    conf = tmp_path / "proj" / "conf"
    conf.mkdir(parents=True)
    p = conf / "exp.toml"
    p.write_text('methods = ["zero_shot", "fedcot"]\n'
                 '[model]\nslm = "../models/slm"\nllm = "builtin:smollm2-135m"\n'
                 '[data]\ndir = "../data"\n'
                 '[partition]\nscheme = "files"\nnum_clients = 2\nfiles = ["a.jsonl", "/abs/b.jsonl"]\n'
                 '[fedcot]\nkit_model = "openai:http://127.0.0.1:1/v1#m"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(p)
    assert cfg.model.slm == str(tmp_path / "proj" / "models" / "slm")
    assert cfg.model.llm == "builtin:smollm2-135m"
    assert cfg.data.dir == str(tmp_path / "proj" / "data")
    assert cfg.partition.files == [str(conf / "a.jsonl"), "/abs/b.jsonl"]
    assert cfg.section(FedCoTConfig).kit_model == "openai:http://127.0.0.1:1/v1#m"
    cfg = load_config(p, ['data.dir="rel/data"', 'fedcot.kit_model="kit/model"'])
    assert cfg.data.dir == "rel/data"  # --set: relative to the working directory, as typed
    assert cfg.section(FedCoTConfig).kit_model == "kit/model"


def test_examples_run_from_another_directory(tmp_path, monkeypatch):
    """The shipped examples name ../shared/assets/data relative to examples/: the same directory from
    any working directory; a missing data file is reported with the resolved path."""
    from pathlib import Path

    from fedkt.data.tasks import DataError, load_task

    examples = Path(__file__).resolve().parent.parent / "examples"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(examples / "fedcot.toml")
    assert Path(cfg.data.dir) == (examples.parent.parent / "shared" / "assets" / "data").resolve()
    bad = tmp_path / "c.toml"
    bad.write_text('[data]\ndir = "no/such/dir"\n')
    cfg = load_config(bad)
    with pytest.raises(DataError, match=str(tmp_path / "no" / "such" / "dir" / "arc_easy")):
        load_task("arc_easy", "train", cfg.data.dir)


def test_derive_section_paths_resolve_against_its_file(tmp_path):
    from fedkt.config import load_section
    from fedkt.derive import DeriveConfig

    p = tmp_path / "d.toml"
    p.write_text('[derive]\nparent = "models/llm"\nout = "out/slm"\ndata_dir = "data"\n')
    cfg = load_section(DeriveConfig, p, "derive", ['data_dir="x"'])
    assert (cfg.parent, cfg.out, cfg.data_dir) == (str(tmp_path / "models" / "llm"), str(tmp_path / "out" / "slm"), "x")


def test_config_loading_knows_only_the_methods_it_is_given():
    from dataclasses import dataclass
    from types import SimpleNamespace

    from fedkt.config import load_experiment

    @dataclass
    class MineConfig:
        k: int = 1

    @dataclass
    class OtherConfig:
        k: int = 7

    methods = {"mine": SimpleNamespace(config=MineConfig, needs_llm=False)}
    cfg = load_experiment(None, ['methods=["mine"]', "mine.k=5"], methods)
    assert cfg.section(MineConfig) == MineConfig(k=5) and cfg.to_dict()["mine"] == {"k": 5}
    assert cfg.section(OtherConfig) == OtherConfig(k=7)  # a section the config does not hold: its defaults
    with pytest.raises(TypeError, match=r"section\(\) takes the section's config class"):
        cfg.section("mine")
    with pytest.raises(ConfigError, match=r"methods\[0\] = 'fedavg' is not a method; allowed values: mine"):
        load_experiment(None, ['methods=["fedavg"]'], methods)
    with pytest.raises(ConfigError, match=r"unknown key fedcollm in the top level; allowed keys: .*, mine$"):
        load_experiment(None, ["fedcollm.kd_steps=1"], methods)
