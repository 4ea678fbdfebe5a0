"""Peak GPU memory of the scripts' training steps, scoring and sampling at 7B/8B shapes, on a CPU.

    python tests/tools/memory.py --shape all                    # both shapes, 32 layers: README's table
    python tests/tools/memory.py --shape llama-3-8b --layers 2  # seconds (test_memory.py extrapolates)
    python tests/tools/memory.py --ranks 8 --stages scir cream  # per rank under FSDP2 (torchrun)

The model is built inside FakeTensorMode: its bf16 weights and every activation have shapes and
dtypes but no storage, so 32 layers cost no memory. The scripts' own `train`, loss functions and
`adamw_step` then run unmodified on real token ids, with activation checkpointing on (train turns
it on), while MemTracker (torch.distributed._tools.mem_tracker) adds up every live tensor, by
category, after each op. A training step is measured in steady state: after one optimizer step (m
and v exist), through a micro-batch that creates the gradients, one that adds into them, and the
next optimizer step. FlopCounterMode counts the FLOPs of one micro-batch in a separate pass.

FakeRun makes the fake run possible and GPU-like:
- a real boolean mask indexing a fake tensor (`hidden[mask]`) would give a data-dependent shape,
  so the mask is replaced by its nonzero() positions;
- `.item()` and `bool()` of a fake tensor return a stand-in (True for a boolean, else 0), so
  train's finiteness checks pass;
- logsumexp is decomposed as ATen computes it, so its hidden float32 [N, V] temporary counts;
- several gradients of one weight (the LM head, once per chunk) are added in place when the
  autograd engine would do so without a Python mode in the way.
The fake device is the CPU: a fake "cuda" tensor cannot go through autograd in a CPU-only build
of torch. Attention then dispatches to _scaled_dot_product_flash_attention_for_cpu, whose outputs
(bf16 output, float32 logsumexp) match those of the CUDA flash kernel. The numbers are bytes of
live tensors, counted in the CUDA caching allocator's 512-byte blocks: what
torch.cuda.max_memory_allocated reports. Not counted: the CUDA context, memory the allocator
reserves but does not hand out (fragmentation), and kernel workspaces (README).
"""

import argparse
import contextlib
import functools
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import tqdm
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools import mem_tracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
import cream  # noqa: E402
import scir  # noqa: E402

GiB = 2**30
aten = torch.ops.aten
# each model's config.json, written out so nothing is downloaded
SHAPES = {
    "mistral-7b": (MistralForCausalLM, MistralConfig, dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)),
    "llama-3-8b": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # only with --ranks: no single 80 GB card holds its training state
    "llama-3-70b": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
ONE_GPU = ("mistral-7b", "llama-3-8b")
# the validation's reduced width: the real vocabulary, a narrow body that a CPU runs in seconds
NARROW = dict(hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64)
BUDGET_GIB = 65  # a training step must fit here: 80 GB less the CUDA context, fragmentation, slack


def build_model(shape, layers=None, fake=True, **overrides):
    """The shape's model in bfloat16 with `layers` decoder layers: fake (no storage) or real."""
    model_class, config_class, config = SHAPES[shape]
    layers = layers or config["num_hidden_layers"]
    config = config_class(**config | overrides | {"num_hidden_layers": layers})
    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(dtype=torch.bfloat16) loads it
        try:
            torch.manual_seed(0)
            model = model_class(config)
        finally:
            torch.set_default_dtype(default)
    return model


class PieceTokenizer:
    """A word, a punctuation mark or a control character is one token, ids given out as pieces are
    first seen: n words are n tokens, and a judge template costs about what BPE charges for it.
    No chat template, so prompts.chat_prompt uses its fallback format. EOS is "\\x02", id 2."""
    PIECES = re.compile(r"[\x00-\x08]|\s*\w+|\s*[^\w\s\x00-\x08]|\s+")
    chat_template, bos_token, bos_token_id, name_or_path = None, None, None, "pieces"
    pad_token, pad_token_id, eos_token, eos_token_id = "\x00", 0, "\x02", 2

    def __init__(self):
        self.pieces = [chr(i) for i in range(9)]
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=self.encode(text))

    def encode(self, text, add_special_tokens=False):
        for piece in self.PIECES.findall(text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
        return [self.ids[piece] for piece in self.PIECES.findall(text)]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


def words(count, letter):
    return " ".join([letter * 7] * count)


def prompt_text(tokenizer, encode, tokens):
    """A prompt whose chat-formatted encoding (the script's `encode`) is `tokens` long."""
    count = tokens - len(encode(tokenizer, "x"))
    while len(encode(tokenizer, words(count, "p"))) != tokens:
        count += tokens - len(encode(tokenizer, words(count, "p")))
    return words(count, "p")


def response(tokenizer, tokens, letter):
    """(text, sampled ids ending in EOS) of a response of `tokens` tokens."""
    text = words(tokens - 1, letter)
    return text, tokenizer.encode(text) + [tokenizer.eos_token_id]


def scir_pairs(tokenizer, count, prompt_tokens, response_tokens, max_length):
    """SCIR's training pairs as run_scir_training builds them (with the baselines' keys)."""
    pairs = []
    for k in range(count):
        pair = {"id": str(k), "prompt": prompt_text(tokenizer, scir.encode, prompt_tokens)}
        for key, letter in (("response_1", "a"), ("response_2", "b")):
            text, ids = response(tokenizer, response_tokens, letter)
            pair[key] = {"response": text, "token_ids": ids, "finished": True}
        pair["sequences"] = scir.pair_sequences(tokenizer, pair, max_length)
        pair |= dict(global_logp_1=-1.0, global_logp_2=-2.0, local_logp_1=-1.5, local_logp_2=-1.5,
                     ref_chosen_logp=-1.0, ref_rejected_logp=-2.0)
        pairs.append(pair)
    return pairs


def cream_pairs(tokenizer, count, prompt_tokens, response_tokens):
    """CREAM's training pairs as run_preference_training builds them."""
    prompt = prompt_text(tokenizer, cream.encode, prompt_tokens)
    prompt_ids = cream.encode(tokenizer, prompt)
    chosen, rejected = (response(tokenizer, response_tokens, letter)[1] for letter in "ab")
    return [{"prompt": prompt, "chosen_sequence": (prompt_ids, chosen),
             "rejected_sequence": (prompt_ids, rejected), "ref_chosen_logp": -1.0,
             "ref_rejected_logp": -2.0, "consistency": 0.8} for _ in range(count)]


def sft_batch(tokenizer, count, prompt_tokens, response_tokens):
    """An SFT micro-batch as run_sft collates it."""
    prompt_ids = cream.encode(tokenizer, prompt_text(tokenizer, cream.encode, prompt_tokens))
    sequence = (prompt_ids, response(tokenizer, response_tokens, "a")[1])
    return cream.collate([sequence] * count, tokenizer.pad_token_id)


def logsumexp_as_aten(x, dim, keepdim=False):
    """aten::logsumexp as ATen computes it (ReduceOps.cpp, logsumexp_out_impl), so that the float32
    temporary x - max, hidden inside the fused op, is allocated and counted as on the GPU."""
    maxes = torch.amax(x, dim, keepdim=True)
    maxes_squeezed = maxes if keepdim else maxes.squeeze(dim)
    maxes_squeezed = maxes_squeezed.masked_fill(maxes_squeezed.abs() == math.inf, 0)
    return torch.sum((x - maxes).exp_(), dim, keepdim=keepdim).log_().add_(maxes_squeezed)


class FakeRun(TorchDispatchMode):
    """Lets the scripts run on fake tensors, and allocates what GPU kernels allocate.

    fake=False keeps only the GPU-like parts (logsumexp, in-place gradient sums), so that a real
    run and a fake run count the same tensors (the validation).
    """
    INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                 aten._index_put_impl_.default)

    def __init__(self, fake=True, model=None):
        super().__init__()
        self.fake = fake
        self.weights = {(p.shape, p.dtype) for p in model.parameters()} if model else set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.logsumexp.default:
            return logsumexp_as_aten(*args, **kwargs)
        if (func is aten.add.Tensor and not kwargs and torch._C._current_graph_task_id() != -1
                and (args[0].shape, args[0].dtype) in self.weights
                and args[1].shape == args[0].shape):
            # Several gradients of one weight in one backward: the engine adds them in place into
            # one that owns its storage (input_buffer.cpp, can_accumulate_inplace), but never
            # while a Python mode or a fake tensor holds a reference. Decide as it does on a GPU.
            for into, other in (args, args[::-1]):
                if into.is_contiguous() and not into._is_view():
                    return into.add_(other)
        if self.fake and func in self.INDEX_OPS and isinstance(args[0], FakeTensor):
            indices = []  # a real boolean mask -> its positions: a shape that needs no data
            for index in args[1]:
                if isinstance(index, FakeTensor) or index is None or index.dtype != torch.bool:
                    indices.append(index)
                else:
                    indices += index.nonzero().unbind(1)
            args = (args[0], indices, *args[2:])
        if (self.fake and func is aten._local_scalar_dense.default
                and isinstance(args[0], FakeTensor)):  # .item(), bool(): isfinite -> True
            return True if args[0].dtype == torch.bool else 0
        return func(*args, **kwargs)


class Tracker(MemTracker):
    """MemTracker fitted to the scripts:

    - a root module may run again in one step (SCIR's policy and judge passes share the decoder);
    - a gradient counts as grads once it is in .grad; a micro-batch's fresh weight gradient that
      is added into an existing .grad is a temporary;
    - adamw_step is tagged (`optimizer_step`): what it allocates is a temporary, except m and v,
      optimizer state once the step ends; the peak restarts after the first step (steady state);
    - only the global peak and each segment's peak are kept (MemTracker's per-module peaks cost
      time quadratic in the layers); a segment is a stretch of forward ops, one backward call, or
      an optimizer step, and `extrapolate` needs their peaks.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.in_step, self.steps = model, False, 0
        self.segments, self._segment = [], None
        self.track_external(model)

    def __enter__(self):
        super().__enter__()
        self._track_module_params_and_buffers(self.model, install_grad_hooks=True)
        for before_accumulation, _ in self._param_to_grad_hook_handles.values():
            before_accumulation.remove()
        return self

    def _track(self, reftype, t):
        super()._track(_MemRefType.TEMP if self.in_step else reftype, t)

    def _update_peak_stats(self, peak_state):
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)
            if self.steps == 0:
                continue
            if (peak_state, self.in_step) != self._segment:
                self._segment = peak_state, self.in_step
                self.segments.append(dict(snap))
            elif self.segments[-1]["Total"] < snap["Total"]:
                self.segments[-1] = dict(snap)

    def _pre_fw_hook(self, module, inputs):
        name = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {name} == {"Global"}):
            del self.memory_tracking[module]  # a new pass at the top level, not a new iteration
        super()._pre_fw_hook(module, inputs)

    def optimizer_step(self, step):
        """`step` (adamw_step) with its allocations tagged."""
        def tagged(params, state, *args, **kwargs):
            self.in_step = True
            try:
                step(params, state, *args, **kwargs)
            finally:
                self.in_step = False
            for key, moments in state.items():
                if isinstance(key, torch.Tensor):
                    for t in moments:
                        self._update_and_maybe_create_winfos(t, _MemRefType.OPT)
            self.steps += 1
            if self.steps == 1:  # steady state from here on: m and v exist
                self._peak_mem_snap = self.get_tracker_snapshot()
                self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}
        return tagged

    def peak(self):
        """The peak, in bytes by category."""
        (snap,) = self.get_tracker_snapshot("peak").values()
        return by_category(snap)

    def segment_peaks(self):
        return [by_category(snap) for snap in self.segments]


CATEGORIES = ("params", "grads", "optimizer_state", "activations", "temporaries")


def by_category(snap):
    get = lambda *kinds: sum(snap.get(kind, 0) for kind in kinds)
    return {"params": get(_MemRefType.PARAM, _MemRefType.BUFFER), "grads": get(_MemRefType.GRAD),
            "optimizer_state": get(_MemRefType.OPT), "activations": get(_MemRefType.ACT),
            "temporaries": get(_MemRefType.TEMP, _MemRefType.OTH), "peak": snap["Total"]}


def extrapolate(one_layer, two_layers, layers):
    """The peak at `layers` layers from the segment peaks (Tracker.segment_peaks) at 1 and 2.

    Within a segment every candidate for the peak grows by the same bytes a layer (its weights,
    gradients, optimizer state and one checkpoint per pass), so a segment's peak is linear in the
    layers. Which segment peaks can change with depth (SCIR's judge checkpoints outweigh its head
    temporaries at 32 layers, not at 2), so each one is extrapolated and the largest is taken.
    """
    assert len(one_layer) == len(two_layers), "one code path, the same segments at any depth"
    lines = [{k: a[k] + (layers - 1) * (b[k] - a[k]) for k in a}
             for a, b in zip(one_layer, two_layers)]
    return max(lines, key=lambda segment: segment["peak"])


@contextlib.contextmanager
def cuda_block_rounding():
    """Count storage in the CUDA caching allocator's 512-byte blocks, as on a GPU."""
    info = mem_tracker._WeakRefInfo
    original = info._calculate_mem_consumed
    info._calculate_mem_consumed = lambda self: math.ceil(self.size * self.element_size / 512) * 512
    try:
        yield
    finally:
        info._calculate_mem_consumed = original


@contextlib.contextmanager
def patched(owner, **attributes):
    """Set attributes for the duration (the scripts look their globals up at call time)."""
    saved = {name: getattr(owner, name) for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def quiet(script):
    """The script with its progress bars off."""
    return patched(script, tqdm=functools.partial(tqdm.tqdm, disable=True))


# --- The stages at the scripts' defaults and worst-case lengths ---
LENGTHS = {"scir": (2048, 1024, 1024), "baseline": (2048, 1024, 1024), "cream": (2048, 1280, 768),
           "sft": (2048, 16, 2032)}  # (max_length, prompt tokens, response tokens)
TRAINING = {"scir": "SCIR step (Eq. 7), 1 pair: 2 policy sequences + 4 judge prompts",
            "baseline": "SCIR baselines' DPO step, 1 pair: 2 sequences",
            "cream": "CREAM soft-DPO step, 2 pairs: 4 sequences",
            "sft": "SFT step (cream.py's batch of 2; scir.py's 1 is smaller): 2 sequences"}
NO_GRAD = {"score": "reference log-probs, no grad: 16 sequences",
           "judge": "SCIR score_pairs, no grad: 16 sequences + 32 judge prompts"}


def training_stage(name, lengths=None, **arg_overrides):
    """(script, loss_fn, micro-batches, args, lr flag) of a training stage at the Args defaults
    (batch_size: SCIR 1 pair, CREAM 2), except grad_accum 2 with 4 micro-batches: an optimizer
    step, a micro-batch that creates the gradients, one that adds into them, and a second step.
    These are the tensors of any step at the default grad_accum."""
    tokenizer = PieceTokenizer()
    max_length, prompt, response_tokens = lengths or LENGTHS[name]
    script = scir if name in ("scir", "baseline") else cream
    args = replace(script.Args(), grad_accum=2, max_length=max_length, **arg_overrides)
    if name == "scir":
        pairs = scir_pairs(tokenizer, args.batch_size, prompt, response_tokens, max_length)
        loss_fn = scir.scir_batch_loss(args, tokenizer, scir.identifier_token_ids(tokenizer),
                                       args.length_reg)
        return scir, loss_fn, [pairs] * 4, args, "lr"
    if name == "baseline":
        pairs = scir_pairs(tokenizer, args.batch_size, prompt, response_tokens, max_length)
        return scir, scir.dpo_batch_loss(args, tokenizer), [pairs] * 4, args, "lr"
    if name == "cream":
        pairs = cream_pairs(tokenizer, args.batch_size, prompt, response_tokens)
        return cream, cream.dpo_batch_loss(args, tokenizer), [pairs] * 4, args, "lr"
    batch = sft_batch(tokenizer, args.batch_size, prompt, response_tokens)
    return cream, cream.sft_loss, [batch] * 4, args, "sft_lr"


def measure_training(name, shape, layers=None, fake=True, lengths=None, model=None,
                     script_args=None, **overrides):
    """The Tracker of a steady-state training step (.peak(): bytes by category); script_args
    overrides Args fields (batch_size), overrides the model's config."""
    model = model or build_model(shape, layers, fake=fake, **overrides)
    script, loss_fn, batches, args, lr_flag = training_stage(name, lengths, **script_args or {})
    tracker = Tracker(model)
    with cuda_block_rounding(), quiet(script), \
            patched(script, adamw_step=tracker.optimizer_step(script.adamw_step)):
        with tracker, FakeRun(fake, model):
            script.train(model, batches, loss_fn, lr_flag, args, name)
    return tracker


def measure_no_grad(name, shape, layers=None, fake=True, lengths=(1024, 1024), model=None,
                    **overrides):
    """The Tracker of no-grad scoring: cream.batched_logps of score_batch_size (16) sequences, or
    scir.score_pairs of score_batch_size // 2 pairs (16 sequences + 32 judge prompts)."""
    model = model or build_model(shape, layers, fake=fake, **overrides)
    tokenizer = PieceTokenizer()
    prompt, response_tokens = lengths
    tracker = Tracker(model)
    with cuda_block_rounding(), quiet(cream), quiet(scir), tracker, FakeRun(fake, model):
        if name == "score":
            args = cream.Args()
            prompt_ids = cream.encode(tokenizer, prompt_text(tokenizer, cream.encode, prompt))
            ids = response(tokenizer, response_tokens, "a")[1]
            cream.batched_logps(model, [(prompt_ids, ids)] * args.score_batch_size,
                                tokenizer.pad_token_id, args.score_batch_size, "score")
        else:
            args = replace(scir.Args(), max_length=prompt + response_tokens)
            pairs = scir_pairs(tokenizer, args.score_batch_size // 2, prompt, response_tokens,
                               args.max_length)
            scir.score_pairs(model, tokenizer, pairs, args, scir.identifier_token_ids(tokenizer),
                             0.0, "judge")
    return tracker


def count_flops(name, shape, layers=None, script_args=None):
    """FLOPs of one micro-batch, forward + recomputation + backward (FlopCounterMode: matmuls and
    attention, attention counted in full, not halved for the causal mask)."""
    model = build_model(shape, layers)
    script, loss_fn, batches, args, lr_flag = training_stage(name, **script_args or {})
    cpu_flash = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     sdpa_backward_flop.__wrapped__}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_flash)
    with quiet(script), patched(script, adamw_step=lambda *a, **k: None), counter, FakeRun():
        script.train(model, batches[:1], loss_fn, lr_flag, args, name)
    return counter.get_total_flops()


def tokens_per_micro_batch(name, script_args=None):
    """Tokens through the model in one micro-batch: sequences, and SCIR's judge prompts."""
    tokenizer = PieceTokenizer()
    _, _, batches, args, _ = training_stage(name, **script_args or {})
    batch = batches[0]
    if name == "sft":
        return int(batch[1].sum())
    if name == "cream":
        return sum(len(p) + len(r) for pair in batch
                   for p, r in (pair["chosen_sequence"], pair["rejected_sequence"]))
    policy = sum(len(p) + len(r) for pair in batch for p, r in pair["sequences"])
    if name == "baseline":
        return policy
    return policy + sum(len(ids) for pair in batch for ids, _ in scir.judge_inputs(
        tokenizer, pair["prompt"], pair["response_1"]["response"], pair["response_2"]["response"],
        args.max_length))


# --- Sampling: generate_batch sizes its paged KV cache from free GPU memory (no cache_config) ---
def sampling_budget(shape, total_gib=79.19, context_gib=0.5):
    """transformers' own sizing of generate_batch's paged cache on an 80 GB GPU (an H100 shows
    torch 79.19 GiB) holding the bf16 model and a CUDA context: the cache is built under
    FakeTensorMode, with the free memory it reads patched in. -> bytes and counts."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import cache as cb_cache
    from transformers.generation.continuous_batching.distributed import DistributedHelper
    from transformers.generation.continuous_batching.initialization import (
        resolve_continuous_batching_config)

    _, config_class, config = SHAPES[shape]
    config = config_class(**config)
    weights = sum(p.numel() for p in build_model(shape).parameters()) * 2
    used = weights + int(context_gib * GiB)  # mem_get_info counts the context as used
    memory = lambda: (torch.device("cuda"), int(total_gib * GiB), weights, used)
    # sampling with temperature and top-p has logit processors: 80% of the free memory
    cb_config = resolve_continuous_batching_config(config, ContinuousBatchingConfig(), None,
                                                   has_logit_processors=True,
                                                   device=torch.device("cuda"))
    handler_class = cb_cache.PagedAttentionMemoryHandler
    handlers, infer = [], handler_class.infer_max_batch_tokens_and_num_sectors
    keep = lambda handler: handlers.append(handler) or infer(handler)
    with patched(cb_cache, get_device_and_memory_breakdown=memory), FakeTensorMode(), \
            patched(handler_class, infer_max_batch_tokens_and_num_sectors=keep):
        cache = cb_cache.PagedAttentionCache(
            config, cb_config, "cpu", DistributedHelper(None, None, {}), dtype=torch.bfloat16,
            model_supports_logits_to_keep=True)
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads \
        * config.head_dim * 2  # K and V, every layer, bf16
    footprint = handlers[0].compute_memory_footprint(cache.max_batch_tokens, cache.num_sectors)
    return {"weights": weights, "kv_cache": cache.cache_tensor.numel(), "footprint": footprint,
            "kv_bytes_per_token": kv_bytes_per_token,
            "cache_tokens": cache.cache_tensor.numel() // kv_bytes_per_token,
            "max_batch_tokens": cache.max_batch_tokens,
            "max_memory_percent": cb_config.max_memory_percent}


# --- CLI ---
@contextlib.contextmanager
def fake_ranks(ranks):
    """Rank 0 of `ranks` processes whose collectives do nothing (torch's fake process group):
    train then shards the model with FSDP2 and takes rank 0's share, as under torchrun, and
    the tracker counts what rank 0 holds, all-gathered layers included."""
    if ranks == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    clip = torch.nn.utils.clip_grad_norm_

    def clip_on_fake_ranks(*args, **kwargs):  # the fake group's all-reduce leaves the global
        clip(*args, **kwargs)                  # norm unwritten: train would read garbage
        return torch.zeros(())

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    torch.nn.utils.clip_grad_norm_ = clip_on_fake_ranks
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        dist.destroy_process_group()


def gib(sizes):
    return {f"{k}_gib": round(v / GiB, 2) for k, v in sizes.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (both models: 32)")
    stages = [*TRAINING, *NO_GRAD, "sampling"]
    parser.add_argument("--stages", nargs="+", default=stages, choices=stages)
    parser.add_argument("--batch_size", type=int, help="pairs (SFT: sequences) per micro-batch "
                        "in the training steps; default: the scripts' Args default (2)")
    parser.add_argument("--ranks", type=int, default=1, help="processes under torchrun: the "
                        "training steps' memory per rank with FSDP2")
    args = parser.parse_args()
    if args.ranks > 1:
        with fake_ranks(args.ranks):
            return ranks_table(args)
    script_args = {"batch_size": args.batch_size} if args.batch_size else {}
    start = time.perf_counter()
    rows, flops = [], []
    for shape in ONE_GPU if args.shape == "all" else [args.shape]:
        for stage in args.stages:
            began = time.perf_counter()
            if stage in TRAINING:
                sizes = measure_training(stage, shape, args.layers, script_args=script_args).peak()
                label = f"{stage} step, batch_size {args.batch_size}" if script_args \
                    else TRAINING[stage]
                row = {"stage": label, "shape": shape, "layers": args.layers} | gib(sizes)
                script = scir if stage in ("scir", "baseline") else cream
                defaults = script.Args()  # a step: batch_size x grad_accum = 32 pairs or sequences
                micro_batches = defaults.batch_size * defaults.grad_accum \
                    // script_args.get("batch_size", defaults.batch_size)
                micro_batch = count_flops(stage, shape, args.layers, script_args)
                tokens = tokens_per_micro_batch(stage, script_args)
                flops.append(row | {"tokens_per_micro_batch": tokens,
                                    "tokens_per_step": micro_batches * tokens,
                                    "tflop_per_micro_batch": round(micro_batch / 1e12, 1),
                                    "tflop_per_step": round(micro_batches * micro_batch / 1e12, 1)})
            elif stage in NO_GRAD:
                sizes = measure_no_grad(stage, shape, args.layers).peak()
                row = {"stage": NO_GRAD[stage], "shape": shape, "layers": args.layers} | gib(sizes)
            else:
                budget = sampling_budget(shape)
                row = {"stage": "sampling (generate_batch): weights + paged KV cache",
                       "shape": shape, "layers": 32} | gib(
                    {"params": budget["weights"], "activations": budget["kv_cache"],
                     "temporaries": budget["footprint"] - budget["kv_cache"],
                     "peak": budget["weights"] + budget["footprint"]}) | {
                    "kv_kib_per_token": budget["kv_bytes_per_token"] / 1024,
                    "cache_tokens": budget["cache_tokens"],
                    "max_batch_tokens": budget["max_batch_tokens"],
                    "share_of_free_memory": budget["max_memory_percent"]}
            row["seconds"] = round(time.perf_counter() - began, 1)
            print(json.dumps(flops[-1] | row if stage in TRAINING else row), flush=True)
            rows.append(row)
    columns = ["stage", "shape", *(f"{c}_gib" for c in CATEGORIES), "peak_gib"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if flops:
        columns = ["stage", "shape", "tokens_per_micro_batch", "tokens_per_step",
                   "tflop_per_micro_batch", "tflop_per_step"]
        print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in flops:
            print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")


def ranks_table(args):
    """The training steps' peak on one of args.ranks ranks under FSDP2 (train shards the model),
    run at the shape's full depth: the gathered layers and the gradients waiting to be
    reduce-scattered do not grow with depth, so extrapolate's lines would overshoot."""
    columns = ["stage", "shape", "ranks", *(f"{c}_gib" for c in CATEGORIES), "peak_gib"]
    rows = []
    for shape in [*SHAPES] if args.shape == "all" else [args.shape]:
        for stage in [s for s in args.stages if s in TRAINING]:
            began = time.perf_counter()
            sizes = measure_training(stage, shape).peak()
            row = {"stage": TRAINING[stage], "shape": shape, "ranks": args.ranks} | gib(sizes)
            print(json.dumps(row | {"seconds": round(time.perf_counter() - began, 1)}), flush=True)
            rows.append(row)
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()
