"""Tensor parallelism against one rank, in one run: the same prompts and weights, TP=1 and
TP=N alternated, output tokens/s of a static batch (median over --repeats), and the cost of
rank 0's per-step broadcast of the model inputs (bytes and seconds a step).

On a CPU the ranks split the same cores (each gets cores / N threads), so TP=N is expected to
be slower: the arithmetic is the same, spread thinner, plus two all-reduces per layer and a
logits gather per step over loopback TCP (gloo), plus the step broadcast. TP pays off where
each rank has hardware of its own (GPUs, NCCL).

    python benchmarks/tp.py                          # a random Llama-shaped model, CPU
    python benchmarks/tp.py --device cuda --tp 2     # two GPUs (benchmarks/gpu_check.sh)
    python benchmarks/tp.py --model path/to/folder --tp 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from pagoda.engine import LLM, SamplingParams


def random_model(folder: Path, device: str) -> Path:
    """A Llama-shaped model, small on the CPU, 1B-sized on a GPU (8 heads, 4 KV heads)."""
    big = device.startswith("cuda")
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048 if big else 512,
        intermediate_size=8192 if big else 1536,
        num_hidden_layers=16 if big else 4,
        num_attention_heads=16 if big else 8,
        num_key_value_heads=8 if big else 4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def run_once(
    args: argparse.Namespace, tp: int, prompts: list[list[int]], threads: int | None = None
) -> dict:
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        max_model_len=args.input_len + args.output_len + 16,
        cpu_threads=threads,
    )
    try:
        params = SamplingParams(
            temperature=0, max_tokens=args.output_len, min_tokens=args.output_len
        )
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2))  # warm-up
        leader = llm.engine.leader
        sends = (leader.num_sends, leader.send_seconds, leader.send_bytes) if leader else None
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        seconds = time.perf_counter() - start
        result = {"tp": tp, "seconds": seconds}
        result["tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
        if leader is not None:
            steps = leader.num_sends - sends[0]
            result["broadcast_ms_per_step"] = 1000 * (leader.send_seconds - sends[1]) / steps
            result["broadcast_bytes_per_step"] = (leader.send_bytes - sends[2]) / steps
            result["broadcast_share"] = (leader.send_seconds - sends[1]) / seconds
        return result
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: a random Llama-shaped one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/tp.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(random_model(Path(tmp) / "model", args.device))
        vocab = transformers.AutoConfig.from_pretrained(args.model).vocab_size
        rng = random.Random(0)
        prompts = [
            [rng.randrange(3, vocab) for _ in range(args.input_len)]
            for _ in range(args.num_prompts)
        ]
        # on the CPU also TP=1 on one rank's share of the cores: what each rank computes with
        share = max(1, (os.cpu_count() or 1) // args.tp)
        arms = [(1, None), (args.tp, None)]
        if args.device == "cpu":
            arms.append((1, share))
        runs = []
        for repeat in range(args.repeats):  # alternated, so that load drifts hit all alike
            for tp, threads in arms:
                runs.append(
                    run_once(args, tp, prompts, threads)
                    | {"repeat": repeat, "threads_arm": threads}
                )
                print(json.dumps(runs[-1]), flush=True)
    median = {
        tp: statistics.median(
            r["tokens_per_s"] for r in runs if r["tp"] == tp and r["threads_arm"] is None
        )
        for tp in (1, args.tp)
    }
    tp_runs = [r for r in runs if r["tp"] == args.tp and r["threads_arm"] is None]
    summary = {
        "model": args.model,
        "device": args.device,
        "tp": args.tp,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "tokens_per_s_tp1": median[1],
        f"tokens_per_s_tp{args.tp}": median[args.tp],
        "ratio": median[args.tp] / median[1],
        "tokens_per_s_tp1_share": statistics.median(
            [r["tokens_per_s"] for r in runs if r["threads_arm"] is not None] or [0.0]
        ),
        "broadcast_ms_per_step": statistics.median(r["broadcast_ms_per_step"] for r in tp_runs),
        "broadcast_bytes_per_step": statistics.median(
            r["broadcast_bytes_per_step"] for r in tp_runs
        ),
        "broadcast_share": statistics.median(r["broadcast_share"] for r in tp_runs),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(
        f"{args.device}: TP=1 {median[1]:.1f} tok/s, TP={args.tp} {median[args.tp]:.1f} tok/s "
        f"(x{summary['ratio']:.2f}), TP=1 on cores/{args.tp} threads "
        f"{summary['tokens_per_s_tp1_share']:.1f} tok/s; "
        f"step broadcast {summary['broadcast_ms_per_step']:.2f} ms, "
        f"{summary['broadcast_bytes_per_step']:.0f} bytes a step "
        f"({100 * summary['broadcast_share']:.1f}% of the run)"
    )


if __name__ == "__main__":
    main()
