"""`wflw <command>`: thin argument parsing over the pipeline's stages."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import PipelineError
from .params import Params, load_params

logger = logging.getLogger("wflw_pipeline")


def _fetch(params: Params, args: argparse.Namespace) -> None:
    from .fetch import run_fetch

    run_fetch(params.data, Path(args.out))


def _convert(params: Params, args: argparse.Namespace) -> None:
    from .convert import run_convert
    from .preview import write_preview

    out = Path(args.out)
    summary = run_convert(params.convert, Path(args.raw), out)
    logger.info("wrote %s: %s", out, summary["faces"])
    write_preview(out / "test.parquet", out / "preview.png")


def _train(params: Params, args: argparse.Namespace) -> None:
    from .train import Outputs, run_train

    metrics = run_train(params, Path(args.parquet), Outputs(Path(args.model_dir), Path(args.train_dir)))
    logger.info("train metrics: %s", metrics)


def _evaluate(params: Params, args: argparse.Namespace) -> None:
    from .evaluate import run_evaluate

    metrics = run_evaluate(params.evaluate, Path(args.checkpoint), Path(args.parquet), Path(args.out))
    logger.info("test NME %.3f %% (%d faces)", metrics["test"]["nme"], metrics["test"]["n"])


def _preview(params: Params, args: argparse.Namespace) -> None:
    from .preview import write_preview

    write_preview(Path(args.parquet), Path(args.out), per_row=args.per_row)
    logger.info("wrote %s", args.out)


def _bench(params: Params, args: argparse.Namespace) -> None:
    from . import bench

    out = Path(args.out)
    common = {"device_name": args.device, "out_dir": out, "command": " ".join(["wflw", *args.argv])}
    if args.bench == "loader":
        bench.run_loader(
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
        bench.run_train_step(
            **training,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            peak=args.peak_tflops,
        )
    else:
        bench.run_epoch(
            **training,
            augmentation=params.augment,
            faces=args.faces,
            crop_size=args.crop_size,
            context=args.context,
            epochs=args.epochs,
        )


def _add_bench_parser(commands: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    bench = commands.add_parser(
        "bench",
        help="performance benchmarks: loader, train-step, epoch (tables + JSON under data/bench)",
        description="Measure the data path, the training step and whole epochs on this machine. Each "
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
        help="forward + backward + Adam step: images/s with and without torch.compile, memory, MFU",
        description="Times the training step of DeepPose on random inputs already on the device. FLOPs "
        "are counted with FlopCounterMode (one forward; training = 3x); MFU = achieved / the GPU's dense "
        "bf16 peak (a table by device name, or --peak-tflops).",
    )
    step.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: 200 CUDA, 3 CPU)"
    )
    step.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 1 CPU)"
    )
    step.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    step.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name)")

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
    subs = [loader, step, epoch]
    for sub in subs:
        sub.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto")
        sub.add_argument("--out", default="data/bench", help="folder for <mode>.json (default: %(default)s)")
        sub.set_defaults(run=_bench)
    return subs


def _add_params_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set convert.crop_size=256 (repeatable; value parsed as YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wflw",
        description="WFLW landmark pipeline. fetch, convert, train and evaluate are the DVC stages "
        "(dvc.yaml runs them: `dvc repro`); params come from params.yaml, overridden by --set.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch",
        help="get the WFLW archives: download (wflw), copy (local) or generate (synthetic)",
        description="Stage fetch: writes WFLW_images.tar.gz, WFLW_annotations.tar.gz and "
        "manifest.json (source, bytes, SHA-256) into --out. Reads params data.*.",
    )
    fetch.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    fetch.set_defaults(run=_fetch)

    convert = commands.add_parser(
        "convert",
        help="archives -> Parquet face crops (train, val, test)",
        description="Stage convert: streams the archives in --raw, crops every face and writes "
        "{train,val,test}.parquet, summary.json and preview.png into --out. Reads params convert.*.",
    )
    convert.add_argument("--raw", default="data/raw", help="folder of the archives (default: %(default)s)")
    convert.add_argument("--out", default="data/parquet", help="output folder (default: %(default)s)")
    convert.set_defaults(run=_convert)

    train = commands.add_parser(
        "train",
        help="train DeepPose on the Parquet crops (GPU when there is one; DDP under torchrun)",
        description="Stage train: fits the model on train.parquet, selects the epoch on val.parquet "
        "(never on test), writes --model-dir/model.pt and --train-dir/{checkpoint.pt,history.csv,"
        "metrics.json}. Reads params model.*, loss.*, augment.*, train.*. Several GPUs or nodes: "
        "torchrun --nproc_per_node N -m wflw_pipeline.cli train.",
    )
    train.add_argument("--parquet", default="data/parquet", help="splits folder (default: %(default)s)")
    train.add_argument("--model-dir", default="data/model", help="(default: %(default)s)")
    train.add_argument("--train-dir", default="data/train", help="(default: %(default)s)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a trained model on the test split (and val): NME, FR, AUC per subset, plots",
        description="Stage evaluate: predicts --parquet's test.parquet (and val.parquet when it has rows) "
        "with --checkpoint, maps the points back to the original images and writes metrics.json, "
        "per_face.parquet, ced.csv, results.md, ced.png, nme_subsets.png and best_worst.png into --out. "
        "Reads params evaluate.*. Works on any checkpoint written by `wflw train`, inside DVC or not.",
    )
    evaluate.add_argument(
        "--checkpoint", default="data/model/model.pt", help="trained model file (default: %(default)s)"
    )
    evaluate.add_argument("--parquet", default="data/parquet", help="splits folder (default: %(default)s)")
    evaluate.add_argument("--out", default="data/eval", help="output folder (default: %(default)s)")
    evaluate.set_defaults(run=_evaluate)

    preview = commands.add_parser(
        "preview",
        help="PNG grid of sample faces with landmarks, one row per subset",
        description="Draws faces of a converted Parquet split with their 98 landmarks.",
    )
    preview.add_argument("--parquet", default="data/parquet/test.parquet", help="(default: %(default)s)")
    preview.add_argument("--out", default="data/parquet/preview.png", help="(default: %(default)s)")
    preview.add_argument("--per-row", type=int, default=8, help="faces per row (default: %(default)s)")
    preview.set_defaults(run=_preview)

    bench_modes = _add_bench_parser(commands)

    for sub in (fetch, convert, train, evaluate, preview, *bench_modes):
        _add_params_options(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[Params, argparse.Namespace], None] = args.run
    try:
        params = load_params(args.params, args.overrides)
        run(params, args)
    except PipelineError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
