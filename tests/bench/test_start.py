"""The start of a run: `wflw bench start` (bench/start.py: cold vs warm compile cache), `train.compile_cache`.

Benchmarks never assert a speed: these tests check what is measured and that the warm run loads the compiled
graphs the cold run stored. That the cache param reaches torch is tested in tests/core/test_runtime.py, that
training compiles once in tests/test_train.py.
"""

import json
from dataclasses import replace

import pytest
import torch
from helpers import default_params
from paths import ROOT

from wflw_pipeline import cli
from wflw_pipeline.bench import start

TINY = (
    "--faces 8 --set model.input_size=32 --set train.batch_size=4 --set convert.crop_size=48 "
    "--set train.device=cpu --set train.compile=true"
)


def test_first_full_speed_is_the_first_step_that_stays_near_the_steady_time():
    times = [30.0, 2.0, 1.05, 1.3, 1.0, 1.1, 1.0, 0.95]
    # 1.05 is within 15 % of 1.0, but the step after it (1.3) is not: full speed starts at index 4
    assert start.first_full_speed(times, steady=1.0, tolerance=0.15) == 4
    assert start.first_full_speed(times, steady=1.0, tolerance=0.35) == 2
    assert start.first_full_speed([5.0, 4.0], steady=1.0, tolerance=0.15) is None
    assert start.first_full_speed([5.0, 1.0], steady=1.0, tolerance=0.15) == 1  # the last step alone


def test_compile_split_adds_up_to_the_compile_time():
    cold = {
        "_compile.compile_inner": 30.0,
        "OutputGraph.call_user_compiler": 29.0,
        "compile_fx.<locals>.fw_compiler_base": 26.0,
        "compile_fx.<locals>.bw_compiler": 11.0,
        "bytecode_tracing": 0.7,  # inside Dynamo's time: not added again
    }
    split = start.compile_split(cold)
    assert split == {"dynamo_s": 1.0, "aot_autograd_s": 3.0, "inductor_s": 37.0, "total_s": 41.0}
    assert sum(split[k] for k in ("dynamo_s", "aot_autograd_s", "inductor_s")) == split["total_s"]
    warm = {
        "_compile.compile_inner": 1.3,
        "OutputGraph.call_user_compiler": 0.75,
        "AOTAutogradCache.inductor_load": 0.25,  # both graphs from the cache, no compile
    }
    split = start.compile_split(warm)
    assert split["inductor_s"] == pytest.approx(0.25) and split["aot_autograd_s"] == pytest.approx(0.5)
    assert split["total_s"] == pytest.approx(1.3)
    assert start.compile_split({})["total_s"] is None


def test_one_run_measures_every_phase_and_saves_a_checkpoint(tmp_path):
    """The child's measurement, in this process with compile off (the real runs are fresh processes)."""
    base = default_params()
    params = replace(
        base,
        model=replace(base.model, input_size=32),
        convert=replace(base.convert, crop_size=48),
        train=replace(
            base.train, batch_size=4, device="cpu", compile=False, compile_cache=str(tmp_path / "cache")
        ),
    )
    config = {
        "params": params.to_dict(),
        "faces": 6,
        "steps": 3,
        "tolerance": 0.15,
        "cudnn_benchmark": True,
        "work_dir": str(tmp_path),
    }
    import time

    run = start.measure(config, launched=time.time())
    assert set(run["phases"]) == {f"{key}_s" for key, _ in start.PHASES}
    assert len(run["step_times_s"]) == 3 and run["loss_finite"]
    assert run["compile"]["total_s"] is None and run["cache_dir"] is None
    assert not (tmp_path / "cache").exists()  # compile off: no cache set up
    if run["first_full_speed_step"] is not None:
        through = [k for k, _ in start.PHASES[: start.PHASES.index(("to_full_speed", "to full speed")) + 1]]
        assert run["time_to_full_speed_s"] == pytest.approx(sum(run["phases"][f"{k}_s"] for k in through))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(saved) == {"model", "optimizer"} and "state" in saved["optimizer"]


@pytest.mark.slow
def test_bench_start_runs_cold_then_warm_and_the_warm_run_loads_the_compiled_graphs(tmp_path):
    """Two fresh processes with compile on (Inductor compiles for the CPU): ~1 min on 2 cores."""
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [*f"bench start {TINY} --steps 3".split(), "--out", str(out), "--work", str(work)]
    assert cli.main([*argv, "--params", str(ROOT / "params.yaml")]) == 0
    result = json.loads((out / "start.json").read_text())
    assert result["mode"] == "start" and result["complete"] and result["compile"] is True
    assert result["command"].startswith("wflw bench start")
    assert {"date", "cpu_model", "cpus", "torch", "device"} <= set(result["machine"])
    cold, warm = result["runs"]
    assert (cold["run"], warm["run"]) == ("cold", "warm")
    for run in (cold, warm):
        assert set(run["phases"]) == {f"{key}_s" for key, _ in start.PHASES}
        assert len(run["step_times_s"]) == 3 and run["loss_finite"]
        assert run["compile"]["total_s"] > 0 and run["checkpoint_mb"] > 0
    # the cold run compiled and stored (its cache folder started empty); the warm run loaded all of it
    assert cold["cache"]["fxgraph_cache_miss"] > 0 and cold["cache"]["fxgraph_cache_hit"] == 0
    assert cold["cache"]["autograd_cache_miss"] > 0 and cold["cache"]["autograd_cache_hit"] == 0
    assert warm["cache"]["fxgraph_cache_hit"] > 0 and warm["cache"]["fxgraph_cache_miss"] == 0
    assert warm["cache"]["autograd_cache_hit"] > 0 and warm["cache"]["autograd_cache_miss"] == 0
    assert cold["cache_dir"] == warm["cache_dir"]
    assert not list(work.iterdir())  # the scratch folder (cache, checkpoint) is removed
