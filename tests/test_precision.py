"""Devices and precision: ``[model]`` device/dtype per role, their errors, gradient checkpointing, and every
method's whole pipeline in bf16 on tiny models with no fp32 upcast or device mismatch at any module boundary."""

import math

import pytest
import torch

from fedkt import devices, models
from fedkt.config import ConfigError, Placement
from fedkt.registry import load_config
from fedkt.experiment import run_experiment
from test_runs import tiny_config



def test_model_placement_per_role_and_spellings():
    cfg = load_config(None, ['model.dtype="bf16"', 'model.llm_device="cpu"', 'model.llm_dtype="float32"',
                             'model.load_in_4bit="llm"', 'model.device_map="auto"'])
    assert cfg.model.placement("slm") == Placement("auto", "bf16", False, False, "")
    assert cfg.model.placement("llm") == Placement("cpu", "float32", False, True, "auto")
    assert cfg.model.client_fields() == {"device": "auto", "dtype": "bf16", "gradient_checkpointing": False,
                                         "load_in_4bit": False}
    assert load_config(None, []).model.placement("llm") == Placement()  # "auto" everywhere by default
    from fedkt.plan_memory import Options  # the planner reads the same keys

    for value, roles in (("none", []), ("llm", ["llm"]), ("all", ["slm", "llm"])):
        opts = Options.from_config(load_config(None, [f'model.load_in_4bit="{value}"', 'model.llm_dtype="bf16"']))
        assert opts.load_in_4bit == roles and opts.dtype == {"slm": "fp32", "llm": "bf16"}
    assert devices.DTYPES["bfloat16"] is devices.DTYPES["bf16"] is torch.bfloat16  # old spelling kept
    with pytest.raises(ConfigError, match=r"model.device = 'gpu' is not a device; allowed: 'auto', 'cpu', "
                                          r"'cuda', 'cuda:N', 'mps'"):
        load_config(None, ['model.device="gpu"'])
    with pytest.raises(ConfigError, match=r"model.llm_dtype = 'half' is not allowed"):
        load_config(None, ['model.llm_dtype="half"'])
    with pytest.raises(ConfigError, match=r"model.load_in_4bit = True is not allowed; allowed values: 'none'"):
        load_config(None, ["model.load_in_4bit=true"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_unavailable_device_and_dtype_errors_name_the_key():
    cpu = torch.device("cpu")
    assert devices.resolve_device("auto") == cpu or devices._mps_available()
    assert devices.resolve_dtype("auto", cpu) == torch.float32
    with pytest.raises(devices.DeviceError, match=r"model.device = 'cuda:1': cuda requested but "
                                                  r"torch.cuda.is_available\(\) is False"):
        devices.resolve_device("cuda:1")
    with pytest.raises(devices.DeviceError, match=r"model.device = 'gpu' is not a device"):  # a Flower client spec
        devices.resolve_device("gpu")
    with pytest.raises(devices.DeviceError, match=r"model.dtype = 'fp16' on the cpu: fp16 needs a GPU"):
        devices.resolve_dtype("fp16", cpu)
    with pytest.raises(devices.DeviceError, match=r"model.load_in_4bit for the llm: 4-bit \(bitsandbytes\) "
                                                  r"needs a CUDA device"):
        devices.load_kwargs(Placement("cpu", "bf16", load_in_4bit=True), "llm")
    with pytest.raises(devices.DeviceError, match=r"model.device_map = 'auto' spreads the LLM over GPUs"):
        devices.load_kwargs(Placement("cpu", "bf16", device_map="auto"), "llm")
    with pytest.raises(devices.DeviceError, match=r"model.llm_device \(or model.device\) = 'cuda'"):
        devices.load_kwargs(Placement("cuda", "auto"), "llm")


def test_bf16_on_a_cpu_without_bf16_hardware_warns_once(monkeypatch):
    """bf16 is several times faster than fp32 on a CPU with AMX/AVX512-BF16 and many times slower where torch
    emulates it: a bf16 placement on such a CPU warns (once per process), naming the key and the fix."""
    import warnings

    monkeypatch.setattr(devices, "_warned_bf16", False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert devices.cpu_has_native_bf16() is False
    with pytest.warns(UserWarning, match=r'model.llm_dtype \(or model.dtype\) = bf16 on a CPU without bf16 '
                                         r'hardware .* set model.llm_dtype \(or model.dtype\) = "fp32"'):
        devices.load_kwargs(Placement("cpu", "bf16"), "llm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        devices.load_kwargs(Placement("cpu", "bf16"), "slm")  # once per process
        monkeypatch.setattr(devices, "_warned_bf16", False)
        devices.load_kwargs(Placement("cpu", "fp32"), "slm")  # fp32: nothing to say
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
        devices.load_kwargs(Placement("cpu", "bf16"), "slm")  # AMX: bf16 is the fast path


def test_gradient_checkpointing_trains_the_same_adapter(model_dirs, tok):
    """Recomputing activations in backward is an exact memory/compute trade (dropout's RNG is replayed)."""
    from fedkt.config import LoraSettings, TrainConfig
    from fedkt.data.tasks import Example
    from fedkt.train import sft

    ex = [Example(id=str(i), task="arc_easy", question=f"what is {i} plus one?", choices=("a", "b", "c"),
                  answer=i % 3) for i in range(8)]
    cfg = TrainConfig(batch_size=4, epochs=1.0, lr=0.01)
    out = []
    for gc in (False, True):
        lm = models.load_lora_model(str(model_dirs["slm"]), Placement("cpu", "fp32", gradient_checkpointing=gc),
                                    LoraSettings(r=4, dropout=0.1, target_modules=["q_proj", "v_proj"]), seed=3)
        assert lm.model.get_base_model().is_gradient_checkpointing == gc
        stats = sft(lm.model, tok, ex, cfg, seed=5)
        out.append((stats.mean_loss, models.get_adapter_state(lm.model)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k, v in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], v, rtol=1e-5, atol=1e-7)


class BoundaryRecorder:
    """Forward hooks on every module of every model loaded: the dtype and device of each floating tensor
    entering or leaving a module, and of the module's own parameters."""

    def __init__(self):
        self.models, self.bad, self.losses, self.calls, self.adapter_calls = [], [], [], 0, 0

    def attach(self, model):
        self.models.append(model)
        for name, mod in model.named_modules():
            mod.register_forward_pre_hook(self._check(name, "input"), with_kwargs=True)
            mod.register_forward_hook(self._check(name, "output"), with_kwargs=True)

    def _check(self, name, where):
        def tensors(obj):
            if isinstance(obj, torch.Tensor):
                yield obj
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    yield from tensors(o)
            elif isinstance(obj, dict):  # ModelOutput and kwargs
                for o in obj.values():
                    yield from tensors(o)

        def hook(mod, args, kwargs, out=None):
            adapter = ".lora_" in name  # LoRA A/B/dropout: fp32 master weights by design (docs/devices.md)
            self.calls += 1
            self.adapter_calls += adapter
            params = list(mod.parameters(recurse=False))
            dev = params[0].device if params else None
            for t in tensors((args, kwargs) if where == "input" else out):
                if dev is not None and t.device != dev:
                    self.bad.append(f"{name} {where}: {t.device} vs weights on {dev}")
                if t.is_floating_point() and t.dtype != torch.bfloat16 and not adapter:
                    self.bad.append(f"{name} ({type(mod).__name__}) {where}: {t.dtype}")
            for p in params:
                if p.dtype != torch.bfloat16 and not adapter:
                    self.bad.append(f"{name} weight: {p.dtype}")

        if where == "input":
            return lambda mod, args, kwargs: hook(mod, args, kwargs)
        return lambda mod, args, kwargs, out: hook(mod, args, kwargs, out)


def bf16_run(tmp_path, model_dirs, data_dir, monkeypatch, methods):
    rec = BoundaryRecorder()
    add_lora = models.add_lora

    def recording_add_lora(*a, **kw):
        model = add_lora(*a, **kw)
        rec.attach(model)
        return model

    monkeypatch.setattr(models, "add_lora", recording_add_lora)
    from fedkt import train
    from fedkt.algorithms import fedcollm
    from fedkt.privacy import dp_sgd

    loop = train.run_loop

    def recording_loop(*a, **kw):  # every training loop's metric history (SFT, distillation, DP-SGD)
        out = loop(*a, **kw)
        rec.losses += [v for k, vs in out.history.items() if "loss" in k for v in vs]
        return out

    for module in (train, fedcollm, dp_sgd):
        monkeypatch.setattr(module, "run_loop", recording_loop)
    extra = {"model.dtype": '"bf16"', "fedcot.kit_neighbors": 8, "fedcot.rationale_tokens": 6,
             "fedcot.decode_tokens": 6, "fdkt.samples_per_client": 4, "fdkt.sample_tokens": 16,
             "fdkt.dp_batch_size": 8, "fdkt.dp_epochs": 1.0, "fdkt.augment_tokens": 16, "train.max_steps": 2,
             "federation.rounds": 1, "eval.max_new_tokens": 8}
    if "fedcollm" not in methods:
        extra["llm"] = True
    cfg, _ = tiny_config(tmp_path, model_dirs, data_dir, methods, **extra)
    return rec, run_experiment(cfg, tmp_path / "run")


@pytest.mark.parametrize("methods", [
    pytest.param(["zero_shot", "fedavg", "fedprox", "fedcollm"], id="zero_shot-fedavg-fedprox-fedcollm"),
    pytest.param(["standalone", "centralized"], id="standalone-centralized", marks=pytest.mark.slow),
    pytest.param(["fedcot"], id="fedcot", marks=pytest.mark.slow),
    pytest.param(["fdkt"], id="fdkt", marks=pytest.mark.slow),
])
def test_every_method_runs_in_bf16_with_no_fp32_upcast(tmp_path, model_dirs, data_dir, monkeypatch, methods):
    rec, res = bf16_run(tmp_path, model_dirs, data_dir, monkeypatch, methods)
    assert list(res["methods"]) == methods
    assert rec.models and rec.calls > 1000 and rec.adapter_calls > 0
    assert rec.bad == [], f"{len(rec.bad)} fp32 upcasts / device mismatches, e.g. {sorted(set(rec.bad))[:8]}"
    for m in rec.models:  # base weights stayed bf16; the adapter's master weights are fp32
        for name, p in m.named_parameters():
            assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    for name, r in res["methods"].items():
        for acc in (v["acc"] for role in ("slm", "llm") for v in r.get(role, {}).values()):
            assert 0 <= acc <= 1, name
    assert rec.losses and all(math.isfinite(v) for v in rec.losses), rec.losses


def test_the_recorder_catches_an_fp32_upcast(model_dirs):
    """The boundary check can fail: a model whose head was left in fp32 is reported."""
    from fedkt.config import LoraSettings

    rec = BoundaryRecorder()
    lm = models.load_lora_model(str(model_dirs["slm"]), Placement("cpu", "bf16"),
                                LoraSettings(r=4, target_modules=["q_proj"]), seed=0)
    lm.model.get_base_model().lm_head.float()  # the slip: an fp32 head on bf16 hidden states
    rec.attach(lm.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lm.model(input_ids=torch.tensor([[1, 5, 7]]))
    assert rec.adapter_calls > 0
    assert "base_model.model.lm_head weight: torch.float32" in rec.bad


def test_updater_grad_scaling_unscales_before_clipping_and_skips_overflow():
    """The fp16 machinery of the one loop, exercised on the CPU: a scaled step equals the unscaled one
    (clipping sees the true gradient), and a step whose gradient overflowed is skipped."""
    from fedkt.train import Updater

    def run(scaler, x):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4))
        upd = Updater([([w], torch.optim.SGD([w], lr=0.1))], max_grad_norm=0.5, scaler=scaler)
        upd.backward((w * x).sum())
        upd.step()
        return w.detach(), w.grad

    x = torch.tensor([3.0, -4.0, 0.0, 12.0])  # |grad| = 13 > 0.5: clipped to norm 0.5
    plain, _ = run(None, x)
    scaled, grad = run(torch.amp.GradScaler("cpu", init_scale=2.0**10), x)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-7)
    assert grad is None  # cleared after the step
    torch.manual_seed(0)
    start = torch.randn(4)
    skipped, _ = run(torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.tensor([float("inf"), 1, 1, 1]))
    assert torch.equal(skipped, start)
    torch.testing.assert_close(plain, start - 0.1 * x / x.norm() * 0.5, rtol=0, atol=1e-6)
