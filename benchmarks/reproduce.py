"""Reproduce the paper's CIFAR-10 results (ResNet-20 by default; `--arch resnet18|vgg16|resnet50`
for its other networks) on one GPU, in resumable stages, by
running the `ticketctl` commands a user would run. Every stage writes its commands' JSON
outputs and a `stage.json` (wall time, status) into RUN/<stage>/; a finished stage is skipped
on a rerun, so a run cut short by a time limit continues where it stopped when given the same
run folder (carry it to a fresh machine and rerun).

    python benchmarks/reproduce.py --data-dir DATA --run runs/repro
    python benchmarks/reproduce.py --data-dir DATA --run runs/r18 --arch resnet18 --stages search,v2
    python benchmarks/reproduce.py --data-dir DATA --run runs/repro --ticket r20.fast.safetensors
    python benchmarks/reproduce.py --smoke --run /tmp/repro     # digits on CPU, about 1 min

Stages (`--stages`, default all, in this order):
  dense    the dense network alone (`find --max-rounds 0`)
  search   the extreme-ticket search (`find --preset fast`, resumed from its run folder);
           skipped when --ticket gives a ticket found earlier
  v1       Scheme V1: 4 scores x key ratios 5/10/20%, retrained without the key and with a
           forged key (`benchmarks/v1_effect.py`, packed on CUDA, its sweep folder resumes)
  v2       Scheme V2: sign, retrain with and without the signature, prune and add-on
           attacks, and Figure 4 (v2/qr-pruning.png: the code read at 0-30% pruning)
  v3       Scheme V3: retrain the signed ticket with the trigger set, null calibration,
           pruning attack with the trigger check
  attacks  fine-tuning, permutation and fake3 on the marked model
  thief    what a thief runs before deployment, on the marked model: quantization (int8,
           int6, int4, fp8), channel pruning, weight noise and distillation, every check
           with the calibrated null rate of v3; its wall time is the new sweep's
`summary.json` in the run folder collects every stage's numbers; `docs/REPRODUCTION.md` is
written from it by hand, beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ticketctl.artifacts.io import write_text_atomic
from ticketctl.protect.trigger import generate, save_trigger_set

STAGES = ("dense", "search", "v1", "v2", "v3", "attacks", "thief")
ROOT = Path(__file__).resolve().parent.parent


class Stage:
    def __init__(self, run: Path, name: str, log: Any) -> None:
        self.dir = run / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = log
        self.commands: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        f = self.dir / "stage.json"
        return f.exists() and json.loads(f.read_text()).get("status") == "done"

    def tc(self, name: str, *args: Any) -> dict[str, Any]:
        """Run `ticketctl ARGS --json`, keep its output as <name>.json; reuse a kept one."""
        out = self.dir / f"{name}.json"
        if out.exists():
            return json.loads(out.read_text())
        cmd = [sys.executable, "-m", "ticketctl", *[str(a) for a in args], "--json", "-q"]
        return self._run(name, cmd, out)

    def script(self, name: str, *args: Any) -> dict[str, Any]:
        out = self.dir / f"{name}.json"
        if out.exists():
            return json.loads(out.read_text())
        cmd = [sys.executable, *[str(a) for a in args], "--json-out", str(out) + ".tmp"]
        return self._run(name, cmd, out, from_file=True)

    def _run(self, name: str, cmd: list[str], out: Path, from_file: bool = False
             ) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.log(f"{self.name}/{name}: {' '.join(cmd[1:])}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t0
        self.commands.append({"name": name, "command": cmd[1:], "rc": p.returncode,
                              "seconds": round(seconds, 1)})
        # exit 1 is a verdict (e.g. a check failed), not a crash: keep its JSON
        if p.returncode not in (0, 1):
            raise RuntimeError(f"{name} failed (exit {p.returncode}): {p.stderr.strip()[-800:]}")
        if from_file:
            tmp = Path(str(out) + ".tmp")
            doc = json.loads(tmp.read_text())
            tmp.unlink()
        else:
            doc = json.loads(p.stdout)
        doc = {**doc, "_seconds": round(seconds, 1), "_rc": p.returncode} \
            if isinstance(doc, dict) else {"result": doc, "_seconds": round(seconds, 1)}
        write_text_atomic(out, json.dumps(doc, indent=1), force=True)  # read back on resume
        return doc

    def finish(self, t0: float, summary: dict[str, Any]) -> None:
        prior = self.dir / "stage.json"
        earlier = json.loads(prior.read_text()).get("seconds", 0.0) if prior.exists() else 0.0
        doc = {"status": "done", "seconds": round(earlier + time.perf_counter() - t0, 1),
               "commands": self.commands, "summary": summary}
        write_text_atomic(self.dir / "stage.json", json.dumps(doc, indent=1), force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder (resumes when it exists)")
    ap.add_argument("--data-dir", help="folder holding cifar-10-batches-py/")
    ap.add_argument("--trigger", default=str(ROOT.parent / "shared/data/trigger-abstract-100.npz"))
    ap.add_argument("--ticket", help="a ticket found earlier: skips the search stage")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--arch", default="resnet20", choices=("resnet20", "resnet18", "vgg16",
                                                            "resnet50"),
                    help="the network (CIFAR-10; --smoke always uses digits_cnn)")
    ap.add_argument("--smoke", action="store_true", help="digits on CPU, tiny settings")
    ap.add_argument("--devices", help="spread the V1 sweep and the null models over these "
                    "devices ('all' GPUs, or cuda:0,cuda:1)")
    ap.add_argument("--v2-seeds", type=int, default=3,
                    help="Table 2: retrain the ticket with and without its signature under "
                         "this many seeds (the paper's signing cost)")
    ap.add_argument("--v1-scores", help="the V1 sweep's scores (default "
                    "omp,ewp,betweenness,random; a large network may take fewer)")
    ap.add_argument("--v1-ratios", help="the V1 sweep's key ratios (default 0.05,0.1,0.2)")
    ap.add_argument("--null-models", type=int,
                    help="the V3 null models calibrated (default 16; 2 with --smoke)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no new stage after this many seconds")
    args = ap.parse_args()
    if args.null_models is not None and args.null_models < 2:
        ap.error("--null-models must be at least 2")
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if args.smoke:
        data = ["--dataset", "digits", "--device", "cpu"]
        preset = ["--preset", "demo"]
        arch = "digits_cnn"
        v1 = {"ratios": "0.05,0.2", "scores": "omp,random", "epochs": "3"}
        trig_pb, ft_epochs, null_models = "32", "1,2", "2"
    else:
        if not args.data_dir:
            ap.error("--data-dir is needed (or --smoke)")
        data = ["--dataset", "cifar10", "--data-dir", args.data_dir]
        preset = ["--preset", "fast"]
        arch = args.arch
        v1 = {"ratios": "0.05,0.1,0.2", "scores": "omp,ewp,betweenness,random", "epochs": None}
        trig_pb, ft_epochs, null_models = "16", "5,10,20", "16"
    if args.v1_scores:
        v1["scores"] = args.v1_scores
    if args.v1_ratios:
        v1["ratios"] = args.v1_ratios
    if args.null_models is not None:
        null_models = str(args.null_models)
    data_noset = [a for a in data if a not in ("--dataset", "digits", "cifar10")]
    wanted = [s for s in args.stages.split(",") if s]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages: {', '.join(sorted(unknown))}")
    files = run / "files"
    files.mkdir(exist_ok=True)
    ticket = Path(args.ticket).resolve() if args.ticket else files / "ticket.safetensors"
    trigger = args.trigger
    if args.smoke:
        trigger = str(files / "owner.trigger.npz")
    summary: dict[str, Any] = {}
    spread = ["--devices", args.devices] if args.devices else []

    # what each stage's results depend on beyond the run folder's ticket: a stage (or a kept
    # command of it) is reused only under the same settings
    settings = {"v1": {"scores": v1["scores"], "ratios": v1["ratios"]},
                "v2": {"v2_seeds": args.v2_seeds}, "v3": {"null_models": null_models}}
    for name in STAGES:
        if name not in wanted:
            continue
        st = Stage(run, name, log)
        want = {"arch": arch, **settings.get(name, {})}
        kept = st.dir / "settings.json"
        if kept.exists() and json.loads(kept.read_text()) != want:
            ap.error(f"stage {name} of {run} ran with {json.loads(kept.read_text())}, not "
                     f"{want}: use another --run folder, or the same options")
        write_text_atomic(kept, json.dumps(want), force=True)
        if st.done:
            summary[name] = json.loads((st.dir / "stage.json").read_text())
            log(f"{name}: done earlier, reused")
            continue
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"{name}: not started (budget); rerun with the same --run to continue")
            summary[name] = {"status": "not run (time budget)"}
            continue
        t0 = time.perf_counter()
        s: dict[str, Any] = {}
        if name == "dense":
            r = st.tc("find", "find", "--arch", arch, *data, *preset, "--max-rounds", "0",
                      "--out", files / "dense.safetensors", "--run-dir", st.dir / "run",
                      "--force")
            s = {"dense_accuracy": r.get("dense_accuracy"), "seconds": r["_seconds"]}
        elif name == "search":
            if args.ticket:
                s = {"ticket": str(ticket), "note": "given with --ticket (found earlier)"}
            else:
                resume = ["--resume"] if (st.dir / "run" / "config.json").exists() else []
                # smoke: one round, so the ticket stays dense enough to carry a QR code
                short = ["--max-rounds", "1"] if args.smoke else []
                r = st.tc("find", "find", "--arch", arch, *data, *preset, *short, "--out", ticket,
                          "--run-dir", st.dir / "run", "--plot", st.dir / "search.png",
                          "--force", *resume)
                s = {k: r.get(k) for k in ("dense_accuracy", "ticket_accuracy", "density",
                                           "spec")}
            s["inspect"] = st.tc("inspect", "inspect", ticket)
        elif name == "v1":
            extra = ["--epochs", v1["epochs"]] if v1["epochs"] else []
            r = st.script("v1_effect", ROOT / "benchmarks/v1_effect.py", "--ticket", ticket,
                          *data_noset, "--preset", preset[1], "--ratios", v1["ratios"],
                          "--scores", v1["scores"], "--out-dir", run / "v1-sweep",
                          "--md-out", st.dir / "v1.md", *extra, *spread)
            s = {"reference": r["meta"]["reference_accuracy"], "rows": r["rows"]}
        elif name == "v2":
            if not (files / "owner.key").exists():
                st.tc("keygen", "keygen", "--out", files / "owner", "--force")
            sign = st.tc("sign", "sign", ticket, "--message", "ticketctl reproduction",
                         "--out", files / "signed.safetensors", "--receipt",
                         files / "receipt.json", "--signing-key", files / "owner.key",
                         "--force")
            plain = st.tc("retrain_plain", "retrain", ticket, *data_noset, *preset,
                          "--out", files / "plain.safetensors", "--force")
            signed = st.tc("retrain_signed", "retrain", files / "signed.safetensors",
                           *data_noset, *preset, "--out", files / "signed-trained.safetensors",
                           "--force")
            chk = ["--receipt", files / "receipt.json", "--public-key", files / "owner.pub",
                   *data_noset]
            s = {"sign": sign, "plain_accuracy": plain["test_accuracy"],
                 "signed_accuracy": signed["test_accuracy"]}
            # Table 2: the signing cost over seeds (seed 0 is the pair above)
            pairs = [(plain["test_accuracy"], signed["test_accuracy"])]
            for seed in range(1, max(1, args.v2_seeds)):
                pairs.append(tuple(
                    st.tc(f"retrain_{which}_s{seed}", "retrain", src, *data_noset, *preset,
                          "--seed", seed, "--out", files / f"{which}-s{seed}.safetensors",
                          "--force")["test_accuracy"]
                    for which, src in (("plain", ticket),
                                       ("signed", files / "signed.safetensors"))))
            drops = [b - a for a, b in pairs]
            s["table2"] = {"seeds": len(pairs), "plain": [a for a, _ in pairs],
                           "signed": [b for _, b in pairs],
                           "mean_drop": sum(drops) / len(drops)}
            for method in ("omp", "random"):
                s[f"prune_{method}"] = st.tc(f"prune_{method}", "attack", "prune",
                                             files / "signed-trained.safetensors", "--method",
                                             method, "--rates", "0.05,0.1,0.2,0.3,0.5", *chk)
            s["addon"] = st.tc("addon", "attack", "addon", files / "signed-trained.safetensors",
                               "--rates", "0.005,0.01,0.02,0.05,0.1", "--defend", *chk)
            # Figure 4: the code itself under magnitude pruning
            s["qr_figure"] = st.script("qr_figure", ROOT / "benchmarks/qr_figure.py",
                                       files / "signed-trained.safetensors", "--receipt",
                                       files / "receipt.json", "--out", st.dir / "qr-pruning.png",
                                       "--title", f"{arch}: the code under pruning",
                                       "--force")
        elif name == "v3":
            if args.smoke and not Path(trigger).exists():
                # a fixed set at the digits' own size: a set drawn from each run's fresh owner
                # key, downsampled to 8x8 grey, was sometimes half unlearnable (two images
                # alike but labelled apart), which made the smoke test a matter of luck
                save_trigger_set(generate(b"ticketctl reproduce --smoke", n=30, size=8,
                                          channels=1), trigger, force=True)
            longer = ["--epochs", "16"] if args.smoke else []
            marked = st.tc("retrain_marked", "retrain", files / "signed.safetensors",
                           *data_noset, *preset, *longer, "--trigger", trigger,
                           "--trigger-per-batch", trig_pb, "--receipt", files / "receipt.json",
                           "--signing-key", files / "owner.key", "--out",
                           files / "marked.safetensors", "--force")
            null = st.tc("calibrate", "calibrate", "--trigger", trigger, "--arch", arch,
                         *data, *preset, "--epochs", "10" if not args.smoke else "2",
                         "--models", null_models, "--out", st.dir / "null-full.json",
                         "--force", *spread)
            prune = st.tc("prune_trigger", "attack", "prune", files / "marked.safetensors",
                          "--rates", "0.05,0.1,0.2,0.5", "--trigger", trigger, "--null-rate",
                          f"{null['null_rate']:.6f}", *data_noset)
            s = {"marked": marked, "null": {k: null[k] for k in
                                             ("null_rate", "mean_agreement", "max_agreement",
                                              "models")},
                 "prune": prune}
        elif name == "attacks":
            chk = ["--receipt", files / "receipt.json", "--public-key", files / "owner.pub",
                   "--trigger", trigger, *data_noset]
            s = {
                "finetune": st.tc("finetune", "attack", "finetune",
                                  files / "marked.safetensors", "--sweep-epochs", ft_epochs,
                                  *preset, "--out-dir", run / "ft-sweep", *chk),
                "finetune_dense": st.tc("finetune_dense", "attack", "finetune",
                                        files / "marked.safetensors", "--sweep-epochs",
                                        ft_epochs, "--dense", *preset, "--out-dir",
                                        run / "ftd-sweep", *chk),
                "permute": st.tc("permute", "attack", "permute", files / "marked.safetensors",
                                 *chk),
                "fake3": st.tc("fake3", "attack", "fake3", files / "marked.safetensors",
                               "--message", "not the owner", "--receipt",
                               files / "receipt.json", *data_noset),
            }
        elif name == "thief":
            calibrated = run / "v3" / "calibrate.json"
            null_rate = ["--null-rate", f"{json.loads(calibrated.read_text())['null_rate']:.6f}"
                         ] if calibrated.exists() else []
            chk = ["--receipt", files / "receipt.json", "--public-key", files / "owner.pub",
                   "--trigger", trigger, *null_rate, *data_noset]
            marked = files / "marked.safetensors"
            s = {
                "quantize": st.tc("quantize", "attack", "quantize", marked, "--bits",
                                  "8,6,4,fp8", *chk),
                "channel_prune": st.tc("channel_prune", "attack", "channel-prune", marked,
                                       "--rates", "0.1,0.2,0.3,0.5", *chk),
                "noise": st.tc("noise", "attack", "noise", marked, "--sigmas",
                               "0.01,0.05,0.1,0.2,0.5", *chk),
                "distill": st.tc("distill", "attack", "distill", marked, *preset,
                                 *(["--epochs", "3"] if args.smoke else []), "--out-dir",
                                 run / "distill-sweep", *chk),
            }
        st.finish(t0, s)
        summary[name] = json.loads((st.dir / "stage.json").read_text())
        log(f"{name}: done in {summary[name]['seconds']:.0f} s")
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    missing = [n for n in wanted if summary.get(n, {}).get("status") != "done"]
    log("all stages done" if not missing else f"not done: {', '.join(missing)}")
    return 0 if not missing else 3


if __name__ == "__main__":
    raise SystemExit(main())
