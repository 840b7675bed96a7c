"""The paper's Figure 4: the QR code read from a signed ticket's mask after magnitude pruning
at several rates, drawn side by side, with what each reading decodes to.

    python benchmarks/qr_figure.py signed.safetensors --receipt receipt.json \
        --rates 0,0.05,0.1,0.2,0.3 --out docs/img/resnet18-qr-pruning.png [--json-out rows.json]

Each panel is the module matrix where the receipt placed the code, read from the mask left
after `attack prune --method omp` at that rate (the same pruning as the attack's rows).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ticketctl.artifacts.io import write_bytes_atomic, write_text_atomic  # noqa: E402
from ticketctl.artifacts.ticket import load_ticket  # noqa: E402
from ticketctl.attacks.removal import pruned  # noqa: E402
from ticketctl.protect.receipt import load_receipt  # noqa: E402
from ticketctl.protect.signature import masks_of, read_code, read_signature  # noqa: E402


def readings(model: Path, receipt_path: Path, rates: list[float]) -> list[dict]:
    """One row per rate: the module matrix and what the signature check reads from it."""
    ticket = load_ticket(model)
    receipt = load_receipt(receipt_path)
    rows = []
    for rate in rates:
        state = pruned(ticket, "omp", rate) if rate > 0 else ticket.state
        masks = masks_of(state)
        sig = read_signature(masks, receipt)
        rows.append({"rate": rate, "message": sig.message, "bit_match": sig.bit_match,
                     "p_value": sig.p_value, "matrix": read_code(masks, receipt)})
    return rows


def draw(rows: list[dict], title: str) -> bytes:
    """The panels in one PNG; black modules are kept weights, as in the paper."""
    fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows), 2.9), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        grid = np.pad(row["matrix"].astype(bool), 2, constant_values=False)
        ax.imshow(~grid, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        said = "decodes" if row["message"] is not None else "no decode"
        ax.set_title(f"pruned {row['rate']:.0%}\n{said}, {row['bit_match']:.1%} bits",
                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the title above the panels
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--receipt", type=Path, required=True)
    ap.add_argument("--rates", default="0,0.05,0.1,0.2,0.3")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json-out", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--title", default="QR code read from the mask under magnitude pruning")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not rates or any(not 0 <= r < 1 for r in rates):
        ap.error(f"--rates must lie in [0, 1), got {args.rates!r}")
    rows = readings(args.model, args.receipt, rates)
    write_bytes_atomic(args.out, draw(rows, args.title), force=args.force)
    doc = {"png": str(args.out), "rows": [{k: v for k, v in r.items() if k != "matrix"}
                                          for r in rows]}
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(doc, indent=2) + "\n", force=args.force)
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
