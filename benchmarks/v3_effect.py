"""Scheme V3 on CIFAR-10 (the issue's targets): a ticket retrained with the paper's 100
abstract trigger images against the same ticket retrained without them (test accuracy),
trigger accuracy before and after 10/20/30% magnitude pruning, and the agreement of models
trained without the set (calibration).

    python benchmarks/v3_effect.py --ticket r20.safetensors --data-dir DATA \\
        --trigger ../shared/data/trigger-abstract-100.npz --json-out v3.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ticketctl.artifacts import load_ticket
from ticketctl.data import load_recorded_dataset
from ticketctl.device import configure_cuda, resolve_device
from ticketctl.protect.blackbox_verify import predict, score
from ticketctl.protect.calibrate import calibrate
from ticketctl.protect.trigger import load_trigger_set
from ticketctl.prune import magnitude_prune, resolve_settings
from ticketctl.train import Trainer
from ticketctl.train.config import TrainOverrides


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticket", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--per-batch", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--null-models", type=int, default=20)
    ap.add_argument("--null-epochs", type=int, default=10)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    configure_cuda()
    t0 = time.perf_counter()
    ticket = load_ticket(args.ticket)
    data = load_recorded_dataset(ticket.dataset or {}, None, args.data_dir,
                                 device=resolve_device("auto"))
    ts = load_trigger_set(args.trigger)
    x = ts.tensor(data.input_shape, data.mean, data.std, device=data.train_x.device)
    trig = (x, torch.from_numpy(ts.labels))
    cfg = resolve_settings(args.preset, arch=ticket.arch, dataset=data.name).train
    marked = Trainer(ticket.build_model(), data, cfg, mask=ticket.mask, trigger=trig,
                     trigger_per_batch=args.per_batch)
    plain = Trainer(ticket.build_model(), data, cfg, mask=ticket.mask)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = {"seed": seed}
        for name, tr in (("plain", plain), ("marked", marked)):
            tr.restart(ticket.state, seeds=seed)
            res = tr.fit(start_epoch=ticket.rewind_epoch or 0)
            out[f"{name}_test"] = res.test_accuracy
            out[f"{name}_trigger"] = score(predict(tr.model, x), ts.labels, 0.1).trigger_accuracy
        state = marked.model_state()
        for rate in (0.1, 0.2, 0.3):
            mask = magnitude_prune(state, ticket.mask, rate)
            marked.set_mask(mask)
            marked.load_model_state(mask.apply_state(state))
            out[f"pruned{int(rate * 100)}_test"] = marked.evaluate("test")
            out[f"pruned{int(rate * 100)}_trigger"] = score(predict(marked.model, x), ts.labels,
                                                            0.1).trigger_accuracy
        marked.set_mask(ticket.mask)
        rows.append(out)
        print(out, file=sys.stderr, flush=True)
    null_cfg = resolve_settings(args.preset, arch=ticket.arch, dataset=data.name,
                                train=TrainOverrides(epochs=args.null_epochs)).train
    null = (calibrate(ticket.arch, data, ts, null_cfg, models=args.null_models)
            if args.null_models > 0 else None)
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "rows": rows, "null": null, "seconds": time.perf_counter() - t0,
              "trigger_sha256": ts.sha256(), "ticket_density": ticket.density,
              "per_batch": args.per_batch, "preset": args.preset}
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
