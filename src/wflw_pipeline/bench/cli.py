"""`wflw bench`: its argument parser and the dispatch to the benchmark of each mode.

The top-level `wflw` parser knows `bench` by name only and hands the rest of the command line to
`build_parser` here, so no stage loads this file; the benchmark modules load only when one runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_params_options
from ..params import Params


def run(params: Params, args: argparse.Namespace, command: str) -> None:
    """Run the benchmark `args.bench` with the parsed options; `command` is recorded in its JSON."""
    common = {"device_name": args.device, "out_dir": Path(args.out), "command": command}
    if args.bench == "start":
        from .start import run_start

        run_start(
            **common,
            params=params,
            arch=args.arch,
            input_size=args.input_size,
            batch_size=args.batch_size,
            faces=args.faces,
            crop_size=args.crop_size,
            steps=args.steps,
            tolerance=args.tolerance,
            precision_name=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            compile_mode=args.compile_mode,
            cudnn_benchmark=args.cudnn_benchmark,
            work_dir=Path(args.work) if args.work else None,
            keep=args.keep,
            timeout_s=args.run_timeout,
        )
        return
    if args.bench == "loader":
        from .loader import run_loader

        run_loader(
            **common,
            work_dir=Path(args.work),
            augmentation=params.augment,
            faces=args.faces,
            batch_size=args.batch_size,
            batches=args.batches,
            warmup=args.warmup,
            repeats=args.repeats,
            workers=args.workers,
            min_image_size=args.min_image_size,
            max_image_size=args.max_image_size,
            crop_size=args.crop_size,
            input_size=args.input_size,
            context=args.context,
            seed=args.seed,
        )
        return
    if args.bench == "predict":
        from .predict import run_predict

        run_predict(
            **common,
            checkpoint=Path(args.checkpoint),
            config=params.predict,
            images=args.images,
            repeats=args.repeats,
            work_dir=Path(args.work),
        )
        return
    if args.bench == "precision":
        from .precision import run_precision

        run_precision(
            **common, checkpoint=Path(args.checkpoint), parquet=Path(args.parquet), batch_size=args.batch_size
        )
        return
    training = {
        **common,
        "loss": params.loss,
        "train": params.train,
        "arch": args.arch,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "precision_name": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
    }
    if args.bench == "train-step":
        from .step import run_train_step

        run_train_step(
            **training,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            peak=args.peak_tflops,
            variants=args.variants,
            batch_sizes=args.batch_sizes,
        )
    else:
        from .epoch import run_epoch

        run_epoch(
            **training,
            augmentation=params.augment,
            faces=args.faces,
            crop_size=args.crop_size,
            context=args.context,
            epochs=args.epochs,
        )


TRAIN_STEP_DESCRIPTION = """\
Times the training step of DeepPose (engine.train_step: forward under autocast, loss, backward, Adam,
the LR schedule) on random inputs already on the device, in variants that keep its semantics: each
variant at each batch size is built (and compiled) first, then all are timed in turns
(A, B, C, A, B, C, ...) on the same inputs; the first is the baseline of the ratios. FLOPs are counted
with FlopCounterMode (one forward; training = 3x); MFU = achieved / the GPU's dense bf16 peak (a table
by device name, or --peak-tflops).

A variant is a base, optionally followed by options, joined by "+" (e.g. compile+conv1x1+coord):
  eager        engine.train_step, the model not compiled
  compile      engine.train_step on torch.compile(model, dynamic=False), default Inductor
  graph-step   the whole step (forward, loss, backward, fused capturable Adam) of the compiled model as
               one CUDA graph, replayed; the lr a device tensor the LambdaLR schedule rewrites (CUDA only)
  graph-eager  graph-step around the model not compiled (CUDA only)
options (compile and graph-step):
  conv1x1      Inductor conv_1x1_as_mm: 1x1 convolutions as matmuls
  coord        Inductor coordinate_descent_tuning: Triton launch configurations tuned at first run
  autotune     Inductor max_autotune, no CUDA graphs (+coord = mode max-autotune-no-cudagraphs)
  cudagraphs   Inductor triton.cudagraphs (mode reduce-overhead; CUDA only, not with graph-step)
Off CUDA, CUDA-only variants are listed as not run, with the reason. Without --variants, --compile
off|on|both|auto and --compile-mode choose eager and/or compile (the mode as its options).
"""


def _sizes(text: str) -> list[int]:
    """`256,384,512` -> [256, 384, 512]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of `wflw bench MODE [options]`."""
    bench = argparse.ArgumentParser(
        prog="wflw bench",
        description="Measure the data path, the training step, whole epochs, the start-up (cold and warm "
        "compile cache) and the regression head's precision on this machine. Each "
        "mode prints a table and writes <mode>.json into --out. Sizes left unset default to GPU-sized "
        "values on CUDA and small ones elsewhere. Augmentation ranges, the loss, the optimiser and the "
        "LR schedule come from params (augment.*, loss.*, train.*). Nothing here asserts a speed.",
    )
    modes = bench.add_subparsers(dest="bench", required=True, metavar="MODE")
    loader = modes.add_parser(
        "loader",
        help="our on-device batch augmentation vs a reference-style per-sample DataLoader",
        description="Generates synthetic WFLW at WFLW-like image sizes in --work (reused when the "
        "settings match), extracts the original images for the baseline and converts them for ours, then "
        "times both loaders on the same faces, batch size and augmentation ranges, in one run.",
    )
    loader.add_argument("--faces", type=int, default=300, help="(default: %(default)s)")
    loader.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    loader.add_argument(
        "--batches", type=int, default=20, help="timed batches per repeat (default: %(default)s)"
    )
    loader.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: %(default)s)")
    loader.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    loader.add_argument(
        "--workers", type=int, default=None, help="baseline DataLoader workers (default: cores)"
    )
    loader.add_argument("--min-image-size", type=int, default=800, help="(default: %(default)s)")
    loader.add_argument("--max-image-size", type=int, default=1200, help="(default: %(default)s)")
    loader.add_argument("--crop-size", type=int, default=384, help="stored crop side (default: %(default)s)")
    loader.add_argument("--context", type=float, default=1.5, help="(default: %(default)s)")
    loader.add_argument(
        "--input-size", type=int, default=256, help="network input side (default: %(default)s)"
    )
    loader.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    loader.add_argument(
        "--work", default="data/bench/work", help="folder for the generated data (default: %(default)s)"
    )

    step = modes.add_parser(
        "train-step",
        help="forward + backward + Adam step: images/s of variants of the step (A/B), memory, MFU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=TRAIN_STEP_DESCRIPTION,
    )
    step.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: 200 CUDA, 3 CPU)"
    )
    step.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 1 CPU)"
    )
    step.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    step.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name)")
    step.add_argument(
        "--variants",
        default=None,
        metavar="V1,V2,...",
        help="variants of the step to time in turns, the first the baseline (see above; replaces "
        "--compile and --compile-mode; default: those two choose)",
    )
    step.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=None,
        metavar="B1,B2,...",
        help="time every variant at each of these batch sizes, all in turns (instead of --batch-size)",
    )

    epoch = modes.add_parser(
        "epoch",
        help="whole epochs of engine.train_one_epoch on in-memory crops; projects the reference schedule",
        description="Trains whole epochs (data + step) on random in-memory crops and projects the "
        "reference schedule (210 epochs of 7,500 faces) at the steady speed.",
    )
    epoch.add_argument("--faces", type=int, default=None, help="(default: 7500 CUDA, 64 CPU)")
    epoch.add_argument("--epochs", type=int, default=3, help="(default: %(default)s; the first warms up)")
    epoch.add_argument("--crop-size", type=int, default=384, help="(default: %(default)s)")
    epoch.add_argument("--context", type=float, default=1.5, help="(default: %(default)s)")

    for sub in (step, epoch):
        sub.add_argument("--arch", default="resnet50", help="(default: %(default)s)")
        sub.add_argument("--input-size", type=int, default=256, help="(default: %(default)s)")
        sub.add_argument(
            "--batch-size", type=int, default=None, help="(default: 256 CUDA; 8 train-step, 16 epoch on CPU)"
        )
        sub.add_argument(
            "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA"
        )
        sub.add_argument(
            "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(default: on)"
        )
        sub.add_argument(
            "--compile",
            choices=("auto", "on", "off") + (("both",) if sub is step else ()),
            default="auto",
            help="torch.compile the model (auto: %s)"
            % ("both on CUDA, off elsewhere" if sub is step else "on on CUDA, off elsewhere"),
        )
        sub.add_argument(
            "--compile-mode",
            choices=("default", "reduce-overhead", "max-autotune"),
            default="default",
            help="(default: %(default)s)",
        )
    precision = modes.add_parser(
        "precision",
        help="a trained model's NME in fp32, bf16 with the fp32 head (the default), and bf16 throughout",
        description="Predicts one split with one trained model three ways (no flip test) and reports the "
        "NME and how far the points move from fp32's, in input pixels: what keeping the regression head "
        "in fp32 under bf16 autocast buys.",
    )
    precision.add_argument(
        "--checkpoint", default="data/model/model.pt", help="trained model (default: %(default)s)"
    )
    precision.add_argument(
        "--parquet", default="data/parquet/test.parquet", help="split to predict (default: %(default)s)"
    )
    precision.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")

    predict = modes.add_parser(
        "predict",
        help="faces/s of `wflw predict` end to end (decode, detect, crop, model): PyTorch vs onnxruntime",
        description="Saves a real portrait (matplotlib's sample photo) as --images JPEGs of 480-1600 px and "
        "runs predict's whole path on them with the checkpoint in PyTorch and, exported and checked, in "
        "onnxruntime, in turns, --repeats times each; the detector and batch size are params predict.*.",
    )
    predict.add_argument(
        "--checkpoint", default="data/model/model.pt", help="trained model (default: %(default)s)"
    )
    predict.add_argument("--images", type=int, default=24, help="(default: %(default)s)")
    predict.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    predict.add_argument(
        "--work", default="data/bench/predict", help="folder for the photos and the ONNX file (%(default)s)"
    )

    start = modes.add_parser(
        "start",
        help="the start of a run, cold then warm (compile cache): phases to the first full-speed step",
        description="Runs the same short training job twice, each in a fresh process, sharing one compile "
        "cache folder that starts empty (cold, then warm), and times each run's phases from its launch: "
        "imports, device init, crops to the device, model build, first step (compile, cuDNN autotune), "
        "the steps to full speed, a checkpoint save. Sizes left unset: the reference config on CUDA "
        "(ResNet-50, 256 px, batch 512, 7,500 crops of 384 px, bf16), small elsewhere (ResNet-18, 64 px, "
        "batch 16, 64 crops of 96 px).",
    )
    start.add_argument("--arch", default=None, help="(default: resnet50 CUDA, resnet18 CPU)")
    start.add_argument("--input-size", type=int, default=None, help="(default: 256 CUDA, 64 CPU)")
    start.add_argument("--batch-size", type=int, default=None, help="(default: 512 CUDA, 16 CPU)")
    start.add_argument("--faces", type=int, default=None, help="crops in memory (default: 7500 CUDA, 64 CPU)")
    start.add_argument("--crop-size", type=int, default=None, help="(default: 384 CUDA, 96 CPU)")
    start.add_argument("--steps", type=int, default=None, help="steps per run (default: 40 CUDA, 20 CPU)")
    start.add_argument(
        "--tolerance", type=float, default=0.15, help="full speed: this near the steady step (%(default)s)"
    )
    start.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA"
    )
    start.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="(default: on)"
    )
    start.add_argument("--compile", choices=("on", "off"), default="on", help="(default: %(default)s)")
    start.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        default="default",
        help="(default: %(default)s)",
    )
    start.add_argument(
        "--work", default=None, help="folder for the scratch cache and checkpoint (default: system temp)"
    )
    start.add_argument("--keep", action="store_true", help="keep the scratch folder (compile cache, logs)")
    start.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuDNN's algorithm search on CUDA, as `wflw train` does (default: on)",
    )
    start.add_argument(
        "--run-timeout", type=float, default=900.0, help="seconds allowed per run (default: %(default)s)"
    )

    subs = [loader, step, epoch, precision, predict, start]
    for sub in subs:
        sub.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto")
        sub.add_argument("--out", default="data/bench", help="folder for <mode>.json (default: %(default)s)")
        add_params_options(sub)
    return bench
