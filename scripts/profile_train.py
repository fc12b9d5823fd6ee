"""Where one training step of the quickstart setting spends its time, and how well it uses the machine.

Builds the step from embedtrain's own components (``load_text_encoder``, ``read_pairs``,
``pretokenize``, ``plan_epoch``, ``BatchCollator``, ``InfoNCELoss``, ``build_optimizer``/
``build_scheduler``) and times, averaged over ``--steps`` steps after ``--warmup``:

- ``tokenize``: tokenizing the batch's texts (what a step would cost without pre-tokenization;
  the training loop tokenizes once before it starts, so this phase is not part of its steps);
- ``collate``: building the padded tensors from the pre-tokenized ids (what the loop does per step);
- ``forward``, ``loss``, ``backward``, ``optimizer`` (gradient clipping + AdamW step + scheduler + zero_grad).

FLOPs are counted analytically for a BERT-style encoder on the shapes actually computed. Per token,
forward: ``2 * P`` for the matmuls (P = weights of the encoder's linear layers) plus ``4 * L * S * H``
for attention (QK^T and AV, L layers, S the sequence length the token attends over, H hidden size);
training = 3 x forward. ``padded`` counts every position of the padded batch (what the hardware
computes), ``real`` only non-pad tokens at their true lengths (the useful work). The contrastive
logits (2 * B * N * H, x3) are added to both. Peak FLOP/s comes from an fp32 matmul benchmark on
this machine (``--peak-gflops`` to give it instead).

``mfu`` = real FLOPs per step / train-step time / peak; ``hfu`` = padded FLOPs / train-step time /
peak; ``achieved_flops_per_s`` = padded FLOPs / (forward + loss + backward time). The train step
is forward + loss + backward + optimizer (tokenization and collation are reported apart).

Example::

    python scripts/profile_train.py --steps 10 --length-grouping on --output runs/bench/profile.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import QUICKSTART, eprint, machine_info, mean, median, offline_env, sync, write_json  # noqa: E402

PHASES = ("tokenize", "collate", "forward", "loss", "backward", "optimizer")
TRAIN_PHASES = ("forward", "loss", "backward", "optimizer")


def encoder_shape(backbone) -> dict[str, Any]:
    """Layers, hidden size and the weights of every linear layer of the encoder stack."""
    from torch import nn

    cfg = backbone.config
    stack = getattr(backbone, "encoder", None) or backbone
    matmul_params = sum(m.in_features * m.out_features for m in stack.modules() if isinstance(m, nn.Linear))
    return {
        "layers": int(cfg.num_hidden_layers),
        "hidden": int(cfg.hidden_size),
        "heads": int(cfg.num_attention_heads),
        "intermediate": int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
        "matmul_params_per_token": int(matmul_params),
        "parameters": int(sum(p.numel() for p in backbone.parameters())),
    }


def forward_flops(lengths: list[int], padded_to: int, shape: dict[str, Any]) -> tuple[float, float]:
    """(padded, real) forward FLOPs of one batch of sequences (``lengths`` real tokens each)."""
    p, layers, hidden = shape["matmul_params_per_token"], shape["layers"], shape["hidden"]
    per_token = 2 * p
    padded = len(lengths) * padded_to * (per_token + 4 * layers * padded_to * hidden)
    real = sum(n * (per_token + 4 * layers * n * hidden) for n in lengths)
    return float(padded), float(real)


def measure_peak_flops(size: int, repeats: int) -> dict[str, Any]:
    """Best fp32 matmul rate of ``size`` x ``size`` matrices on the default device."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return {"flops_per_s": 2 * size**3 / best, "method": f"torch fp32 matmul {size}x{size}, best of {repeats}",
            "device": device}


def _timed(times: dict[str, list[float]], name: str, fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    times.setdefault(name, []).append(time.perf_counter() - start)
    return out


def optimizer_alternatives(params: list, lr: float, weight_decay: float, steps: int) -> dict[str, Any]:
    """Step time of other AdamW implementations on the same parameters and gradients (after profiling)."""
    import torch

    out: dict[str, Any] = {}
    for name, kwargs in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        try:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
            opt.step()  # creates the state
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            sync()
            out[name] = (time.perf_counter() - start) / steps
        except (RuntimeError, TypeError, ValueError) as err:
            out[name] = f"not available: {str(err).splitlines()[0][:160]}"
    return out


def profile(args) -> dict[str, Any]:
    import torch

    from embedtrain.data import BatchCollator, plan_epoch, pretokenize, read_pairs, token_lengths
    from embedtrain.data.collate import role_of
    from embedtrain.losses import InfoNCELoss
    from embedtrain.models import load_text_encoder
    from embedtrain.train.optim import build_optimizer, build_scheduler, loss_group, parameter_groups

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup_start = time.perf_counter()
    encoder = load_text_encoder(args.model, pooling="mean", normalize=True, max_length=args.max_length)
    negatives = [args.negative_column] if args.negative_column else []
    dataset = read_pairs(args.data, "data.train[0]", "profile", args.query_column, args.positive_column, negatives,
                         max_rows=args.max_rows)
    pretokenize(dataset, encoder.tokenizer, encoder.max_length_for)
    grouping = args.length_grouping == "on"
    lengths = [token_lengths(dataset)] if grouping else None
    total = args.warmup + args.steps
    plan = plan_epoch([len(dataset)], [dataset.row_keys], args.batch_size, args.seed, 0, lengths=lengths,
                      window=args.window)
    if len(plan) < total:
        raise SystemExit(f"only {len(plan)} batches of {args.batch_size} in the data; lower --steps/--batch-size "
                         "or raise --max-rows")
    collator = BatchCollator([dataset], encoder.tokenizer, encoder.max_length_for)
    frozen = encoder.freeze_unused_parameters()
    encoder.to(device)
    loss_fn = InfoNCELoss(temperature=args.temperature).to(device)
    # the text task's groups: decay for weights, none for biases, norms and the loss's own parameters
    optimizer = build_optimizer(parameter_groups(encoder.named_parameters(), args.weight_decay) + loss_group(loss_fn),
                                args.lr)
    scheduler = build_scheduler(optimizer, "linear", total, args.warmup_ratio)
    params = [p for p in encoder.parameters() if p.requires_grad]
    shape = encoder_shape(encoder.backbone)
    setup_seconds = time.perf_counter() - setup_start

    times: dict[str, list[float]] = {}
    flops_padded: list[float] = []
    flops_real: list[float] = []
    roles_seen: dict[str, dict[str, list]] = {}
    losses = []
    encoder.train()
    for i in range(total):
        planned = plan[i]
        rows = list(planned.rows)
        step_times: dict[str, list[float]] = {}
        # tokenization of this batch's raw texts, as a step without pre-tokenization would do it
        raw = dataset.rows[rows]

        def tokenize():
            out = {}
            for column in dataset.role_columns:
                role = role_of(column)
                prompt = dataset.query_prompt if role == "query" else dataset.document_prompt
                out[column] = encoder.tokenize([prompt + t for t in raw[column]], role)
            return out

        _timed(step_times, "tokenize", tokenize)
        batch = _timed(step_times, "collate", lambda: collator(planned, rows))
        batch = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict)
                     else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        present = [r for r in ("query", "positive", "negative") if batch[r] is not None]
        embeddings = _timed(step_times, "forward", lambda: encoder(many=[batch[r] for r in present]))
        emb = dict(zip(present, embeddings))
        out = _timed(step_times, "loss", lambda: loss_fn(
            query=emb["query"], positive=emb["positive"], negative=emb.get("negative"),
            positive_ids=batch["positive_ids"], negative_ids=batch["negative_ids"]))
        _timed(step_times, "backward", lambda: out["loss"].backward())

        def optimizer_step():
            parts = {}
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            sync()
            t1 = time.perf_counter()
            optimizer.step()
            scheduler.step()
            sync()
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sync()
            parts.update(clip_grad_norm=t1 - t0, adamw_step=t2 - t1, zero_grad=time.perf_counter() - t2)
            return parts

        parts = _timed(step_times, "optimizer", optimizer_step)
        losses.append(float(out["loss"].detach()))
        eprint(f"step {i + 1}/{total}: " + ", ".join(f"{k} {v[0] * 1000:.0f} ms" for k, v in step_times.items()))
        if i < args.warmup:
            continue
        for k, v in step_times.items():
            times.setdefault(k, []).extend(v)
        for k, v in parts.items():
            times.setdefault(f"optimizer.{k}", []).append(v)
        # FLOPs on the shapes computed in this step
        padded_total = real_total = 0.0
        for role in present:
            mask = batch[role]["attention_mask"]
            lens = mask.sum(1).tolist()
            fp, fr = forward_flops(lens, mask.shape[1], shape)
            padded_total += fp
            real_total += fr
            stats = roles_seen.setdefault(role, {"shape": [], "real": [], "padded": []})
            stats["shape"].append(list(mask.shape))
            stats["real"].append(sum(lens))
            stats["padded"].append(mask.numel())
        n_docs = sum(int(batch[r]["input_ids"].shape[0]) for r in present if r != "query")
        logits = 2.0 * batch["query"]["input_ids"].shape[0] * n_docs * shape["hidden"]
        flops_padded.append(3 * (padded_total + logits))
        flops_real.append(3 * (real_total + logits))

    alternatives = None
    if not args.no_optimizer_alternatives:
        # fresh gradients of the last batch, then time other AdamW implementations on them
        out = loss_fn(**{r: e for r, e in zip(present, encoder(many=[batch[r] for r in present]))},
                      positive_ids=batch["positive_ids"], negative_ids=batch["negative_ids"])
        out["loss"].backward()
        alternatives = {"current (embedtrain.train.optim.build_optimizer)": mean(times.get("optimizer.adamw_step", [])),
                        **optimizer_alternatives(params, args.lr, args.weight_decay, 3)}

    phase_means = {k: mean(times.get(k, [])) for k in PHASES}
    train_step = sum(phase_means[k] for k in TRAIN_PHASES)
    compute = sum(phase_means[k] for k in ("forward", "loss", "backward"))
    pad_flops, real_flops = mean(flops_padded), mean(flops_real)
    if args.peak_gflops:
        peak = {"flops_per_s": args.peak_gflops * 1e9, "method": "--peak-gflops"}
    else:
        peak = measure_peak_flops(args.matmul_size, args.matmul_repeats)
    per_role = {
        role: {"mean_batch_shape": [mean([s[0] for s in v["shape"]]), mean([s[1] for s in v["shape"]])],
               "real_share": sum(v["real"]) / sum(v["padded"]),
               "real_tokens_per_step": mean(v["real"]), "tokens_per_step": mean(v["padded"])}
        for role, v in roles_seen.items()
    }
    real_tokens = sum(sum(v["real"]) for v in roles_seen.values())
    padded_tokens = sum(sum(v["padded"]) for v in roles_seen.values())
    return {
        "config": {k: v for k, v in vars(args).items() if k != "output"},
        "machine": machine_info(),
        "device": str(device),
        "setup_seconds": setup_seconds,
        "model": {**shape, "frozen": frozen},
        "timed_steps": args.steps,
        "phases_seconds": {
            **{k: {"mean": phase_means[k], "median": median(times.get(k, [])),
                   "share_of_train_step": phase_means[k] / train_step if k in TRAIN_PHASES and train_step else None}
               for k in PHASES},
            "optimizer_parts": {k.split(".", 1)[1]: mean(v) for k, v in times.items() if k.startswith("optimizer.")},
        },
        "train_step_seconds": train_step,
        "examples_per_s": {
            "train_step": args.batch_size / train_step,
            "with_collation": args.batch_size / (train_step + phase_means["collate"]),
            "with_tokenization": args.batch_size / (train_step + phase_means["tokenize"]),
        },
        "tokens": {"per_role": per_role, "real_share": real_tokens / padded_tokens if padded_tokens else None,
                   "real_tokens_per_step": real_tokens / args.steps, "tokens_per_step": padded_tokens / args.steps},
        "flops_per_step": {"padded": pad_flops, "real": real_flops,
                           "padding_overhead": pad_flops / real_flops if real_flops else None},
        "achieved_flops_per_s": pad_flops / compute if compute else None,
        "useful_flops_per_s": real_flops / train_step if train_step else None,
        "peak_flops_per_s": peak["flops_per_s"],
        "peak_method": peak["method"],
        "mfu": real_flops / train_step / peak["flops_per_s"] if train_step else None,
        "hfu": pad_flops / train_step / peak["flops_per_s"] if train_step else None,
        "optimizer_alternatives_seconds": alternatives,
        "loss": {"first": losses[0], "last": losses[-1]},
        "definitions": {
            "forward_flops_per_token": "2 * matmul_params_per_token + 4 * layers * seq_len * hidden",
            "train_flops": "3 x forward (backward = 2 x forward), plus the contrastive logits",
            "padded": "every position of the padded batch, attention over the padded length",
            "real": "non-pad tokens only, attention over each text's true length",
            "train_step": "forward + loss + backward + optimizer (tokenization and collation not included)",
            "mfu": "real FLOPs per step / train_step seconds / peak FLOP/s",
            "hfu": "padded FLOPs per step / train_step seconds / peak FLOP/s",
            "achieved_flops_per_s": "padded FLOPs / (forward + loss + backward seconds)",
        },
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=QUICKSTART["model"])
    p.add_argument("--data", default=QUICKSTART["data"])
    p.add_argument("--query-column", default=QUICKSTART["query_column"])
    p.add_argument("--positive-column", default=QUICKSTART["positive_column"])
    p.add_argument("--negative-column", default=QUICKSTART["negative_column"], help="'' for none")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=QUICKSTART["batch_size"])
    p.add_argument("--max-length", type=int, default=QUICKSTART["max_length"])
    p.add_argument("--length-grouping", choices=["on", "off"], default="on")
    p.add_argument("--window", type=int, default=64, help="length-grouping window (data.length_grouping_window)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--lr", type=float, default=QUICKSTART["lr"])
    p.add_argument("--warmup-ratio", type=float, default=QUICKSTART["warmup_ratio"])
    p.add_argument("--weight-decay", type=float, default=QUICKSTART["weight_decay"])
    p.add_argument("--max-grad-norm", type=float, default=QUICKSTART["max_grad_norm"])
    p.add_argument("--temperature", type=float, default=QUICKSTART["temperature"])
    p.add_argument("--seed", type=int, default=QUICKSTART["seed"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-gflops", type=float, default=None, help="peak FLOP/s in GFLOP/s instead of measuring")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--no-optimizer-alternatives", action="store_true",
                   help="skip timing foreach/fused AdamW on the same parameters")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup 0 or more")
    return args


def main(argv=None) -> None:
    offline_env()
    args = parse_args(argv)
    result = profile(args)
    write_json(result, args.output)
    phases = result["phases_seconds"]
    eprint("\n| phase | ms | share of train step |\n|---|---|---|")
    for k in PHASES:
        share = phases[k]["share_of_train_step"]
        eprint(f"| {k} | {1000 * phases[k]['mean']:.1f} | {'' if share is None else f'{100 * share:.0f}%'} |")
    eprint(f"\nreal-token share {result['tokens']['real_share']:.2f}, "
           f"achieved {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, "
           f"peak {result['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * result['mfu']:.1f}%")


if __name__ == "__main__":
    main()
