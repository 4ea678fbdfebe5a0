"""One script's `train` on fixed micro-batches, in one process or under torchrun: the weights after
it are written to --out (rank 0). tests/test_distributed.py compares the two.

    python tests/tools/distributed_step.py --script cream --loss dpo --out one.pt
    torchrun --nproc_per_node 2 tests/tools/distributed_step.py --script cream --loss dpo --out two.pt
    torchrun ... --unsynced   # each rank trains its own copy, no gradient exchange (CREAM's
                              # official code; README, 'Defects of public implementations':
                              # CREAM #1): must NOT match one process
    ... --script scir --loss scir --work DIR   # Eq. 7 on scir.py's demo model and tokenizer
"""

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import cream  # noqa: E402
import scir  # noqa: E402

VOCAB = 64


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def sequences(generator, count):
    """(prompt_ids, response_ids) of random lengths, fixed by the generator."""
    out = []
    for _ in range(count):
        prompt, response = (int(torch.randint(2, 9, (), generator=generator)) for _ in "pr")
        ids = torch.randint(3, VOCAB, (prompt + response,), generator=generator).tolist()
        out.append((ids[:prompt], ids[prompt:]))
    return out


def batches(script, loss, count):
    """count micro-batches of 2 sequences (SFT) or 1 pair (DPO), and the loss_fn for them."""
    generator = torch.Generator().manual_seed(1)
    args = SimpleNamespace(beta=0.1)
    tokenizer = SimpleNamespace(pad_token_id=0)
    if loss == "sft":
        return [script.collate(sequences(generator, 2), 0) for _ in range(count)], script.sft_loss
    pairs = []
    for _ in range(count):
        chosen, rejected = sequences(generator, 2)
        pairs.append([{"chosen_sequence": chosen, "rejected_sequence": rejected,
                       "ref_chosen_logp": -20.0 * float(torch.rand((), generator=generator)),
                       "ref_rejected_logp": -20.0 * float(torch.rand((), generator=generator)),
                       "consistency": 0.8}])
    return pairs, script.dpo_batch_loss(args, tokenizer)


def scir_batches(count, work):
    """count micro-batches of 1 pair for Eq. 7, on scir.py's demo model -> (model, batches,
    loss_fn)."""
    from transformers import AutoModelForCausalLM

    import prompts

    model_dir, _ = scir.build_demo(Path(work))
    tokenizer = scir.load_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for k in range(count):
        prompt, good, bad = scir.DEMO_DATA[k]
        pair = {"prompt": prompt}
        for key, text in (("response_1", good), ("response_2", bad)):
            pair[key] = {"response": text, "token_ids": scir.encode(tokenizer, prompt, text)[1]}
        pair["sequences"] = scir.pair_sequences(tokenizer, pair, 640)
        for key in ("global_logp_1", "global_logp_2", "local_logp_1", "local_logp_2"):
            pair[key] = -40.0 * float(torch.rand((), generator=generator))
        batches.append([pair])
    args = SimpleNamespace(max_length=640, beta=0.1, alpha=1.0, tau=0.7, single_judge_prompt=False,
                           no_consistency_loss=False, no_dcpo=False, no_adaptive_reference=False)
    loss_fn = scir.scir_batch_loss(args, tokenizer, prompts.identifier_token_ids(tokenizer), 0.02)
    return AutoModelForCausalLM.from_pretrained(model_dir), batches, loss_fn


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", choices=["cream", "scir"], default="cream")
    parser.add_argument("--loss", choices=["sft", "dpo", "scir"], required=True)
    parser.add_argument("--work", help="a folder for scir.py's demo model")
    parser.add_argument("--micro_batches", type=int, default=4)
    parser.add_argument("--unsynced", action="store_true")
    parser.add_argument("--out", required=True)
    options = parser.parse_args(argv)
    script = {"cream": cream, "scir": scir}[options.script]
    script.start_processes()
    if options.unsynced:  # no FSDP2: each rank keeps a whole copy and never sees the others'
        script.shard_for_training = lambda model: None
    if options.loss == "scir":
        model, micro, loss_fn = scir_batches(options.micro_batches, options.work)
    else:
        model = tiny_model()
        micro, loss_fn = batches(script, options.loss, options.micro_batches)
    args = SimpleNamespace(lr=1e-3, sft_lr=1e-3, grad_accum=4, max_grad_norm=1.0,
                           warmup_ratio=0.0)
    torch.manual_seed(2)
    summary = script.train(model, micro, loss_fn, "lr", args, "step")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(model, script.FSDPModule):
        state = script.get_model_state_dict(model, options=script.StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state": state, "summary": summary}, options.out)
    if torch.distributed.is_initialized():
        # rank 0 may still be saving: a rank that left the group first aborted at exit on a busy
        # machine ('terminate called without an active exception', seen twice in the suite)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
