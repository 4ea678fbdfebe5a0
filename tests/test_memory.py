"""The one-80 GB-GPU promise, checked on a CPU: every training step at the scripts' defaults and
worst-case lengths peaks at <= 65 GiB of live tensors at Llama-3-8B and Mistral-7B shapes.

tests/tools/memory.py runs the scripts' own train, loss functions and adamw_step on a
fake-tensor model (shapes, no storage). A 32-layer run takes 20-45 s, so the test measures 1 and
2 layers at full width and extrapolates linearly to 32 (memory.extrapolate); a test below checks the
extrapolation on a narrow model against a direct run, and another checks the fake run against
the same run on real tensors. Fake-tensor memory is deterministic: these are exact numbers.
"""

import pytest

import memory

GiB = 2**30


def parameter_count(shape):
    """Parameters of the shape's model at 32 layers, from its config.json (untied head)."""
    c = memory.SHAPES[shape][2]
    h, heads, kv, head_dim = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], \
        c["head_dim"]
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q and o, k and v
    layer = attention + 3 * h * c["intermediate_size"] + 2 * h  # gate, up, down, two norms
    return 2 * c["vocab_size"] * h + c["num_hidden_layers"] * layer + h


def extrapolated(stage, shape):
    trackers = [memory.measure_training(stage, shape, layers) for layers in (1, 2)]
    return memory.extrapolate(*(t.segment_peaks() for t in trackers), 32)


# every stage at Llama-3-8B's shape (its 128K vocabulary makes the head the largest); Mistral-7B
# for SCIR (its paper's model, the largest step) and CREAM (the same path as SFT and the baselines)
STEPS = [(stage, "llama-3-8b") for stage in ("scir", "cream", "sft", "baseline")] + [
    ("scir", "mistral-7b"), ("cream", "mistral-7b")]


@pytest.mark.parametrize("stage, shape", STEPS)
def test_training_step_peaks_at_most_65_gib(stage, shape):
    peak = extrapolated(stage, shape)
    n = parameter_count(shape)
    # weights and gradients in bf16 (2 bytes each), m and v in bf16 (4): MemTracker's categories
    assert abs(peak["params"] - 2 * n) < 2**20 and abs(peak["grads"] - 2 * n) < 2**20
    assert abs(peak["optimizer_state"] - 4 * n) < 2**20
    report = ", ".join(f"{k} {v / GiB:.2f}" for k, v in peak.items())
    assert peak["peak"] <= memory.BUDGET_GIB * GiB, f"{stage} at {shape}, GiB: {report}"


def test_extrapolation_matches_a_direct_run():
    """Segment peaks at 1 and 2 layers predict a 3-layer run of SCIR (two passes and three
    backward calls a micro-batch, the stage whose peak segment changes with depth) to the byte,
    on a narrow model."""
    narrow = memory.NARROW | {"vocab_size": 8192}
    runs = {layers: memory.measure_training("scir", "mistral-7b", layers, lengths=(512, 128, 128),
                                            **narrow) for layers in (1, 2, 3)}
    predicted = memory.extrapolate(runs[1].segment_peaks(), runs[2].segment_peaks(), 3)
    assert predicted == runs[3].peak()


def test_fake_run_counts_what_a_real_run_counts():
    """A SCIR step (two passes, two backward calls, the judge's two-row head) on real random
    weights (CPU, bf16) and on fake tensors: the fake run's mask positions and stand-in values
    change no tensor that is allocated, so every category agrees to the byte."""
    peaks = []
    for fake in (False, True):
        model = memory.build_model("mistral-7b", 2, fake=fake,
                                   **memory.NARROW | {"vocab_size": 8192})
        peaks.append(memory.measure_training("scir", None, model=model, fake=fake,
                                             lengths=(512, 128, 128)).peak())
    real, fake = peaks
    assert real["temporaries"] > 16 * 2**20  # the head's float32 chunk, [512, 8192], is counted
    assert fake == real


def test_sampling_cache_fits_the_card():
    """generate_batch's cache, sized by transformers for an 80 GB card, holds 128 KiB a token
    (K and V, 32 layers, 8 heads of 128, bf16) and stays within 80% of the free memory."""
    for shape in memory.ONE_GPU:
        budget = memory.sampling_budget(shape, total_gib=79.19, context_gib=0.5)
        assert budget["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
        free = 79.19 * GiB - budget["weights"] - 0.5 * GiB
        assert budget["footprint"] <= 0.8 * free
        assert budget["cache_tokens"] > 100_000  # room for a 256-sequence batch of 2,048 tokens


def test_fsdp2_rank_holds_its_shard_of_the_training_state():
    """tests/tools/memory.py --ranks: on rank 0 of 8 (torch's fake process group), FSDP2 leaves
    AdamW's m and v as the rank's shard of every parameter (dim 0 cut in 8, padded) and gathers the
    rest only while it is used: the per-rank rows of the README's 'Several GPUs' table."""
    narrow = memory.NARROW | {"vocab_size": 1024}  # layers outweigh embedding and head
    model = memory.build_model("mistral-7b", 4, **narrow)
    shard_bytes = sum(-(-p.shape[0] // 8) * p[0].numel() * 2 for p in model.parameters())
    whole_bytes = sum(p.numel() * 2 for p in model.parameters())
    with memory.fake_ranks(8):
        peak = memory.measure_training("cream", None, model=model, lengths=(512, 128, 128)).peak()
    blocks = 2 * 512 * len(list(model.parameters()))  # m and v, each rounded to 512-byte blocks
    assert 0 <= peak["optimizer_state"] - 2 * shard_bytes <= blocks
    assert peak["params"] < whole_bytes  # never the whole model at once
    assert peak["params"] > shard_bytes  # the shards, and what is gathered to compute
