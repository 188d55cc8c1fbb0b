"""FDKT's wall time against Standalone's, and the two client stages that dominate it (docs/fdkt.md, "Where the
time goes"). Run every mode through the heavy-job queue with one thread.

``run``: ``fedkt run`` with each method's wall and process-CPU seconds printed (``TIMING <method>: ...``);
CPU seconds move less than wall seconds when other jobs share the cores. The scaled-down run of the docs:

  python benchmarks/fdkt_vs_standalone.py run examples/fdkt.toml --out /tmp/fdkt-vs-sa \\
      --set 'methods=["standalone","fdkt"]' --set partition.num_clients=2 --set data.max_train_examples=20 \\
      --set fdkt.samples_per_client=16 --set eval.limit=40 --set model.threads=1

``dp``: one client's DP-SGD (20 ARC-Easy training examples as FDKT's "write a question" examples, ε = 3,
expected batch 16, 3 epochs = 4 steps) on ``builtin:smollm2-slm`` with a fresh LoRA adapter, profiled.

``sample``: one client's template sampling (16 samples over ARC-Easy and OBQA, the example's question/choice
token limits, temperature 1, top-p 0.95) on the same model, profiled, with the cached filler's counts.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time


def _profile(stmt: str, env: dict, top: int) -> None:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runctx(stmt, env, env)
    print(f"wall {time.perf_counter() - t0:.1f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def _slm():
    import torch

    torch.set_num_threads(1)
    from fedkt.config import LoraSettings
    from fedkt.models import add_lora, load_model

    model, tok = load_model("builtin:smollm2-slm")
    return add_lora(model, LoraSettings()), tok


def dp(data_dir: str) -> None:
    from fedkt.algorithms.fdkt.samples import generation_text
    from fedkt.data.collate import make_sft_example
    from fedkt.data.tasks import load_task
    from fedkt.privacy.dp_sgd import DPConfig, dp_train_loop

    model, tok = _slm()
    data = [make_sft_example(tok, *generation_text(e), 256) for e in load_task("arc_easy", "train", data_dir)[:20]]
    print("token lengths", sorted(len(d.input_ids) for d in data))
    import opacus  # noqa: F401  (its import is not DP-SGD's cost)

    cfg = DPConfig(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, epochs=3.0, batch_size=16, lr=1e-3,
                   max_length=256)
    _profile("dp_train_loop(model, data, cfg, seed=0, pad_id=tok.pad_token_id)",
             {"dp_train_loop": dp_train_loop, "model": model, "data": data, "cfg": cfg, "tok": tok}, 20)


def sample() -> None:
    from fedkt.algorithms.fdkt.samples import sampling_plan, synth_prefix
    from fedkt.algorithms.fdkt.template_fill import FillStats, fill_mc_template_cached
    from fedkt.seeds import derive_seed

    model, tok = _slm()
    plan = sampling_plan(["arc_easy", "openbookqa"], 16)
    st = FillStats()
    env = {"f": fill_mc_template_cached, "model": model, "tok": tok, "st": st, "derive_seed": derive_seed,
           "prompts": [synth_prefix(t, l) for t, l in plan], "letters": [l for _, l in plan]}
    _profile("f(model, tok, prompts, letters, 4, 64, 24, 16, 1.0, 0.95, seed_for=lambda t: derive_seed(1, t), "
             "stats=st)", env, 20)
    print(f"forwards {st.forward_calls}, of which prefills/field boundaries {st.prefill_calls}; tokens sampled "
          f"{st.new_tokens}, fed {st.input_tokens}")


def run(args: list[str]) -> None:
    import fedkt.experiment as E

    orig = E.run_method

    def timed(server, name):
        c0, t0 = time.process_time(), time.perf_counter()
        res = orig(server, name)
        print(f"TIMING {name}: wall {time.perf_counter() - t0:.1f} s, cpu {time.process_time() - c0:.1f} s",
              flush=True)
        return res

    E.run_method = timed
    from fedkt.cli import app

    sys.argv = ["fedkt", "run", *args]
    app()


if __name__ == "__main__":
    mode, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if mode == "run":
        run(rest)
    elif mode == "dp":
        dp(rest[0] if rest else "")
    elif mode == "sample":
        sample()
    else:
        sys.exit("usage: fdkt_vs_standalone.py run CONFIG [fedkt run options] | dp [DATA_DIR] | sample")
