"""`wflw bench train-step` (bench/step.py): what is measured (FLOPs, peak, MFU), the timed step is
engine.train_step with the training schedule, and each A/B variant trains as engine.train_step does.

Benchmarks never assert a speed: these tests check what is measured, not how fast.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench_support import TINY, run_wflw
from helpers import default_params

from wflw_pipeline.bench import common, step
from wflw_pipeline.core import engine, optim
from wflw_pipeline.core.runtime import Precision


def _tiny_params(**train):
    """params.yaml with ResNet-18 at 32 px on the CPU (and `train` overrides)."""
    base = default_params()
    return replace(
        base,
        model=replace(base.model, arch="resnet18", input_size=32),
        train=replace(base.train, device="cpu", **train),
    )


def _tiny_step(out_dir: Path, batch_size: int = 2, **options) -> dict:
    """`step.run_train_step` of resnet18 at 32 px on the CPU with params.yaml's loss and train.*."""
    measurement = {"variants": None, "batch_sizes": None, "peak": None, "command": None, **options}
    return step.run_train_step(params=_tiny_params(batch_size=batch_size), out_dir=out_dir, **measurement)


def test_train_step_bench_writes_its_json(tmp_path):
    out = tmp_path / "out"
    run_wflw(
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
        pytest.param("compile+autotune+coord", marks=pytest.mark.slow),
    ],
)
def test_each_cpu_variant_trains_as_engine_train_step(name):
    """Same seed, same inputs, 4 steps: the variant's losses, parameters, BatchNorm statistics and lr
    match engine.train_step's (fp32; compiling takes ~10-50 s per variant, hence slow). Each option is
    in one compiled variant: autotune and coord together, not also each alone (~27 s of CI)."""
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
    run_wflw(
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
