"""Measure what the scripts' own functions cost: training steps, reference scoring, sampling, and CPU ratios.

    python tests/tools/benchmark.py --config tiny        # CPU, < 60 s on 2 cores (tests/test_benchmark.py runs it)
    python tests/tools/benchmark.py --config mistral-7b  # the Mistral-7B-v0.3 architecture, random bf16 weights, one GPU

Prints one JSON line per measurement, then a markdown table. Peak memory is torch.cuda.max_memory_allocated on a
GPU and the process's peak resident set (VmHWM, reset before each measurement) on CPU. Machines are noisy: compare
the ratios measured side by side in one run, not absolute numbers across runs.
"""

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import cream  # noqa: E402
import scir  # noqa: E402

CONFIGS = {
    # Mistral-7B-v0.3's config.json, written out so nothing is downloaded
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                       rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
    # the same vocabulary (what the log-prob comparison is about), a toy body
    "tiny": dict(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False),
}
DEFAULTS = {"mistral-7b": dict(lengths=[1024, 2048], batch_sizes=[64, 256], prompt_tokens=256, new_tokens=256,
                               long_sequence=4096),
            "tiny": dict(lengths=[128, 256], batch_sizes=[8, 16], prompt_tokens=16, new_tokens=16, long_sequence=2048)}
# dense bf16 peak FLOP/s and memory bandwidth (bytes/s) by GPU name
GPUS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def gpu_specs():
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    return next((spec for key, spec in GPUS.items() if key in name), (None, None))


def rss_peak_bytes():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def measure(fn, device):
    """Run fn once; return (seconds, peak bytes during the call, peak bytes above what was there before). On a GPU
    the peak is what tensors held (max_memory_allocated); reserved_bytes() adds what the allocator kept."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = rss_peak_bytes()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak_bytes()
    return seconds, peak, peak - before


def reserved_bytes(device):
    """The caching allocator's peak reservation (GPU): allocated memory plus its fragmentation and free blocks."""
    return torch.cuda.max_memory_reserved() if device.type == "cuda" else None


def report(rows, **row):
    row["peak_gib"] = round(row.pop("peak") / 2**30, 3)
    if row.get("reserved") is not None:
        row["reserved_gib"] = round(row.pop("reserved") / 2**30, 3)
    row.pop("reserved", None)
    print(json.dumps(row), flush=True)
    rows.append(row)


def random_ids(generator, vocab, *shape):
    return torch.randint(3, vocab, shape, generator=generator)


def training_step(model, kind, length, pairs, vocab, state, device, generator):
    """One optimizer step on one micro-batch of `pairs` pairs, as the scripts' defaults run it: CREAM's soft DPO on
    2 sequences a pair; SCIR's Eq. 7 on 2 policy sequences and 4 judge prompts a pair, computed on detached copies
    with one backward per forward pass (scir.backward)."""
    prompt = length // 4
    ids = random_ids(generator, vocab, 2 * pairs, length).to(device)
    attention_mask = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids)
    response_mask[:, prompt:] = 1
    script = cream if kind == "cream" else scir
    logps = script.sequence_logps(model, ids, attention_mask, response_mask).view(pairs, 2)
    ref = logps.detach() - 1.0
    if kind == "cream":
        cream.soft_dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.1, 0.8).mean().backward()
    else:
        judge = [random_ids(generator, vocab, length).tolist() for _ in range(4 * pairs)]
        logits = scir.identifier_logits(model, judge, (3, 4), 0)  # [4 pairs, 2]
        lengths = torch.full((4 * pairs,), float(length - prompt), device=device)
        p_first = scir.judge_probability(logits[:, 0], logits[:, 1], lengths, lengths, 0.02).view(pairs, 4)
        p_grm = torch.stack([p_first[:, 0], 1 - p_first[:, 1], p_first[:, 2], 1 - p_first[:, 3]], 1).mean(1)
        copies = [x.detach().requires_grad_() for x in (logps, p_grm)]
        p_irm = scir.implicit_preference(copies[0][:, 0], copies[0][:, 1], ref[:, 0], ref[:, 1], 0.1)
        loss = scir.scir_loss(copies[0][:, 0], copies[0][:, 1], p_irm, copies[1], ref[:, 0], ref[:, 1],
                              ref[:, 0], ref[:, 1], 0.1, 1.0, 0.7)["loss"].mean()
        scir.backward(model, loss, [((logps,), copies[:1]), ((p_grm,), copies[1:])])
    script.adamw_step([p for p in model.parameters()], state, 1e-6)
    model.zero_grad(set_to_none=True)
    return (2 + (4 if kind == "scir" else 0)) * pairs * length  # tokens through the model


def bench_training(model, cfg, args, device, rows, flops_peak):
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    generator = torch.Generator().manual_seed(0)
    for kind in ("scir", "cream"):
        for length in args.lengths:
            state = {}
            pairs = args.pairs or (cream if kind == "cream" else scir).Args().batch_size  # SCIR 1, CREAM 2
            step = (model, kind, length, pairs, cfg["vocab_size"], state, device, generator)
            training_step(*step)  # creates m and v
            tokens = [0]
            seconds, peak, _ = measure(lambda: tokens.__setitem__(0, training_step(*step)), device)
            tokens_per_s = tokens[0] / seconds
            mfu = 6 * n_params * tokens_per_s / flops_peak if flops_peak else None
            report(rows, measurement=f"{kind} training step", length=length, batch=pairs,
                   tokens_per_s=round(tokens_per_s, 1), seconds=round(seconds, 3), mfu=round(mfu, 3) if mfu else None,
                   peak=peak, reserved=reserved_bytes(device))
            del state
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model.eval()


@torch.no_grad()
def bench_scoring(model, cfg, args, device, rows):
    """Reference scoring, and sequence_logps against a naive full-vocabulary float32 log_softmax + gather."""
    generator = torch.Generator().manual_seed(1)
    length = args.long_sequence
    ids = random_ids(generator, cfg["vocab_size"], 1, length).to(device)
    attention_mask = torch.ones_like(ids)
    response_mask = torch.zeros_like(ids)
    response_mask[:, length // 2:] = 1  # a prompt as long as the response, as in judge-heavy or long-prompt data

    def naive():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.float()  # [1, L, V]
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * response_mask[:, 1:]).sum(-1)

    results = {}
    for name, fn in (("sequence_logps", lambda: cream.sequence_logps(model, ids, attention_mask, response_mask)),
                     ("naive log_softmax", naive)):
        fn()  # warm up
        seconds, peak, extra = measure(fn, device)
        results[name] = extra
        report(rows, measurement=f"reference scoring: {name}", length=length, tokens_per_s=round(length / seconds, 1),
               seconds=round(seconds, 3), extra_gib=round(extra / 2**30, 3), peak=peak)
    ratio = results["naive log_softmax"] / max(1, results["sequence_logps"])
    report(rows, measurement="ratio: naive / sequence_logps memory above the model", length=length,
           ratio=round(ratio, 2), peak=0)


def bench_optimizer(device, rows):
    """Stochastic-rounding AdamW against torch.optim.AdamW on the same bf16 parameters: time ratio."""
    params = [torch.randn(1024, 1024, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    state = {}
    torch_adamw = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    timings = {}
    for name, step in (("stochastic-rounding adamw_step", lambda: cream.adamw_step(params, state, 1e-6)),
                       ("torch.optim.AdamW (bf16, round-to-nearest)", torch_adamw.step)):
        step()  # state allocation
        seconds, peak, _ = measure(lambda: [step() for _ in range(5)], device)
        timings[name] = seconds / 5
        report(rows, measurement=f"optimizer: {name}", seconds=round(seconds / 5, 4), peak=peak,
               parameters=sum(p.numel() for p in params))
    ratio = timings["stochastic-rounding adamw_step"] / timings["torch.optim.AdamW (bf16, round-to-nearest)"]
    report(rows, measurement="ratio: stochastic-rounding / torch AdamW step time", ratio=round(ratio, 3), peak=0)


@torch.no_grad()
def bench_sampling(model, cfg, args, device, rows, bandwidth):
    """N = 4 samples per prompt: continuous batching (generate_batch) against left-padded generate."""
    import logging

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    generator = torch.Generator().manual_seed(2)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    throughput = {}
    warm_up = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    warm_up_prompts = [random_ids(generator, cfg["vocab_size"], 8).tolist()] * 2
    model.generate_batch(inputs=warm_up_prompts, generation_config=warm_up)  # kernels, allocator
    model.generate(input_ids=torch.tensor(warm_up_prompts, device=device), generation_config=warm_up)
    for batch in args.batch_sizes:  # sequences decoded together = prompts x 4
        prompts = [random_ids(generator, cfg["vocab_size"], args.prompt_tokens - (i % 8)).tolist()
                   for i in range(max(1, batch // 4))]
        config = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, num_return_sequences=4,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=2,
                                  pad_token_id=0)

        def continuous():
            out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=cream.cache_config(
                model, len(prompts) * 4, args.prompt_tokens + args.new_tokens))
            return sum(len(o.generated_tokens) for o in out.values())

        def padded():
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            return (model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:] != 0).sum().item()

        for name, fn in (("generate_batch", continuous), ("padded generate", padded)):
            tokens = [0]
            seconds, peak, _ = measure(lambda: tokens.__setitem__(0, fn()), device)
            tokens_per_s = tokens[0] / seconds
            throughput[name, batch] = tokens_per_s
            bound = batch * bandwidth / weight_bytes if bandwidth else None  # one weight read per decode step
            report(rows, measurement=f"sampling: {name}", batch=batch, tokens_per_s=round(tokens_per_s, 1),
                   seconds=round(seconds, 3), decode_bound_share=round(tokens_per_s / bound, 3) if bound else None,
                   peak=peak)
        report(rows, measurement="ratio: generate_batch / padded generate tokens/s", batch=batch,
               ratio=round(throughput["generate_batch", batch] / throughput["padded generate", batch], 3), peak=0)


def print_table(rows):
    columns = ["measurement", "length", "batch", "tokens_per_s", "seconds", "mfu", "decode_bound_share", "ratio",
               "peak_gib", "reserved_gib", "extra_gib"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", help="per-sequence lengths of the training steps")
    parser.add_argument("--batch_sizes", type=int, nargs="+", help="sequences decoded together when sampling")
    parser.add_argument("--pairs", type=int, help="pairs per training micro-batch; default: each script's --batch_size")
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "scoring", "optimizer", "sampling"])
    args = parser.parse_args()
    for key, value in DEFAULTS[args.config].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(MistralConfig(**cfg)).to(dtype)
    flops_peak, bandwidth = gpu_specs()
    rows = []
    print(json.dumps({"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "dtype": str(dtype), "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__,
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    stages = {"scoring": partial(bench_scoring, model, cfg, args, device, rows),
              "optimizer": partial(bench_optimizer, device, rows),
              "sampling": partial(bench_sampling, model, cfg, args, device, rows, bandwidth),
              "training": partial(bench_training, model, cfg, args, device, rows, flops_peak)}
    failed = []
    for name, stage in stages.items():
        if name in args.skip:
            continue
        try:  # a GPU call is one shot: a failed stage must not cost the others' numbers
            stage()
        except Exception as error:  # noqa: BLE001
            failed.append(name)
            print(json.dumps({"stage": name, "error": f"{type(error).__name__}: {error}"[:2000]}), flush=True)
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    if failed:
        sys.exit(f"stages that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
