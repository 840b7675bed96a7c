"""Streamed image folders against a plain torchvision pipeline, on one GPU and on several
(torchrun, data-parallel). Writes `--files` synthetic 256 x 256 JPEGs in 10 class folders under
`--folder` (once; kept for later runs), then measures, in one run, images per second of:

  (a) stream + model   ticketctl's streamed loader feeding its trainer (`find`'s step: CUDA
                       graph on one GPU, bf16, channels_last, torch.compile);
  (b) torchvision      `ImageFolder` + `DataLoader` (workers, pinned memory,
                       RandomResizedCrop + flip) feeding the same trainer step;
  (c) stream alone     the streamed loader copying batches to the GPU, no model: its ceiling;
  (d) model alone      the same step replayed on one resident batch: the GPU's ceiling;
  (e) GPU decode       (a) with the JPEGs decoded by nvJPEG on the GPU
                       (`data.gpu_decode.TensorBatchReader`; needs torchvision);
  (f) GPU decode alone (c) for that reader.

The target is (a) close to (d): the GPU, not the loader, sets the speed. Every figure is
global (all ranks), `--steps` timed steps after `--warmup` untimed ones; the global batch is
the same at every GPU count. Runs on the GPU machine; on a CPU with tiny sizes it is a smoke
test (`tests/test_stream.py`), where (b) reports "torchvision not installed" if it is not.

    python benchmarks/stream_speed.py --folder /tmp/jpegs --gpus 1,2 --json-out stream.json
    python benchmarks/stream_speed.py --folder /tmp/tiny --files 64 --image-size 32 \\
        --steps 2 --arch digits_cnn --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import on_ranks, rank_options  # noqa: E402

CLASSES = 10
SIDE = 256  # the synthetic images' size
DONE = ".written"  # marks a complete folder: its content is "<files> <side>"


# ---- the folder -------------------------------------------------------------------------------
def _write_images(root: str, split: str, indices: list[int]) -> None:
    from PIL import Image

    for i in indices:
        rng = np.random.default_rng(i)
        # smooth colour fields plus grain: decodes like a photograph, not like pure noise
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        base = np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BICUBIC), np.int16)
        grain = rng.integers(-12, 13, (SIDE, SIDE, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        path = Path(root, split, f"c{i % CLASSES}", f"{i:06d}.jpg")
        image.save(path, quality=90)


def write_folder(folder: Path, files: int) -> None:
    """`files` training JPEGs and a fiftieth as many (at least one a class) test ones."""
    marker = folder / DONE
    if marker.exists() and marker.read_text().split() == [str(files), str(SIDE)]:
        return
    test = max(CLASSES, files // 50)
    for split in ("train", "test"):
        for c in range(CLASSES):
            (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [("train", list(range(a, min(files, a + 500)))) for a in range(0, files, 500)]
    jobs += [("test", list(range(files + a, files + min(test, a + 500))))
             for a in range(0, test, 500)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_images, [str(folder)] * len(jobs), *zip(*jobs, strict=True)))
    marker.write_text(f"{files} {SIDE}")
    print(f"wrote {files} + {test} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# ---- one rank -------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rate(images: int, fn, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return images / (time.perf_counter() - t0)


def worker(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from ticketctl.data import load_dataset
    from ticketctl.data.stream import BatchReader
    from ticketctl.device import configure_cuda, resolve_device
    from ticketctl.distributed import init_from_env, shutdown
    from ticketctl.models import build_model
    from ticketctl.train import TrainConfig, Trainer

    configure_cuda()
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    ctx = init_from_env(dev)
    world, rank = (ctx.world, ctx.rank) if ctx else (1, 0)
    per_rank = args.batch // world
    workers = args.workers or max(1, (os.cpu_count() or 1) // world)
    reader = BatchReader(workers=workers, processes={"auto": None, "threads": False,
                                                     "processes": True}[args.loader])
    ds = load_dataset("imagefolder", args.folder, device=dev, val_size=0, stream=True,
                      image_size=args.image_size, reader=reader)
    cfg = replace(TrainConfig(), epochs=1, batch_size=args.batch, lr=0.01,
                  compile=not args.no_compile)
    trainer = Trainer(build_model(args.arch, CLASSES, seed=0, in_channels=3), ds, cfg,
                      dist=ctx)
    steps = min(args.steps, trainer.steps_per_epoch)
    warm = min(args.warmup, trainer.steps_per_epoch)
    images = steps * args.batch  # global
    row: dict = {"gpus": world, "global_batch": args.batch, "steps": steps,
                 "image_size": args.image_size, "loader_workers_per_rank": workers,
                 "loader": "processes" if reader.processes else "threads",
                 "cuda_graph": trainer.use_graph}

    # (a) the streamed loader feeding the trainer (epoch 1 warms up: capture, compile)
    trainer.train_epoch(1, steps=warm)
    row["stream_model"] = _rate(images, lambda: trainer.train_epoch(2, steps=steps), dev)

    # (c) the loader alone, its batches copied to the device (an epoch of seed `seed`)
    def loader_alone(seed: int) -> None:
        for x, y in ds.train_batches(seed, 1, steps, args.batch, rank, per_rank):
            trainer.x_in.copy_(x, non_blocking=True)
            trainer.y_in.copy_(y, non_blocking=True)

    row["stream_alone"] = _rate(images, lambda: loader_alone(3), dev)

    # (d) the step alone, on one resident batch
    x, y = next(ds.train_batches(4, 1, 1, args.batch, rank, per_rank))
    x, y = x.to(dev), y.to(dev)

    def model_alone() -> None:
        for b in range(steps):
            trainer.train_step(x, y, step=b)

    model_alone()  # (the same step as (a): already compiled and captured)
    row["model_alone"] = _rate(images, model_alone, dev)

    # (b) torchvision's pipeline feeding the same step
    row.update(torchvision_baseline(args, trainer, dev, world, rank, per_rank, workers,
                                    steps, warm))

    # (e), (f): the streamed loader with its JPEGs decoded on the GPU (nvJPEG), with the model
    # and alone
    from ticketctl.data.gpu_decode import TensorBatchReader, nvjpeg_available

    if nvjpeg_available(dev):
        ds.reader = TensorBatchReader(dev, workers=workers)
        trainer.train_epoch(5, steps=warm)
        row["gpu_decode_model"] = _rate(images, lambda: trainer.train_epoch(6, steps=steps), dev)
        row["gpu_decode_alone"] = _rate(images, lambda: loader_alone(7), dev)
    else:
        row["gpu_decode"] = "no GPU decoding here (needs CUDA and torchvision)"
    row["stream_vs_model"] = row["stream_model"] / row["model_alone"]
    # how many of the streamed batches came back through shared memory (worker processes)
    row["shared_memory_batches"] = reader.shared_batches
    if ctx is None or ctx.is_main:
        Path(args.result).write_text(json.dumps(row))
    shutdown()


def torchvision_baseline(args: argparse.Namespace, trainer, dev: torch.device, world: int,
                         rank: int, per_rank: int, workers: int, steps: int,
                         warm: int) -> dict:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        return {"torchvision": "torchvision not installed"}
    from torch.utils.data import DataLoader, DistributedSampler

    folder = datasets.ImageFolder(
        str(Path(args.folder) / "train"),
        transforms.Compose([transforms.RandomResizedCrop(args.image_size, antialias=True),
                            transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
    sampler = DistributedSampler(folder, world, rank, shuffle=True, seed=0, drop_last=True) \
        if world > 1 else None
    loader = DataLoader(folder, batch_size=per_rank, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, pin_memory=dev.type == "cuda", drop_last=True,
                        prefetch_factor=4)
    if len(loader) < warm + steps:
        return {"torchvision": f"the folder has fewer than {warm + steps} batches"}
    staged = torch.empty((per_rank, 3, args.image_size, args.image_size), dtype=torch.uint8,
                         device=dev)

    batches = iter(loader)  # one pass for warm-up and timing: no second pipeline fill

    def feed(steps: int) -> None:
        for b in range(steps):
            x, y = next(batches)
            staged.copy_(x, non_blocking=True)  # N x C x H x W, made N x H x W x C on the GPU
            trainer.train_step(staged.permute(0, 2, 3, 1), y, step=b)

    feed(warm)  # the workers start
    return {"torchvision_model": _rate(steps * args.batch, lambda: feed(steps), dev)}


# ---- the launcher ---------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", required=True, help="where the JPEGs are (written if absent)")
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--arch", default="torchvision:resnet50")
    ap.add_argument("--batch", type=int, default=256, help="global batch, at every GPU count")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--gpus", default="1")
    ap.add_argument("--workers", type=int, help="decoding workers per rank (default: the "
                    "cores divided among the ranks)")
    ap.add_argument("--loader", choices=("auto", "threads", "processes"), default="auto",
                    help="decoding workers: threads, processes, or the library's choice")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json-out")
    rank_options(ap, run_timeout=400)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    write_folder(Path(args.folder), args.files)
    cuda = args.device != "cpu" and torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else 2  # gloo ranks on a CPU
    rows = []
    for n in [int(g) for g in args.gpus.split(",")]:
        if n > available:
            rows.append({"gpus": n, "skipped": f"only {available} GPUs here"})
            continue
        if args.batch % n:
            rows.append({"gpus": n, "skipped": f"--batch {args.batch} does not divide by {n}"})
            continue
        args_ = []
        for flag in ("folder", "image_size", "arch", "batch", "steps", "warmup", "workers",
                     "device"):
            value = getattr(args, flag)
            if value is not None:
                args_ += [f"--{flag.replace('_', '-')}", str(value)]
        args_ += ["--loader", args.loader] + ["--no-compile"] * args.no_compile
        row, error = on_ranks(Path(__file__).resolve(), n, args_, timeout_s=args.run_timeout)
        rows.append(row if row is not None else {"gpus": n, "error": error})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        out = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "arch": args.arch,
               "files": args.files, "rows": rows}
        if args.json_out:  # after every GPU count: a later one may be killed
            Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | (a) stream + model | (b) torchvision + model | (c) stream alone | "
             "(d) model alone | (a)/(d) | (e) GPU decode + model | (f) GPU decode alone |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "stream_model" not in r:
            lines.append(f"| {r['gpus']} | {r.get('skipped') or 'error'} | | | | | | |")
            continue
        tv = r.get("torchvision_model")
        gpu = (f"{r['gpu_decode_model']:.0f} | {r['gpu_decode_alone']:.0f}"
               if "gpu_decode_model" in r else f"{r['gpu_decode']} | -")
        lines.append(f"| {r['gpus']} | {r['stream_model']:.0f} | "
                     f"{f'{tv:.0f}' if tv is not None else r['torchvision']} | "
                     f"{r['stream_alone']:.0f} | {r['model_alone']:.0f} | "
                     f"{100 * r['stream_vs_model']:.0f}% | {gpu} |")
    return "\n".join(lines) + "\n(images per second, all GPUs together)"


if __name__ == "__main__":
    raise SystemExit(main())
