"""``python -m dnntrace.demo``: train two small real models with tracing, write their traces.

1. A character-level transformer on the text of Python's own standard-library sources (the data
   ships with Python: nothing is downloaded).
2. A Glorot & Bengio (2010) style 5-layer tanh MLP with the "standard" U[-1/sqrt(n), 1/sqrt(n)]
   initialisation, predicting the next character from the previous 16: its activations saturate
   and its gradients shrink with depth, the picture the viewer is made to show.

Both run in well under a minute on a 2-core CPU (a GPU is used when present).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import dnntrace


def stdlib_text(max_bytes: int = 2_000_000) -> bytes:
    """Bytes of the standard library's .py sources, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for p in sorted(root.glob("*.py")):
        try:
            out += p.read_bytes()
        except OSError:
            continue
        if len(out) >= max_bytes:
            break
    if not out:
        raise RuntimeError(f"no Python sources found under {root}")
    return bytes(out[:max_bytes])


class CharTransformer(nn.Module):
    """A small causal transformer over bytes."""

    def __init__(
        self, vocab: int = 256, d: int = 128, heads: int = 4, layers: int = 2, seq: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            h = blk(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class GlorotMLP(nn.Module):
    """Five tanh layers with the 'standard' initialisation of Glorot & Bengio (2010)."""

    def __init__(
        self, context: int = 16, emb: int = 16, width: int = 256, depth: int = 5, vocab: int = 256
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        layers: list[nn.Module] = []
        n_in = context * emb
        for _ in range(depth):
            lin = nn.Linear(n_in, width)
            bound = 1.0 / math.sqrt(n_in)
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.Tanh()]
            n_in = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, vocab)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.embed(ctx).flatten(1)))


def batches(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    n = data.numel() - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def train_transformer(
    data: torch.Tensor, out: str, steps: int, device: torch.device, every: int
) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    seq, batch = 64, 32
    model = CharTransformer(seq=seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    it = batches(data, seq, batch, gen)
    t0 = time.perf_counter()
    # the demo is small: everything at the same cadence (the default records activations at
    # every 10th recorded step), so every viewer tab has a row at every recorded step
    with dnntrace.enable(model, out, every=every, activations_every=every) as tracer:
        for step in range(steps):
            x, y = next(it)
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracer.log_scalar("loss", loss)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"  transformer step {step:4d}  loss {loss.item():.3f}", flush=True)
            if step % 100 == 99:  # a small validation pass, recorded as phase=eval
                model.eval()
                with torch.no_grad():
                    vx, vy = next(it)
                    vloss = nn.functional.cross_entropy(
                        model(vx.to(device)).flatten(0, 1), vy.to(device).flatten()
                    )
                    tracer.log_scalar("val_loss", vloss)  # with the eval rows (next step)
                model.train()
    stats = tracer.stats()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def train_mlp(
    data: torch.Tensor,
    out: str,
    steps: int,
    device: torch.device,
    every: int,
    inject_nan: int | None,
) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    context, batch = 16, 128
    model = GlorotMLP(context=context).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    it = batches(data, context, batch, gen)
    t0 = time.perf_counter()
    # the MLP also records per-unit statistics, NaN origin, weight spectra and update ratios
    extras = {"units": True, "on_anomaly": "record", "spectral": True, "dynamics": True}
    with dnntrace.enable(model, out, every=every, activations_every=every, **extras) as tracer:
        for step in range(steps):
            ctx, nxt = next(it)  # 16 characters, and the same shifted by one
            x, y = ctx.to(device), nxt[:, -1].to(device)
            if inject_nan is not None and step == inject_nan:
                with torch.no_grad():  # a deliberate fault: the viewer should point at layer 3
                    model.hidden[4].weight[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracer.log_scalar("loss", loss)
            opt.step()
            if step % 100 == 0 or step == steps - 1:
                print(f"  mlp step {step:4d}  loss {loss.item():.3f}", flush=True)
    stats = tracer.stats()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dnntrace.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out", default="out/demo.arrow", help="transformer trace (default %(default)s)"
    )
    ap.add_argument("--mlp-out", default=None, help="MLP trace (default: beside --out, -mlp)")
    ap.add_argument("--steps", type=int, default=200, help="transformer steps (%(default)s)")
    ap.add_argument("--mlp-steps", type=int, default=400, help="MLP steps (%(default)s)")
    ap.add_argument("--every", type=int, default=1, help="trace every n-th step (%(default)s)")
    ap.add_argument(
        "--inject-nan",
        type=int,
        default=None,
        metavar="STEP",
        help="put a NaN into the MLP's third layer at STEP (to see it traced)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (%(default)s)")
    ap.add_argument("--only", choices=["transformer", "mlp"], default=None)
    args = ap.parse_args(argv)
    for name in ("steps", "mlp_steps", "every"):
        if getattr(args, name) < 1:
            print(f"dnntrace.demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    out = args.out
    mlp_out = args.mlp_out or str(Path(out).with_name(Path(out).stem + "-mlp.arrow"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    print(f"dnntrace demo on {device}: {data.numel() / 1e6:.1f} MB of stdlib source text")
    results = {}
    if args.only in (None, "transformer"):
        print(f"character transformer -> {out}")
        results[out] = train_transformer(data, out, args.steps, device, args.every)
    if args.only in (None, "mlp"):
        print(f"Glorot tanh MLP -> {mlp_out}")
        results[mlp_out] = train_mlp(
            data, mlp_out, args.mlp_steps, device, args.every, args.inject_nan
        )
    for path, s in results.items():
        per_row = s["bytes"] / max(s["rows"], 1)
        print(
            f"{path}: {s['steps_written']} steps written, {s['steps_dropped']} dropped, "
            f"{s['rows']} rows, {s['bytes'] / 1e6:.2f} MB ({per_row:.0f} B per tensor-step), "
            f"{s['seconds']:.1f} s"
        )
    print("view with: dnntrace-view " + " ".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
