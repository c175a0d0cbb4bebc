"""`wflw bench`: its argument parser and the dispatch to the benchmark of each mode.

The top-level `wflw` parser knows `bench` by name only and hands the rest of the command line to
`build_parser` here, so no stage loads this file; the benchmark modules load only when one runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..params import Params, add_params_options

BENCH_PARAMS = "configs/deeppose_res50_wingloss_wflw.yaml"
"""The params file `wflw bench` reads unless --params names another: the reference configuration."""


def run(params: Params, args: argparse.Namespace, command: str) -> None:
    """Run the benchmark `args.bench` with the parsed options; `command` is recorded in its JSON."""
    common = {"params": params, "out_dir": Path(args.out), "command": command}
    if args.bench == "start":
        from .start import run_start

        run_start(
            **common,
            faces=args.faces,
            steps=args.steps,
            tolerance=args.tolerance,
            cudnn_benchmark=args.cudnn_benchmark,
            work_dir=Path(args.work) if args.work else None,
            keep=args.keep,
            timeout_s=args.run_timeout,
        )
    elif args.bench == "loader":
        from .loader import run_loader

        run_loader(
            **common,
            faces=args.faces,
            batches=args.batches,
            warmup=args.warmup,
            repeats=args.repeats,
            workers=args.workers,
            work_dir=Path(args.work),
        )
    elif args.bench == "predict":
        from .predict import run_predict

        run_predict(
            out_dir=Path(args.out),
            command=command,
            checkpoint=Path(args.checkpoint),
            config=params.predict,
            images=args.images,
            repeats=args.repeats,
            work_dir=Path(args.work),
        )
    elif args.bench == "precision":
        from .precision import run_precision

        run_precision(**common, checkpoint=Path(args.checkpoint), parquet=Path(args.parquet))
    elif args.bench == "ab":
        from .ab import parse_variant, run_ab

        run_ab(
            params_file=Path(args.params),
            overrides=args.overrides,
            variants=[parse_variant(tokens) for tokens in args.variants],
            parquet=Path(args.parquet),
            work_dir=Path(args.work),
            out_dir=Path(args.out),
            command=command,
        )
    elif args.bench == "train-step":
        from .step import run_train_step

        run_train_step(
            **common,
            variants=args.variants,
            batch_sizes=args.batch_sizes,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            peak=args.peak_tflops,
        )
    else:
        from .epoch import run_epoch

        run_epoch(**common, faces=args.faces, epochs=args.epochs)


TRAIN_STEP_DESCRIPTION = """\
Times the training step of DeepPose (engine.train_step: forward under autocast, loss, backward, Adam,
the LR schedule) on random inputs already on the device, in variants that keep its semantics: each
variant at each batch size is built (and compiled) first, then all are timed in turns
(A, B, C, A, B, C, ...) on the same inputs; the first is the baseline of the ratios. FLOPs are counted
with FlopCounterMode (one forward; training = 3x); MFU = achieved / the GPU's dense bf16 peak (a table
by device name, or --peak-tflops).

A variant is a base, optionally followed by options, joined by "+" (e.g. compile+conv1x1+coord):
  eager        engine.train_step, the model not compiled
  compile      engine.train_step on the model compiled as train compiles it, static shapes
  graph-step   the whole step (forward, loss, backward, fused capturable Adam) of the compiled model as
               one CUDA graph, replayed; the lr a device tensor the LambdaLR schedule rewrites (CUDA only)
  graph-eager  graph-step around the model not compiled (CUDA only)
options (compile and graph-step):
  conv1x1      Inductor conv_1x1_as_mm: 1x1 convolutions as matmuls
  coord        Inductor coordinate_descent_tuning: Triton launch configurations tuned at first run
  autotune     Inductor max_autotune, no CUDA graphs (+coord = mode max-autotune-no-cudagraphs)
  cudagraphs   Inductor triton.cudagraphs (mode reduce-overhead; CUDA only, not with graph-step)
Off CUDA, CUDA-only variants are listed as not run, with the reason. Without --variants: the step as
train.compile runs it (compile or eager); without --batch-sizes: at train.batch_size. The model, sizes,
precision, loss, optimiser and schedule are the params file's (--params, --set).
"""


def _sizes(text: str) -> list[int]:
    """`256,384,512` -> [256, 384, 512]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of `wflw bench MODE [options]`: each mode's own measurement options, and params."""
    bench = argparse.ArgumentParser(
        prog="wflw bench",
        description="Measure the data path, the training step, whole epochs, the start-up (cold and warm "
        "compile cache) and bf16's cost in NME on this machine. Each mode prints a table and writes "
        "<mode>.json into --out. What params define (model, sizes, batch, device, precision, compile, "
        f"loss, augmentation, optimiser, schedule) comes from the params file, {BENCH_PARAMS} unless "
        "--params names another, with --set overrides. Nothing here asserts a speed.",
    )
    modes = bench.add_subparsers(dest="bench", required=True, metavar="MODE")
    loader = modes.add_parser(
        "loader",
        help="our on-device batch augmentation vs a reference-style per-sample DataLoader",
        description="Generates synthetic WFLW (data.synthetic.*) in --work (reused when the settings "
        "match), extracts the original images for the baseline and converts them (convert.*) for ours, then "
        "times both loaders on the same faces, train.batch_size and augment.*, in one run.",
    )
    loader.add_argument("--faces", type=int, default=300, help="faces generated (default: %(default)s)")
    loader.add_argument(
        "--batches", type=int, default=20, help="timed batches per repeat (default: %(default)s)"
    )
    loader.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: %(default)s)")
    loader.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    loader.add_argument(
        "--workers", type=int, default=None, help="baseline DataLoader workers (default: cores)"
    )
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
        help="variants of the step to time in turns, the first the baseline (see above; default: "
        "compile if train.compile, else eager)",
    )
    step.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=None,
        metavar="B1,B2,...",
        help="time every variant at each of these batch sizes, all in turns (default: train.batch_size)",
    )

    epoch = modes.add_parser(
        "epoch",
        help="whole epochs of engine.train_one_epoch on in-memory crops; projects the params' schedule",
        description="Trains whole epochs (data + step) on random in-memory crops as `wflw train` runs them "
        "and projects the schedule (train.epochs of data.synthetic.train_faces) at the steady speed.",
    )
    epoch.add_argument(
        "--faces", type=int, default=None, help="crops in memory (default: data.synthetic.train_faces)"
    )
    epoch.add_argument("--epochs", type=int, default=3, help="(default: %(default)s; the first warms up)")

    precision = modes.add_parser(
        "precision",
        help="a trained model's NME in fp32 and in bf16 autocast (fp32 head)",
        description="Predicts one split with one trained model in fp32 and in bf16 autocast (no flip test; "
        "evaluate.batch_size, evaluate.device) and reports the NME and how far the points move from "
        "fp32's, in input pixels.",
    )
    precision.add_argument(
        "--checkpoint", default="data/model/model.pt", help="trained model (default: %(default)s)"
    )
    precision.add_argument(
        "--parquet", default="data/parquet/test.parquet", help="split to predict (default: %(default)s)"
    )

    predict = modes.add_parser(
        "predict",
        help="faces/s of `wflw predict` end to end (decode, detect, crop, model): PyTorch vs onnxruntime",
        description="Saves a real portrait (matplotlib's sample photo) as --images JPEGs of 480-1600 px and "
        "runs predict's whole path on them with the checkpoint in PyTorch and, exported and checked, in "
        "onnxruntime, in turns, --repeats times each; the detector, batch size and device are params "
        "predict.*.",
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
        description="Runs the params' training job twice, each in a fresh process, sharing one compile "
        "cache folder that starts empty (cold, then warm), and times each run's phases from its launch: "
        "imports, device init, crops to the device, model build, first step (compile, cuDNN autotune), "
        "the steps to full speed, a checkpoint save.",
    )
    start.add_argument(
        "--faces", type=int, default=None, help="crops in memory (default: data.synthetic.train_faces)"
    )
    start.add_argument("--steps", type=int, default=None, help="steps per run (default: 40 CUDA, 20 CPU)")
    start.add_argument(
        "--tolerance", type=float, default=0.15, help="full speed: this near the steady step (%(default)s)"
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

    ab = modes.add_parser(
        "ab",
        help="what choices of params are worth in test NME: trainings A/B, paired bootstrap per face",
        description="Trains and evaluates the params (the baseline) and, with the same seeds on the same "
        "converted faces, the params with each --variant's overrides; compares each variant's per-face test "
        "NME with the baseline's by the gate's paired bootstrap (registry.bootstrap_samples, confidence, "
        "seed). Trainings go into --work/<name>/; a finished one of the same params and splits is reused.",
    )
    ab.add_argument(
        "--variant",
        dest="variants",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME KEY=VALUE",
        help="a name, then its overrides (repeatable), e.g. --variant mmpose_head model.head_init=normal",
    )
    ab.add_argument(
        "--parquet", default="data/parquet", help="the converted splits to train and test on (%(default)s)"
    )
    ab.add_argument("--work", default="data/bench/ab", help="folder for the trainings (default: %(default)s)")

    for sub in (loader, step, epoch, precision, predict, start, ab):
        sub.add_argument("--out", default="data/bench", help="folder for <mode>.json (default: %(default)s)")
        add_params_options(sub, default=BENCH_PARAMS)
    return bench
