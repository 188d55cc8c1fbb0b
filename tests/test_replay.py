"""The replay attack (issue 19, item 4): a server that knows the simulation seed reproduces a client's
text-DP perturbation exactly and reads tokens back; a deployed client's CSPRNG defeats it (chance)."""

import math

import pytest

from fedkt.clients import ClientContext
from fedkt.privacy.replay import chance_match, replay_recovery, token_match
from fedkt.privacy.text_dp import EmbeddingKit, perturb_batch
from fedkt.seeds import derive_seed

EPS = 3.0


@pytest.fixture(scope="module")
def setup(tok, model_dirs):
    from fedkt.algorithms.fedcot import render_question
    from fedkt.data.tasks import Example
    from fedkt.models import load_model

    model, mtok = load_model(str(model_dirs["slm"]))
    kit = EmbeddingKit.build(model.get_input_embeddings().weight.detach(), mtok, n_neighbors=8)
    from conftest import MC_ROWS

    prompts = [render_question(Example("arc_easy", f"q{i}", f"{q} ({i})", tuple(ch), 0, ch[0]))
               for i, (q, ch, _) in enumerate(MC_ROWS * 4)]
    return kit, mtok, prompts


def run(kit, tok, prompts, seed):
    return perturb_batch(prompts, kit, tok, EPS, seed=seed)


def test_replay_works_with_the_simulation_seed_and_not_with_the_csprng(setup):
    kit, tok, prompts = setup
    original = [x for r in perturb_batch(prompts, kit, tok, math.inf, seed=0) for x in r.token_ids]
    # what the server computes from the experiment seed it holds and the client's id
    server_seed = derive_seed(derive_seed(7, "secret", "client0"), "textdp")
    server_replay = run(kit, tok, prompts, server_seed)

    sim = ClientContext("client0", seed=7, simulation=True)
    sim_out = run(kit, tok, prompts, sim.secret_rng("textdp"))
    dep = ClientContext("client0", seed=7)  # a deployed client: no pinned seed -> the OS CSPRNG
    assert dep.randomness == "csprng" and sim.randomness == "simulation"
    dep_out = run(kit, tok, prompts, dep.secret_rng("textdp"))

    ids = lambda rs: [r.token_ids for r in rs]  # noqa: E731
    sim_match, dep_match = token_match(ids(sim_out), ids(server_replay)), token_match(ids(dep_out), ids(server_replay))
    chance = chance_match(kit, original, EPS)
    n = len(original)
    sd = math.sqrt(chance * (1 - chance) / n)
    flat = lambda rs: [x for r in rs for x in r.token_ids]  # noqa: E731
    sim_attack = replay_recovery(kit, EPS, server_seed, original, flat(sim_out))
    dep_attack = replay_recovery(kit, EPS, server_seed, original, flat(dep_out))
    changed = sum(a != b for a, b in zip(original, flat(sim_out))) / n
    print(f"\nreplay at ε = {EPS} per token over {n} tokens ({len(prompts)} prompts; {100 * changed:.1f}% changed):"
          f"\n  simulation seed: token match {sim_match:.4f}, replay recovery {sim_attack}"
          f"\n  CSPRNG client:   token match {dep_match:.4f} (chance {chance:.4f} ± {sd:.4f}), "
          f"replay recovery {dep_attack}")
    assert sim_match == 1.0  # the server reproduces the perturbation exactly
    assert changed > 0.3  # ...of a perturbation that did change most tokens
    assert abs(dep_match - chance) < 5 * sd + 1e-9 and dep_match < 0.5  # only chance agreement
    # the replay recovers the original tokens that a CSPRNG client's perturbation hides
    assert sim_attack["consistent"] == 1.0 and sim_attack["recovered"] > 2 * dep_attack["recovered"]
    assert sim_attack["recovered"] > 1 - changed  # better than guessing "the token was kept"


def test_pinned_secret_is_reproducible_by_its_holder_only(setup):
    kit, tok, prompts = setup
    secret = "00112233445566778899aabbccddeeff"
    a = ClientContext("client0", secret_seed=secret)
    assert a.randomness == "secret_seed"
    one = [r.token_ids for r in run(kit, tok, prompts, a.secret_rng("textdp"))]
    two = [r.token_ids for r in run(kit, tok, prompts, ClientContext("client0", secret_seed=secret).secret_rng("textdp"))]
    other = [r.token_ids for r in run(kit, tok, prompts, ClientContext("client0", secret_seed=secret[:-1] + "0")
                                      .secret_rng("textdp"))]
    assert one == two and token_match(one, other) < 0.5
    with pytest.raises(ValueError, match=r"secret_seed = 12345 has 14 bits \(< 64\)"):
        ClientContext("client0", secret_seed=12345).secret_rng("textdp")
