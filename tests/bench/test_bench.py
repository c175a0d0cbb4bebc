"""`wflw bench`: every mode runs at tiny sizes and writes its documented JSON; the baseline is fair.

Benchmarks never assert a speed: these tests check what is measured and that both loaders produce the
same views of the same faces, not how fast.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import default_params
from paths import ROOT

from wflw_pipeline import cli, stage_code
from wflw_pipeline.bench import common, loader, step
from wflw_pipeline.core import engine, optim
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data import augment
from wflw_pipeline.data.dataset import load_faces

CROP, CONTEXT, INPUT = 96, 1.5, 64  # the view (96 / 1.5 = 64 px) maps 1:1 onto the input, as 384 -> 256
GREY = 57.4  # one unit of a normalised input is about this many grey levels (ImageNet std)
PADDING = default_params().convert.padding
TINY = ("--set", "model.input_size=32", "--set", "train.device=cpu")
"""params.yaml's ResNet-18 at 32 px on the CPU, for the CLI."""


def _tiny_params(**train):
    """params.yaml with ResNet-18 at 32 px on the CPU (and `train` overrides)."""
    base = default_params()
    return replace(
        base,
        model=replace(base.model, arch="resnet18", input_size=32),
        train=replace(base.train, device="cpu", **train),
    )


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory) -> loader.BenchData:
    work = tmp_path_factory.mktemp("bench")
    base = default_params()
    synthetic = replace(base.data.synthetic, min_image_size=160, max_image_size=220)
    params = replace(
        base,
        data=replace(base.data, synthetic=synthetic),
        convert=replace(base.convert, crop_size=CROP, context=CONTEXT),
    )
    return loader.prepare_data(work, params, faces=10)


def _both_loaders(data: loader.BenchData, params: augment.ViewParams):
    """Our batch and the reference-style per-sample batch of every face, seen through `params`."""
    faces = load_faces(data.parquet)
    n = len(faces)
    view = engine.View(faces.crop_size, faces.context, INPUT)
    ours = engine.inputs_and_targets(faces, torch.arange(n), view, params, Precision(None, False))
    paths, landmarks = data.records()
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=None, padding=PADDING, out_size=INPUT, views=params
    )
    samples = [dataset[i] for i in range(n)]
    baseline = tuple(torch.stack(parts) for parts in zip(*samples, strict=True))
    return ours, baseline


@pytest.mark.parametrize("views", ["identity", "random"])
def test_baseline_and_ours_produce_the_same_view_of_the_same_face(bench_data, views):
    n = len(bench_data.records()[0])
    if views == "identity":
        params = augment.identity_params(n, "cpu")
    else:
        params = augment.draw_params(n, generator=torch.Generator().manual_seed(3), device="cpu")
        assert params.flip.any() and (params.angle != 0).any()
    (ours_x, ours_y), (base_x, base_y) = _both_loaders(bench_data, params)
    assert base_x.shape == ours_x.shape == (n, 3, INPUT, INPUT)
    assert base_x.dtype == ours_x.dtype == torch.float32
    assert base_y.shape == ours_y.shape == (n, 98, 2) and base_y.dtype == ours_y.dtype
    # Targets: the same geometry, composed through the crop (ours) or straight from the image (baseline).
    assert (base_y - ours_y).abs().max().item() * INPUT < 1e-3
    # Pixels: ours went through one extra bilinear resampling and a JPEG (q95) round trip; both are
    # zero outside the image. A misplaced, mirrored or turned view would differ by tens of grey levels.
    per_face = (base_x - ours_x).abs().mean(dim=(1, 2, 3)) * GREY
    assert per_face.max().item() < 5.0, per_face
    assert np.corrcoef(base_x.flatten(), ours_x.flatten())[0, 1] > 0.99
    assert base_x.mean().item() == pytest.approx(ours_x.mean().item(), abs=0.02)
    assert base_x.std().item() == pytest.approx(ours_x.std().item(), rel=0.03)


def test_a_different_view_is_detected(bench_data):
    """The check above can fail: mirroring only the baseline's view breaks the agreement."""
    n = len(bench_data.records()[0])
    identity = augment.identity_params(n, "cpu")
    (ours_x, _), _ = _both_loaders(bench_data, identity)
    flipped = augment.ViewParams(
        torch.ones(n, dtype=torch.bool), identity.scale, identity.angle, identity.shift
    )
    _, (base_x, _) = _both_loaders(bench_data, flipped)
    assert (base_x - ours_x).abs().mean().item() * GREY > 5.0


def test_baseline_draws_a_new_augmentation_per_sample(bench_data):
    paths, landmarks = bench_data.records()
    augmentation = default_params().augment
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=augmentation, padding=PADDING, out_size=INPUT
    )
    first, second = dataset[0], dataset[0]
    assert not torch.equal(first[0], second[0])
    plain = loader.ReferenceStyleDataset(paths, landmarks, augmentation=None, padding=PADDING, out_size=INPUT)
    assert torch.equal(plain[0][0], plain[0][0])


def test_baseline_loader_batches_like_ours(bench_data):
    paths, landmarks = bench_data.records()
    augmentation = default_params().augment
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=augmentation, padding=PADDING, out_size=INPUT
    )
    batches = list(
        loader.baseline_loader(dataset, batch_size=4, batches=3, workers=1, pin_memory=False, seed=0)
    )
    assert len(batches) == 3
    assert all(x.shape == (4, 3, INPUT, INPUT) and y.shape == (4, 98, 2) for x, y in batches)


def _run(words: str, *extra: str) -> None:
    """`wflw <words> <extra...>` with the repository's params.yaml; must exit 0."""
    assert cli.main([*words.split(), *extra, "--params", str(ROOT / "params.yaml")]) == 0


def _tiny_step(out_dir: Path, batch_size: int = 2, **options) -> dict:
    """`step.run_train_step` of resnet18 at 32 px on the CPU with params.yaml's loss and train.*."""
    measurement = {"variants": None, "batch_sizes": None, "peak": None, "command": None, **options}
    return step.run_train_step(params=_tiny_params(batch_size=batch_size), out_dir=out_dir, **measurement)


def test_loader_bench_writes_its_json(tmp_path, capsys):
    out = tmp_path / "out"
    _run(
        "bench loader --faces 6 --batches 2 --warmup 1 --repeats 2 --workers 1 --set train.batch_size=3 "
        "--set data.synthetic.min_image_size=128 --set data.synthetic.max_image_size=160 "
        "--set convert.crop_size=48",
        *TINY,
        *["--work", str(tmp_path / "work"), "--out", str(out)],
    )
    result = json.loads((out / "loader.json").read_text())
    assert result["mode"] == "loader" and result["faces"] == 6 and result["batch_size"] == 3
    assert result["command"].startswith("wflw bench loader")
    assert {"date", "cpu_model", "cpus", "torch", "device"} <= set(result["machine"])
    for side in ("ours", "baseline"):
        assert len(result[side]["runs_images_per_s"]) == 2
        assert result[side]["images_per_s"] == pytest.approx(np.median(result[side]["runs_images_per_s"]))
    assert result["baseline"]["workers"] == 1
    assert result["ratio"] == pytest.approx(
        result["ours"]["images_per_s"] / result["baseline"]["images_per_s"]
    )
    assert result["image_size_px"]["min"] >= 128 and result["image_size_px"]["max"] <= 160
    assert "| ours (on-device batch warp)" in capsys.readouterr().out
    # a second run reuses the generated data
    assert (tmp_path / "work" / "bench_data.json").is_file()


def test_train_step_bench_writes_its_json(tmp_path):
    out = tmp_path / "out"
    _run(
        "bench train-step --steps 2 --warmup 1 --repeats 2 --set train.batch_size=2",
        *TINY,
        *["--out", str(out)],
    )
    result = json.loads((out / "train_step.json").read_text())
    assert result["mode"] == "train-step" and result["arch"] == "resnet18" and result["batch_size"] == 2
    assert result["precision"] == "fp32" and result["peak_tflops"] is None
    assert result["train_gflop_per_image"] == pytest.approx(3 * result["forward_gflop_per_image"])
    [run] = result["runs"]
    assert run["compile"] is False and run["mfu"] is None and run["loss_finite"] is True
    assert len(run["runs_images_per_s"]) == 2 and run["images_per_s"] > 0
    assert run["achieved_tflops"] == pytest.approx(
        result["train_gflop_per_image"] * run["images_per_s"] / 1000, rel=1e-6
    )
    assert run["peak_memory_gib"] > 0 and run["memory_kind"] == "process_peak_rss"


def test_train_step_mfu_uses_the_given_peak(tmp_path):
    result = _tiny_step(
        tmp_path,
        batch_size=2,
        steps=1,
        warmup=0,
        repeats=1,
        peak=1.0,
    )
    run = result["runs"][0]
    assert result["peak_source"] == "--peak-tflops"
    assert run["mfu"] == pytest.approx(run["achieved_tflops"] / 1.0)


def test_train_step_bench_times_engine_train_step_with_the_training_schedule(tmp_path, monkeypatch):
    """The timed step is engine.train_step (what train_one_epoch runs), with train.*'s LambdaLR schedule."""
    params = _tiny_params(batch_size=2)
    calls = []
    real_step = engine.train_step

    def counting(model, optimizer, scheduler, loss_fn, inputs, targets, precision):
        calls.append(scheduler)
        return real_step(model, optimizer, scheduler, loss_fn, inputs, targets, precision)

    monkeypatch.setattr(engine, "train_step", counting)
    _tiny_step(
        tmp_path,
        batch_size=2,
        steps=2,
        warmup=2,
        repeats=3,
    )
    assert len(calls) == 2 + 3 * 2  # warm-up (the first step included), then steps x repeats
    scheduler = calls[0]
    assert all(s is scheduler for s in calls)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.last_epoch == len(calls)
    factor = optim.lr_factor(params.train, params.data.synthetic.train_faces // 2)
    assert scheduler.get_last_lr()[0] == pytest.approx(params.train.lr * factor(len(calls)))


def test_bench_is_in_no_stage_and_its_own_closure_holds_the_engine():
    """Other stages never depend on bench (dvc deps, train's code digest); `wflw bench` runs engine.py."""
    package = ROOT / "src" / "wflw_pipeline"
    for stage in ("fetch", "convert", "train", "evaluate", "preview"):
        assert not [p for p in stage_code.stage_sources(stage) if "bench" in p.relative_to(package).parts]
    own = {str(p.relative_to(package)) for p in stage_code.stage_sources("bench")}
    expected = {"bench/__init__.py", "bench/cli.py", "bench/common.py", "bench/loader.py", "bench/step.py"}
    assert expected | {"bench/epoch.py", "core/engine.py", "core/optim.py"} <= own
    assert "train.py" not in own


def test_epoch_bench_writes_its_json_and_projects_the_reference_schedule(tmp_path):
    out = tmp_path / "out"
    _run(
        "bench epoch --faces 10 --epochs 2 --set train.batch_size=4 --set convert.crop_size=48",
        *TINY,
        *["--out", str(out)],
    )
    result = json.loads((out / "epoch.json").read_text())
    assert result["mode"] == "epoch" and result["compile"] is False
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    assert all(row["images"] == 8 for row in result["epochs"])  # drop_last: 2 full batches of 4
    assert result["images_per_s"] == pytest.approx(result["epochs"][1]["images_per_s"])
    params = default_params()  # the schedule of params.yaml: 20 epochs of 1,500 faces (375 batches of 4)
    epochs, faces = params.train.epochs, params.data.synthetic.train_faces
    assert result["reference"] == {"faces": faces, "epochs": epochs, "images": epochs * faces}
    assert result["projected_reference_s"] == pytest.approx(epochs * faces / result["images_per_s"])
    assert result["projected_reference_with_warmup_s"] >= result["projected_reference_s"]


def test_resnet50_forward_at_256_is_10_7_gflop():
    flops = step.forward_flops("resnet50", 256)
    # by hand, not bench's own constant: 4.1 GMAC at 224 px x (256 / 224)^2 x 2 FLOP per MAC = 10.71 GFLOP
    assert flops == pytest.approx(10.7e9, rel=0.05)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 3060", None),
    ],
)
def test_peak_flops_table_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    bf16 = Precision(torch.bfloat16, True)
    assert step.peak_tflops(torch.device("cuda"), bf16, None)[0] == peak
    assert step.peak_tflops(torch.device("cuda"), Precision(None, True), None)[0] is None
    assert step.peak_tflops(torch.device("cpu"), bf16, None) == (None, "n/a on CPU (give --peak-tflops)")


def test_the_gpu_path_imports_only_the_torch_stack():
    """gpu_check.sh runs on a box with the torch stack only: nothing it calls may import these."""
    code = (
        "import sys; from wflw_pipeline import cli, train, evaluate, convert; "
        "from wflw_pipeline.data import synthetic; from wflw_pipeline.core import engine; "
        "from wflw_pipeline.bench import cli as bench_cli, common, epoch, loader, step; "
        "cli.build_parser(); bench_cli.build_parser(); "
        "bad = [m for m in ('requests', 'gdown', 'dvc', 'mlflow', 'prefect') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_format_table_aligns_columns():
    table = common.format_table(["a", "bb"], [[1.0, None], ["long", 12345.0]]).splitlines()
    assert table[0] == "| a    | bb     |"
    assert table[2] == "| 1    | n/a    |"
    assert table[3] == "| long | 12,345 |"


# The performance changes to augment.py and engine.py keep their results: checked against the plain forms.


def _plain_warp(images, matrices, out_size, mean, std):
    """augment.warp as one affine_grid + grid_sample over the whole batch, then (x - mean) / std."""
    theta = augment._grid_theta(matrices.float(), tuple(images.shape[-1:-3:-1]), out_size)
    grid = torch.nn.functional.affine_grid(theta, [len(images), 3, out_size, out_size], align_corners=False)
    sampled = torch.nn.functional.grid_sample(images.float(), grid, align_corners=False)
    return (sampled - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("batch", [1, 5, 9])
def test_chunked_warp_with_index_and_out_matches_the_plain_form(batch):
    generator = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (12, 3, 40, 40), dtype=torch.uint8, generator=generator)
    index = torch.randint(0, 12, (batch,), generator=generator)
    params = augment.draw_params(batch, generator=generator, device="cpu")
    matrices = augment.view_matrices(params, 40, 1.5, 24)
    mean, std = engine.IMAGENET.mean, engine.IMAGENET.std
    expected = _plain_warp(images[index], matrices, 24, mean, std)
    plain = augment.warp(images[index], matrices, 24, mean, std)
    assert torch.allclose(plain, expected, atol=1e-4)
    out = torch.full((batch, 3, 24, 24), float("nan")).contiguous(memory_format=torch.channels_last)
    written = augment.warp(images, matrices, 24, mean, std, torch.channels_last, out=out, index=index)
    assert written is out and written.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(written, plain)
    with pytest.raises(ValueError, match="out must be float32"):
        augment.warp(images[index], matrices, 24, mean, std, out=torch.empty(batch, 3, 23, 24))


def test_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    for size in (1, 7, 64):
        expected = torch.nn.functional.affine_grid(theta, [6, 3, size, size], align_corners=False)
        assert torch.allclose(augment._affine_grid(theta, size), expected, atol=1e-6)


def test_augment_batch_with_index_equals_indexing_first():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8, generator=generator)
    landmarks = 12 + 24 * torch.rand(6, 98, 2, generator=generator)
    index = torch.tensor([4, 0, 4, 2])
    params = augment.draw_params(4, generator=generator, device="cpu")
    options = {"params": params, "crop_size": 48, "context": 1.5, "out_size": 32, "mean": (1, 2, 3)}
    options["std"] = (4, 5, 6)
    lazy = augment.augment_batch(images, landmarks, index=index, **options)
    eager = augment.augment_batch(images[index], landmarks[index], **options)
    assert torch.equal(lazy[0], eager[0]) and torch.equal(lazy[1], eager[1])


def test_small_constants_are_made_once_per_device():
    first = augment.flip_permutation("cpu")
    assert first is augment.flip_permutation(torch.device("cpu"))
    # What it holds, checked against WFLW.md's table of the 98 points rather than against wflw.FLIP:
    assert first.dtype == torch.long and torch.equal(first[first], torch.arange(98))  # an involution
    assert first[:33].tolist() == list(range(32, -1, -1))  # contour: temple to temple, reversed
    assert sorted(first[60:68].tolist()) == list(range(68, 76))  # image-left eye onto image-right eye
    assert (first[60].item(), first[64].item()) == (72, 68)  # outer corner to outer, inner to inner
    centre_line = [16, 51, 52, 53, 54, 57, 79, 85, 90, 94]  # chin, nose bridge and centre, lip centres
    assert first[centre_line].tolist() == centre_line
    assert first[[76, 88, 96]].tolist() == [82, 92, 97]  # lip corners and pupils swap sides


BLOCKER = """
import importlib.abc, sys

class _TorchStackOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"requests", "gdown", "dvc", "mlflow", "prefect"}:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU box has the torch stack only)")
        return None

sys.meta_path.insert(0, _TorchStackOnly())
"""


def _gpu_check_smoke(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh` (plus `env`) with the orchestration stack blocked
    from importing, results in tmp_path/out; it must exit 0."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path / "block"),
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "GPU_CHECK_SMOKE": "1",
        **env,
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_with_the_torch_stack_only(tmp_path):
    """scripts/gpu_check.sh with every size shrunk, where requests, dvc, mlflow and prefect cannot import."""
    done = _gpu_check_smoke(tmp_path)
    assert "non-torch-stack modules imported: none" in done.stdout
    produced = {p.name for p in (tmp_path / "out").iterdir()}
    expected = {
        "train_step.json",
        "epoch.json",
        "loader.json",
        "pipeline_history.csv",
        "pipeline_metrics.json",
        "start.json",
    }
    assert expected | {"gpu_check.log"} <= produced and len(produced) <= 8  # $OUT returns at most 8 files
    assert json.loads((tmp_path / "out" / "train_step.json").read_text())["complete"] is True


# train-step A/B (issue 12): variants of the step, timed in turns; each keeps engine.train_step's semantics.

AB_STEPS, AB_BATCH, AB_INPUT = 4, 4, 32


def _ab_batch(precision):
    return step._random_batch(AB_BATCH, AB_INPUT, torch.device("cpu"), precision)


def _reference_training(precision, *, evaluation=False, schedule=True):
    """AB_STEPS of engine.train_step as `wflw train` builds it: (initial state, final state, losses, lr).

    evaluation / schedule=False: the same with BatchNorm in eval mode / without the LR schedule, the
    semantic changes the comparison below must detect."""
    params = _tiny_params()
    inputs, targets = _ab_batch(precision)
    model, optimizer, scheduler = common.build_training(
        params, torch.device("cpu"), precision, 7500 // AB_BATCH
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(not evaluation)
    loss_fn = step.loss_from_params(params.loss, AB_INPUT)
    scheduler = scheduler if schedule else step.UNSCHEDULED
    losses = [
        engine.train_step(model, optimizer, scheduler, loss_fn, inputs, targets, precision).item()
        for _ in range(AB_STEPS)
    ]
    return initial, model, losses, float(optimizer.param_groups[0]["lr"])


def _differences(reference, model, losses):
    """Largest relative loss difference over the steps; relative L2 difference of the parameter update
    and of the BatchNorm running-statistics update (both over all tensors)."""
    initial, expected, expected_losses, _ = reference
    names = {name for name, _ in expected.named_parameters()}
    got, want = model.state_dict(), expected.state_dict()

    def update_difference(keys):
        keys = [k for k in keys if want[k].is_floating_point()]
        num = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in keys)
        den = sum(((want[k].double() - initial[k].double()) ** 2).sum() for k in keys)
        return float((num / den).sqrt())

    loss = max(abs(a - b) / abs(b) for a, b in zip(losses, expected_losses, strict=True))
    return loss, update_difference(names), update_difference(set(want) - names)


def _same_training(differences):
    """fp32 on the CPU. The measured gaps of `compile`: loss 6e-7, parameter update 0.06 (Adam's first
    updates are ~lr x sign(gradient): a gradient near zero that differs in the last bits flips its
    element's step), running statistics 1e-4; without the schedule: 0.13, 0.98, 0.06; BatchNorm in eval
    mode: 0.07, 1.5, 1.0."""
    loss, parameters, statistics = differences
    return loss < 1e-4 and parameters < 0.25 and statistics < 1e-3


def _variant_training(name, precision):
    params = _tiny_params(batch_size=AB_BATCH)
    synthetic = replace(params.data.synthetic, train_faces=7500)  # the schedule _reference_training steps
    params = replace(params, data=replace(params.data, synthetic=synthetic))
    inputs, targets = _ab_batch(precision)
    pair = step.prepare(
        step.parse_variant(name),
        params=params,
        device=torch.device("cpu"),
        precision=precision,
        loss_fn=step.loss_from_params(params.loss, AB_INPUT),
        inputs=inputs,
        targets=targets,
        warmup=1,
    )
    losses = [loss.item() for loss in pair.setup_losses] + [pair.step().item() for _ in range(AB_STEPS - 1)]
    return pair, losses


@pytest.mark.parametrize(
    "name",
    [
        "eager",
        pytest.param("compile", marks=pytest.mark.slow),
        pytest.param("compile+conv1x1", marks=pytest.mark.slow),
        pytest.param("compile+coord", marks=pytest.mark.slow),
        pytest.param("compile+autotune", marks=pytest.mark.slow),
        pytest.param("compile+autotune+coord", marks=pytest.mark.slow),
    ],
)
def test_each_cpu_variant_trains_as_engine_train_step(name):
    """Same seed, same inputs, 4 steps: the variant's losses, parameters, BatchNorm statistics and lr
    match engine.train_step's (fp32; compiling takes ~10-50 s per variant, hence slow)."""
    fp32 = Precision(None, True)
    reference = _reference_training(fp32)
    try:
        pair, losses = _variant_training(name, fp32)
    finally:
        torch._dynamo.reset()
    assert pair.model.training
    assert _same_training(_differences(reference, pair.model, losses)), _differences(
        reference, pair.model, losses
    )
    assert pair.scheduler.last_epoch == AB_STEPS
    assert float(pair.optimizer.param_groups[0]["lr"]) == pytest.approx(reference[3], rel=1e-12)


def test_the_comparison_detects_a_missing_schedule_or_eval_mode_batchnorm():
    fp32 = Precision(None, True)
    reference = _reference_training(fp32)
    for changed in (_reference_training(fp32, schedule=False), _reference_training(fp32, evaluation=True)):
        _, model, losses, _ = changed
        assert not _same_training(_differences(reference, model, losses))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_graph_step_recipe_trains_as_engine_train_step(dtype):
    """What graph-step captures, run without the capture (CUDA graphs need CUDA): engine.train_step with
    the schedule left out, on the fused capturable Adam with a tensor lr, then TensorLR's step. Same
    losses, parameters and lr as engine.train_step (bf16 autocast on the CPU too), and the lr stays in
    the one tensor a captured graph would read."""
    precision = Precision(dtype, True)
    params = _tiny_params()
    reference = _reference_training(precision)
    inputs, targets = _ab_batch(precision)
    model, optimizer, scheduler = step.build_graph_training(
        params, torch.device("cpu"), precision, 7500 // AB_BATCH
    )
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.defaults["capturable"] and optimizer.defaults["fused"]
    loss_fn = step.loss_from_params(params.loss, AB_INPUT)
    losses = []
    for _ in range(AB_STEPS):
        losses.append(
            engine.train_step(model, optimizer, step.UNSCHEDULED, loss_fn, inputs, targets, precision).item()
        )
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(reference[3], rel=1e-6)
    loss, parameters, statistics = _differences(reference, model, losses)
    assert loss < 1e-5 and parameters < 0.01 and statistics < 1e-5, (loss, parameters, statistics)
    # a torch whose schedulers assign a float: the value goes into the same tensor
    optimizer.param_groups[0]["lr"] = 0.25
    scheduler._into_tensors()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.25


def test_cuda_only_variants_are_skipped_on_the_cpu_with_a_note(tmp_path):
    result = _tiny_step(
        tmp_path,
        batch_sizes=[2],
        variants="eager,graph-step,graph-eager,compile+cudagraphs",
        steps=1,
        warmup=0,
        repeats=1,
    )
    assert [r["variant"] for r in result["runs"]] == ["eager"]
    skipped = {n["variant"]: n for n in result["not_run"]}
    assert set(skipped) == {"graph-step", "graph-eager", "compile+cudagraphs"}
    assert all(
        n["reason"] == "cuda-only" and n["note"].startswith("skipped on cpu: ") for n in skipped.values()
    )
    assert json.loads((tmp_path / "train_step.json").read_text())["not_run"] == result["not_run"]


def test_variants_run_at_every_batch_size_in_turns(tmp_path, monkeypatch, capsys):
    """Built first (one step each), then each pair's block of steps once per repeat: A A B B A A B B."""
    sizes = []
    real_step = engine.train_step

    def recording(model, optimizer, scheduler, loss_fn, inputs, targets, precision):
        sizes.append(len(inputs))
        return real_step(model, optimizer, scheduler, loss_fn, inputs, targets, precision)

    monkeypatch.setattr(engine, "train_step", recording)
    out = tmp_path / "out"
    _run(
        "bench train-step --batch-sizes 2,3 --variants eager --steps 2 --warmup 1 --repeats 2",
        *TINY,
        *["--out", str(out)],
    )
    assert sizes == [2, 3] + [2, 2, 3, 3] * 2
    result = json.loads((out / "train_step.json").read_text())
    assert result["complete"] and result["batch_sizes"] == [2, 3] and result["baseline"] == "eager at batch 2"
    first, second = result["runs"]
    assert (first["batch_size"], second["batch_size"]) == (2, 3)
    assert first["ratio"] == 1.0 and second["ratio"] == pytest.approx(
        second["images_per_s"] / first["images_per_s"]
    )
    assert second["ratio_same_batch"] == 1.0 and len(second["runs_images_per_s"]) == 2
    assert first["base"] == "eager" and first["compile"] is False and first["compile_mode"] is None
    assert "| eager   | 3     |" in capsys.readouterr().out


def test_a_variant_that_fails_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    real_prepare = step.prepare

    def failing(variant, **kwargs):
        if variant.name == "compile":
            raise RuntimeError("no compiler here")
        return real_prepare(variant, **kwargs)

    monkeypatch.setattr(step, "prepare", failing)
    result = _tiny_step(
        tmp_path,
        batch_size=2,
        variants="compile,eager",
        steps=1,
        warmup=0,
        repeats=2,
    )
    assert result["complete"] and [r["variant"] for r in result["runs"]] == ["eager"]
    assert result["not_run"] == [
        {"variant": "compile", "batch_size": 2, "reason": "error", "note": "RuntimeError: no compiler here"}
    ]
    assert result["runs"][0]["ratio"] is None  # the baseline (compile) was not timed


def test_variant_names_and_their_inductor_options():
    variant = step.parse_variant(" compile + conv1x1 +coord")
    assert variant.name == "compile+conv1x1+coord" and variant.compiled and not variant.graph
    assert variant.inductor_options() == {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}
    assert variant.compile_mode() == "custom" and variant.needs_cuda() is None
    assert step.parse_variant("graph-step+autotune").needs_cuda()
    assert step.parse_variant("compile+autotune+coord").compile_mode() == "max-autotune-no-cudagraphs"
    for bad in ("eager+conv1x1", "graph-eager+coord", "compile+fast", "jit", "graph-step+cudagraphs"):
        with pytest.raises(common.BenchError):
            step.parse_variant(bad)
    with pytest.raises(common.BenchError, match="twice"):
        step.parse_variants("compile,compile")
    with pytest.raises(common.BenchError, match="twice"):
        step.parse_variant("compile+coord+coord")


def test_mode_options_are_torch_compiles_modes_and_every_option_exists_in_this_torch():
    from torch._inductor import config, list_mode_options

    for mode, options in step.MODE_OPTIONS.items():
        merged = step.parse_variant("+".join(["compile", *options])).inductor_options()
        assert merged == list_mode_options(mode), mode
    for options, _ in step.OPTIONS.values():
        with config.patch(options):  # raises on a name this torch does not have
            pass


def test_train_step_help_lists_every_variant():
    from wflw_pipeline.bench import cli as bench_cli

    parser = bench_cli.build_parser()
    text = parser._subparsers._group_actions[0].choices["train-step"].format_help()
    for name in [*step.BASES, *step.OPTIONS]:
        assert f"  {name} " in text, name


@pytest.mark.slow
def test_gpu_check_ab_smoke_runs_each_ab_step_with_the_torch_stack_only(tmp_path):
    """GPU_CHECK_AB=1 with every size shrunk: the A/B steps' command lines run (their GPU variant lists
    parsed first), each writes ab_<step>/train_step.json, and steps 1-5 do not run."""
    done = _gpu_check_smoke(tmp_path, GPU_CHECK_AB="1")
    assert "A/B variants: " in done.stdout and "=== epoch" not in done.stdout
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "gpu_check.log",
        *(f"ab_{s}" for s in ("options", "batch", "coord", "autotune")),
    }
    options = json.loads((out / "ab_options" / "train_step.json").read_text())
    assert options["complete"] and {n["variant"] for n in options["not_run"]} == {"graph-step", "graph-eager"}
    assert json.loads((out / "ab_batch" / "train_step.json").read_text())["batch_sizes"] == [4, 8]
