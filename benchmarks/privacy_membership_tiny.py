"""Adapter / synthetic-text exposure on a tiny Llama (2 layers, hidden 32, init 0.5) and the conftest
tokenizer: what tests/test_privacy_attacks.py asserts, with more steps and canaries (docs/privacy-attacks.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/privacy_membership_tiny.py STEPS DP_EPSILON   # e.g. 120 1
"""
import json, sys, time
sys.path.insert(0, "tests")
from conftest import make_tokenizer, make_llama
from fedkt.config import LoraSettings
from fedkt.models import add_lora
from fedkt.privacy.membership import MembershipSetting, adapter_exposure_experiment

steps, dp_eps = int(sys.argv[1]), float(sys.argv[2])
tok = make_tokenizer()
m = add_lora(make_llama(tok, layers=2, hidden=32, seed=4, init_range=0.5), LoraSettings(r=8, dropout=0.0))
st = MembershipSetting(n_candidates=1000, steps=steps, lr=3e-2, canaries=3, repeats=8, synthetic=32,
                       synthetic_tokens=24, dp_epsilon=dp_eps)
t0 = time.time()
r = adapter_exposure_experiment(m, tok, st, seed=0)
r["wall_s"] = time.time() - t0
print(json.dumps(r, indent=1))
