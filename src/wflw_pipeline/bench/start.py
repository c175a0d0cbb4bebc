"""`wflw bench start`: where the start of a training run goes, cold (empty compile cache) and warm.

The same short job runs twice, each time in a fresh process (`python -m wflw_pipeline.bench.start`), both
pointed at one compile cache folder that starts empty: the first run compiles (cold), the second finds
what the first stored (warm). Each run times its phases from the moment the parent launched it:

    python start   interpreter start-up and this package's __init__ files
    imports        torch, torchvision and the modules training uses
    device init    the device's context (CUDA) and backends (cudnn.benchmark)
    host crops     random uint8 crops in host memory (dataset.random_faces), the form load_faces leaves
    data to device those crops moved to the training device (FaceSet.to)
    model build    DeepPose, Adam and the LR schedule as `wflw train` builds them; compiled as train does
    first step     the first training step: Dynamo, AOTAutograd and Inductor compile, cuDNN autotune
    to full speed  the steps after it until the first full-speed step
    checkpoint     torch.save of the model and optimiser state into the scratch folder

The job is the params file's training (model.*, train.*, loss.*, augment.*, convert's crop), its compile
cache a folder of its own. Each step is what `engine.train_one_epoch` runs (the next batch of
`engine.EpochBatches`, `engine.train_step`), timed alone (a device sync after each). The steady step
is the median of the second half of the steps; the first
full-speed step is the first one that, with the next two, is within `tolerance` of it. Time to the first
full-speed step = from launch to the end of that step. The compile time of the first step is split with
`torch._dynamo.utils.compile_times()` into Dynamo (tracing, guards), AOTAutograd (joint graph, partition,
cache look-up) and Inductor (code generation and compilation, or loading from the cache), and the
Inductor FX graph and AOTAutograd cache hits and misses are read from `torch._dynamo.utils.counters`.

Nothing heavy is imported at module level: a child's import time is one of the phases it measures.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..params import Params

PHASES = (
    ("python_start", "python start"),
    ("imports", "imports"),
    ("device_init", "device init"),
    ("host_crops", "host crops"),
    ("data_to_device", "data to device"),
    ("model_build", "model build"),
    ("first_step", "first step"),
    ("to_full_speed", "to full speed"),
    ("checkpoint", "checkpoint"),
)
"""(JSON key, table label) of each phase, in the order a run goes through them."""

RUNS = ("cold", "warm")
FULL_SPEED_RUN = 3
"""A step is at full speed when it and the next FULL_SPEED_RUN - 1 steps are within the tolerance."""

COMPILE_KEYS = {
    "dynamo_total": "_compile.compile_inner",
    "backend": "OutputGraph.call_user_compiler",
    "inductor_forward": "compile_fx.<locals>.fw_compiler_base",
    "inductor_backward": "compile_fx.<locals>.bw_compiler",
    "inductor_cache_load": "AOTAutogradCache.inductor_load",
}
"""The `compile_times()` entries the split is made of (seconds, summed over graphs)."""


def first_full_speed(
    times: list[float], steady: float, tolerance: float, run: int = FULL_SPEED_RUN
) -> int | None:
    """Index (0-based) of the first step that, with the next run - 1 (or all that remain), takes at most
    (1 + tolerance) x steady; None if no step does."""
    limit = (1.0 + tolerance) * steady
    for i in range(len(times)):
        if all(t <= limit for t in times[i : i + run]):
            return i
    return None


def compile_split(times: dict[str, float]) -> dict[str, float | None]:
    """Dynamo / AOTAutograd / Inductor seconds from aggregated `compile_times()`; None without a compile.

    Dynamo = its whole frame compile minus the backend call; Inductor = forward and backward graph
    compiles (the backward one runs at the first backward) or their load from the cache; AOTAutograd =
    the backend call minus Inductor's part of it.
    """
    get = {name: float(times.get(key, 0.0)) for name, key in COMPILE_KEYS.items()}
    if get["dynamo_total"] == 0.0:
        return {"dynamo_s": None, "aot_autograd_s": None, "inductor_s": None, "total_s": None}
    inductor_in_backend = get["inductor_forward"] + get["inductor_cache_load"]
    inductor = inductor_in_backend + get["inductor_backward"]
    return {
        "dynamo_s": get["dynamo_total"] - get["backend"],
        "aot_autograd_s": max(get["backend"] - inductor_in_backend, 0.0),
        "inductor_s": inductor,
        "total_s": get["dynamo_total"] + get["inductor_backward"],
    }


# --- the child: one run, in its own process ----------------------------------------------------------


def measure(config: dict[str, Any], launched: float) -> dict[str, Any]:
    """One run of the job `config` describes; `launched` is the parent's time.time() at the launch."""
    marks = {"launched": launched, "python_start": time.time()}
    import torch
    import torchvision  # noqa: F401  (the model's import, counted here)
    from torch._dynamo.utils import compile_times, counters

    from ..core import engine, runtime
    from ..core.losses import loss_from_params
    from ..core.model import save_atomic
    from ..data.dataset import iters_per_epoch, random_faces
    from ..params import Params
    from .common import build_training, endless_batches, peak_memory, synchronize, training_device

    marks["imports"] = time.time()
    params = Params.from_dict(config["params"])
    train = params.train
    if train.threads:
        torch.set_num_threads(train.threads)  # as `wflw train` does
    device, precision = training_device(train)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)
    if not config["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = False
    synchronize(device)
    marks["device_init"] = time.time()

    faces = config["faces"]
    host = random_faces(faces, params.convert.crop_size, params.convert.context, torch.device("cpu"))
    marks["host_crops"] = time.time()
    on_device = host.to(device)
    synchronize(device)
    marks["data_to_device"] = time.time()

    iters = iters_per_epoch(faces, train.batch_size, drop_last=train.drop_last)
    model, optimizer, scheduler = build_training(params, device, precision, iters)
    model.train()
    step_model = runtime.compile_model(model, train.compile_cache) if train.compile else model
    loss_fn = loss_from_params(params.loss, params.model.input_size)
    batches = endless_batches(on_device, params, precision)
    synchronize(device)
    marks["model_build"] = time.time()

    times: list[float] = []
    ends: list[float] = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        inputs, targets = next(batches)
        last = engine.train_step(step_model, optimizer, scheduler, loss_fn, inputs, targets, precision)
        synchronize(device)
        times.append(time.perf_counter() - start)
        ends.append(time.time())
    marks["first_step"] = ends[0]
    steady = statistics.median(times[len(times) // 2 :])
    full = first_full_speed(times, steady, config["tolerance"])
    if full is not None:
        marks["to_full_speed"] = ends[full]

    checkpoint = Path(config["work_dir"]) / "checkpoint.pt"
    start = time.perf_counter()
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    checkpoint_s = time.perf_counter() - start

    phases: dict[str, float | None] = {}
    previous = "launched"
    for key, _label in PHASES[:-1]:
        phases[f"{key}_s"] = marks[key] - marks[previous] if key in marks else None
        previous = key
    phases["checkpoint_s"] = checkpoint_s
    compile_s = {
        name: float(value) for name, value in zip(*compile_times("csv", aggregate=True), strict=True)
    }
    split = compile_split(compile_s if train.compile else {})
    return {
        "phases": phases,
        "step_times_s": times,
        "steady_step_s": steady,
        "first_full_speed_step": None if full is None else full + 1,  # 1-based
        "time_to_full_speed_s": marks["to_full_speed"] - launched if full is not None else None,
        "first_step_outside_compile_s": times[0] - (split["total_s"] or 0.0) - steady,
        "compile": split,
        "compile_times_s": compile_s,
        "cache": {
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "fxgraph_cache_bypass": counters["inductor"]["fxgraph_cache_bypass"],
            "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
            "autograd_cache_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
            "graphs": counters["stats"]["unique_graphs"],
        },
        "cache_dir": train.compile_cache if train.compile else None,
        "checkpoint_mb": checkpoint.stat().st_size / 1e6,
        "loss_finite": bool(torch.isfinite(last).item()),
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": device.type == "cuda" and torch.backends.cudnn.benchmark,
        **peak_memory(device),
    }


# --- the parent: both runs, the table and start.json --------------------------------------------------


def run_start(
    *,
    params: Params,
    faces: int | None,
    steps: int | None,
    tolerance: float,
    cudnn_benchmark: bool,
    work_dir: Path | None,
    keep: bool,
    timeout_s: float,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Run the params' training job cold then warm, each in a fresh process, sharing a compile cache that
    starts empty.

    `faces` crops in memory (default data.synthetic.train_faces), `steps` steps (default 40 on CUDA, 20
    elsewhere). The cache and the checkpoint go to a new folder under `work_dir` (default: the system's
    temporary folder), removed afterwards unless `keep`. `cudnn_benchmark=False` turns off the cuDNN
    algorithm search `wflw train` does on CUDA (to see what it costs the first step). Writes start.json
    into `out_dir`; returns its content.
    """
    from .. import fileio
    from ..core.runtime import resolve_device, resolve_precision
    from ..tables import format_table
    from .common import header, require, write_result

    train = params.train
    device = resolve_device(train.device)
    cuda = device.type == "cuda"
    config: dict[str, Any] = {
        "arch": params.model.arch,
        "input_size": params.model.input_size,
        "batch_size": train.batch_size,
        "faces": faces or params.data.synthetic.train_faces,
        "crop_size": params.convert.crop_size,
        "context": params.convert.context,
        "steps": steps or (40 if cuda else 20),
        "tolerance": tolerance,
        "channels_last": train.channels_last,
        "compile": train.compile,
        "cudnn_benchmark": cudnn_benchmark,
    }
    require(config["steps"] >= 2, "--steps must be >= 2")
    require(1 <= config["batch_size"] <= config["faces"], "need 1 <= train.batch_size <= --faces")
    require(tolerance > 0, "--tolerance must be > 0")
    precision = resolve_precision(train.precision, train.channels_last, device)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="wflw_bench_start.", dir=work_dir))
    config["work_dir"] = str(scratch)
    cache = str(scratch / "compile_cache")  # new, so empty: the first run is cold
    config["params"] = replace(params, train=replace(train, compile_cache=cache)).to_dict()
    config["tmp_dir"] = str(scratch / "tmp")
    Path(config["tmp_dir"]).mkdir()
    result: dict[str, Any] = {
        **header("start", device, command),
        "complete": False,
        **{k: v for k, v in config.items() if k not in ("params", "work_dir", "tmp_dir")},
        "precision": precision.name,
        "full_speed_rule": f"the first step that, with the next {FULL_SPEED_RUN - 1}, takes at most "
        f"(1 + tolerance) x the steady step (median of the second half)",
        "runs": [],
    }
    try:
        for name in RUNS:
            run = _launch(config, scratch / f"{name}.json", timeout_s)
            result["runs"].append({"run": name, **run})
            fileio.write_json(Path(out_dir) / "start.json", result)  # kept if the warm run fails
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    cold, warm = result["runs"]
    if cold["time_to_full_speed_s"] is not None and warm["time_to_full_speed_s"] is not None:
        result["warm_saves_s"] = cold["time_to_full_speed_s"] - warm["time_to_full_speed_s"]
    else:
        result["warm_saves_s"] = None
    result["complete"] = True
    title = (
        f"\nstart: {config['arch']} {config['input_size']}x{config['input_size']}, batch "
        f"{config['batch_size']}, {result['precision']}, "
        f"{'channels_last' if config['channels_last'] else 'contiguous'}, compile "
        f"{'on' if config['compile'] else 'off'}, {config['faces']} crops of "
        f"{config['crop_size']} px, "
        f"{config['steps']} steps, on {device}; seconds from launch unless stated"
    )
    write_result(out_dir, "start", result, f"{title}\n{format_table(['', *RUNS], _rows(cold, warm))}")
    return result


def _rows(cold: dict[str, Any], warm: dict[str, Any]) -> list[list[Any]]:
    """The table: phases, totals, the compile split and the cache counters of both runs."""
    both = (cold, warm)
    rows: list[list[Any]] = [[label, *(r["phases"][f"{key}_s"] for r in both)] for key, label in PHASES]
    rows += [
        ["= to first full-speed step", *(r["time_to_full_speed_s"] for r in both)],
        ["first full-speed step (#)", *(r["first_full_speed_step"] for r in both)],
        ["steady step ms", *(1000 * r["steady_step_s"] for r in both)],
        ["compile: Dynamo", *(r["compile"]["dynamo_s"] for r in both)],
        ["compile: AOTAutograd", *(r["compile"]["aot_autograd_s"] for r in both)],
        ["compile: Inductor", *(r["compile"]["inductor_s"] for r in both)],
        ["first step outside compile", *(r["first_step_outside_compile_s"] for r in both)],
        ["FX graph cache hit/miss/bypass", *(_counts(r["cache"], "fxgraph_cache") for r in both)],
        ["AOTAutograd cache hit/miss/bypass", *(_counts(r["cache"], "autograd_cache") for r in both)],
        ["checkpoint MB", *(r["checkpoint_mb"] for r in both)],
    ]
    return rows


def _counts(cache: dict[str, int], name: str) -> str:
    return "/".join(str(cache[f"{name}_{kind}"]) for kind in ("hit", "miss", "bypass"))


def _launch(config: dict[str, Any], result_path: Path, timeout_s: float) -> dict[str, Any]:
    """One run in a fresh `python -m wflw_pipeline.bench.start` process; its result."""
    from .common import BenchError

    config_path = result_path.with_suffix(".config.json")
    config_path.write_text(json.dumps(config))
    source = str(Path(__file__).resolve().parents[2])  # the folder holding wflw_pipeline
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    # torch also keeps things under the temporary folder (Inductor's precompiled C++ headers, the default
    # cache): a fresh one, shared by both runs, so that the cold run finds nothing from earlier ones
    env["TMPDIR"] = config["tmp_dir"]
    launched = time.time()
    argv = [sys.executable, "-m", f"{__package__}.start"]
    argv += [str(config_path), str(result_path), repr(launched)]
    try:
        done = subprocess.run(argv, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"bench start: the {result_path.stem} run took over {timeout_s:.0f} s") from None
    if done.returncode != 0 or not result_path.is_file():
        raise BenchError(f"bench start: the {result_path.stem} run failed (exit code {done.returncode})")
    run = json.loads(result_path.read_text())
    run["process_s"] = time.time() - launched
    return run


def _child(argv: list[str]) -> int:
    """`python -m wflw_pipeline.bench.start CONFIG.json RESULT.json LAUNCHED`: one run, its JSON."""
    config_path, result_path, launched = argv
    config = json.loads(Path(config_path).read_text())
    result = measure(config, float(launched))
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
