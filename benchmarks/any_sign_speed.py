"""Scheme V2 in any layer, on the CPU: `sign` and `verify` (with a receipt) of a ResNet-50
ticket (a built-in network, so also through the CLI) and of a ViT-B/16-sized set of linear
weights (12 blocks of qkv 2304x768, proj 768x768, fc1 3072x768 and fc2 768x3072; library
calls on weights and masks, and `verify` of the plain safetensors file through the CLI). The
baseline, measured in the same run, is the conv path on a ResNet-20 ticket.

    python benchmarks/any_sign_speed.py [--repeats 5] [--density 0.15] [--json-out F]
    python benchmarks/any_sign_speed.py --pruning 0.3,0.5   # what survives, no timing

Library timings include reading and writing the files (ticket, receipt); CLI timings are a
fresh process each, start-up included, with PyTorch's default threads (every core, as a user
runs it) and with one thread; a signed file is written afresh each time (the last one removed
and flushed to disk outside the timing). Medians of --repeats after one untimed run. With
--pruning, each signed ticket is instead pruned by global magnitude at each rate and verified
against its receipt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from bench_common import pruned_ticket, timed

from ticketctl.artifacts import Mask, Ticket, load_ticket, save_ticket
from ticketctl.models.sources import NetworkInfo
from ticketctl.protect.receipt import load_receipt, save_receipt
from ticketctl.protect.signature import masks_of, sign_ticket, verify_with_receipt
from ticketctl.protect.verify import Marks, verify
from ticketctl.prune import magnitude_prune

VIT_LAYERS = {"attn.qkv": (2304, 768), "attn.proj": (768, 768), "mlp.fc1": (3072, 768),
              "mlp.fc2": (768, 3072)}


def vit_b16_linears(density: float, seed: int = 0) -> Ticket:
    """ViT-B/16's linear weights, initialised as nn.Linear does and pruned to `density` by
    global magnitude (one threshold: instant, unlike a full sort of 85M weights)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(12):
        for name, (out, inputs) in VIT_LAYERS.items():
            bound = inputs ** -0.5  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
            state[f"blocks.{i}.{name}.weight"] = (torch.rand(out, inputs, generator=gen) * 2
                                                  - 1) * bound
    flat = torch.cat([w.abs().reshape(-1) for w in state.values()])
    threshold = float(flat.kthvalue(round((1 - density) * flat.numel())).values)
    mask = Mask({k: w.abs() > threshold for k, w in state.items()})
    return Ticket(state=state, mask=mask, arch="none", network=NetworkInfo("none"))


def cli(*args: object, threads: int | None = 1) -> None:
    """A fresh `ticketctl` process; `threads` None leaves PyTorch its default (every core)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-m", "ticketctl", *map(str, args)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"ticketctl {args[0]} failed: {out.stderr.strip()}")


def timed_fresh(fn: Callable[[], object], out: Path, repeats: int) -> float:
    """Median wall time of `repeats` runs after one untimed run, each writing `out` afresh
    (the previous output removed and flushed to disk outside the timing, as when a user
    signs one ticket, not a 400 MB overwrite right after the last)."""
    runs = []
    for i in range(repeats + 1):
        out.unlink(missing_ok=True)
        os.sync()
        t0 = time.perf_counter()
        fn()
        if i:
            runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def conv_case(arch: str, density: float, d: Path, repeats: int, with_cli: bool
              ) -> dict[str, float]:
    """A built-in network: library sign and verify with file reads and writes, and the CLI."""
    ticket = pruned_ticket(arch, density)
    src = save_ticket(ticket, d / f"{arch}.safetensors")
    signed, receipt = d / f"{arch}.signed.safetensors", d / f"{arch}.receipt.json"

    def sign() -> None:
        s, doc, _, _ = sign_ticket(load_ticket(src), "signature")
        save_ticket(s, signed, force=True)
        save_receipt(doc, receipt, force=True)

    def check() -> None:
        assert verify(signed, Marks(receipt=load_receipt(receipt))).message == "signature"

    out = {"sign": timed(sign, repeats), "verify": timed(check, repeats),
           "layer": load_receipt(receipt).placements[0].layer}
    if with_cli:
        out.update(cli_times(src, signed, receipt, repeats))
    return out


def cli_times(src: Path, signed: Path, receipt: Path, repeats: int) -> dict[str, float]:
    """The CLI's `sign` of `src`, then `verify` of the signed file, fresh processes each,
    with PyTorch's default threads (every core, as a user runs it) and with one thread."""
    out = {}
    for key, threads in (("", None), ("_1thread", 1)):
        out["cli_sign" + key] = timed_fresh(
            lambda t=threads: cli("sign", src, "--message", "signature", "--out", signed,
                                  "--receipt", receipt, "--force", threads=t), signed, repeats)
        out["cli_verify" + key] = timed(lambda t=threads: cli("verify", signed, "--receipt",
                                                              receipt, threads=t), repeats)
    return out


def vit_case(density: float, d: Path, repeats: int) -> dict[str, float]:
    ticket = vit_b16_linears(density)
    receipt = d / "vit.receipt.json"
    signed: dict[str, Ticket] = {}

    def sign() -> None:
        s, doc, _, _ = sign_ticket(ticket, "signature")
        save_receipt(doc, receipt, force=True)
        signed["ticket"] = s

    def check() -> None:
        masks = dict(signed["ticket"].mask)
        assert verify_with_receipt(masks, load_receipt(receipt)).message == "signature"

    out = {"sign": timed(sign, repeats), "verify": timed(check, repeats),
           "layer": load_receipt(receipt).placements[0].layer,
           "weights": ticket.mask.num_total, "density": ticket.density}
    plain = d / "vit.safetensors"  # a plain state dict: the mask is what is nonzero
    safetensors.torch.save_file(signed["ticket"].state, str(plain))
    out["cli_verify"] = timed(lambda: cli("verify", plain, "--receipt", receipt,
                                          threads=None), repeats)
    out["cli_verify_1thread"] = timed(lambda: cli("verify", plain, "--receipt", receipt),
                                      repeats)
    return out


def external_case(ticket: Ticket, name: str, d: Path, repeats: int) -> dict[str, float]:
    """A ticket of a network ticketctl does not know (`convert` of a state dict with no
    --arch), through the CLI."""
    ext = ticket.derive(arch="none", arch_args={}, network=NetworkInfo("none"))
    src = save_ticket(ext, d / f"{name}.ext.safetensors", force=True)
    signed, receipt = d / f"{name}.ext.signed.safetensors", d / f"{name}.ext.receipt.json"
    out: dict[str, Any] = cli_times(src, signed, receipt, repeats)
    out["layer"] = load_receipt(receipt).placements[0].layer
    out["file_mb"] = round(src.stat().st_size / 2**20, 1)
    return out


def pruning(density: float, rates: list[float]) -> None:
    """Sign each ticket, prune it by global magnitude, verify against the receipt."""
    print("| ticket | signed layer | block | modules changed | pruned | message | bit match "
          "| p-value |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ticket in (("resnet50", pruned_ticket("resnet50", density)),
                         ("vit_b16 linears", vit_b16_linears(density))):
        signed, receipt, report, _ = sign_ticket(ticket, "signature")
        assert signed.mask.num_kept == ticket.mask.num_kept
        p = receipt.placements[0]
        for rate in rates:
            mask = magnitude_prune(signed.state, signed.mask, rate)
            v = verify_with_receipt(masks_of(signed.state, dict(mask)), receipt)
            print(f"| {name} | {p.layer} | {p.block[0]}x{p.block[1]} | "
                  f"{report.modules_changed} | {100 * rate:.0f}% | {v.message} | "
                  f"{100 * v.bit_match:.1f}% | {v.p_value:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--pruning", help="comma-separated rates: check what survives instead")
    args = ap.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:  # one thread here and in the CLI's processes
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if args.pruning:
        pruning(args.density, [float(r) for r in args.pruning.split(",")])
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        results = {
            "resnet20 (baseline: conv path)": conv_case("resnet20", args.density, d,
                                                        args.repeats, with_cli=False),
            "resnet50": conv_case("resnet50", args.density, d, args.repeats, with_cli=True),
            "vit_b16 linears": vit_case(args.density, d, args.repeats),
            "resnet50, external (arch none)": external_case(
                pruned_ticket("resnet50", args.density), "resnet50", d, args.repeats),
            "vit_b16 linears, external (arch none)": external_case(
                vit_b16_linears(args.density), "vit", d, args.repeats),
        }
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
               f"{platform.python_version()}, load {os.getloadavg()[0]:.2f} at the start")
    print(f"density {args.density}; {machine}; {time.perf_counter() - t0:.0f} s in all")
    print("| ticket | signed layer | sign (library) | verify (library) | sign (CLI) | "
          "verify (CLI) | sign (CLI, 1 thread) | verify (CLI, 1 thread) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in (
            "sign", "verify", "cli_sign", "cli_verify", "cli_sign_1thread",
            "cli_verify_1thread")]
        print(f"| {name} | {r['layer']} | " + " | ".join(cells) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "density": args.density,
                                             "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
