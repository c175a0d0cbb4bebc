"""core/runtime.py: device, precision, backends, the DDP place of a process and torch.compile's caches."""

import os

import pytest
import torch
from helpers import default_params

from wflw_pipeline.core import runtime
from wflw_pipeline.core.runtime import Distributed, Precision


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(runtime.RuntimeSetupError, match=r"train.device: cuda is not available"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto") == torch.device("cpu")


def test_auto_picks_cuda_then_mps_and_an_explicit_choice_names_its_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("cuda:0")
    assert runtime.resolve_device("cuda", local_rank=3) == torch.device("cuda:3")  # one GPU per DDP rank
    assert runtime.resolve_device("mps") == torch.device("mps")
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(runtime.RuntimeSetupError, match=r"^evaluate.device: mps is not available"):
        runtime.resolve_device("mps", key="evaluate.device")


@pytest.mark.parametrize(
    ("asked", "device", "dtype", "name"),
    [
        ("auto", "cpu", None, "fp32"),
        ("auto", "cuda", torch.bfloat16, "bf16"),
        ("bf16", "cpu", torch.bfloat16, "bf16"),
        ("fp32", "cuda", None, "fp32"),
        ("fp32", "cpu", None, "fp32"),
    ],
)
def test_resolve_precision_is_bf16_on_cuda_when_auto(asked, device, dtype, name):
    for channels_last in (True, False):
        precision = runtime.resolve_precision(asked, channels_last, torch.device(device))
        assert precision == Precision(dtype, channels_last) and precision.name == name


def test_a_precision_autocasts_and_formats_memory_as_it_says():
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    bf16, fp32 = Precision(torch.bfloat16, True), Precision(None, False)
    with bf16.autocast(torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with fp32.autocast(torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    assert bf16.memory_format() == torch.channels_last and fp32.memory_format() == torch.contiguous_format
    assert Precision(torch.float16, False).name == "f16"


def test_the_place_in_a_ddp_job_comes_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone = Distributed.from_env()
    assert alone == Distributed(0, 1, 0) and alone.main
    value = {"epoch": 3}
    assert alone.broadcast(value) is value  # no process group: the value itself
    alone.barrier()  # no process group: nothing to wait for
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    third = Distributed.from_env()
    assert (third.rank, third.world_size, third.local_rank, third.main) == (3, 4, 1, False)


def test_device_facts_of_the_cpu():
    facts = runtime.device_facts(torch.device("cpu"))
    assert facts == {"device": "cpu", "device_name": "cpu", "torch_version": torch.__version__}


def test_cudnn_benchmark_is_turned_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    runtime.configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    runtime.configure_backends(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


@pytest.fixture
def compile_caches_off():
    """Inductor's FX graph cache and the AOTAutograd cache off for one test, restored after it.

    torch's config.patch, not monkeypatch.setattr: pytest 9 undoes a setattr on a module attribute that
    is not in the module's __dict__ by deleting it, and torch's config modules then lose the entry for
    the rest of the process."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def test_the_compile_cache_param_reaches_the_environment(tmp_path, monkeypatch, compile_caches_off):
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, "/somewhere/else")  # restored after the test
    path = runtime.setup_compile_cache(default_params().train.compile_cache)
    assert path == tmp_path / "data" / "cache" / "compile" and path.is_dir()  # relative to the cwd
    assert os.environ[runtime.COMPILE_CACHE_ENV] == str(path)
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    # null: torch's own location (whatever the environment says), with the caches still on
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, "/somewhere/else")
    assert runtime.setup_compile_cache(None) is None
    assert os.environ[runtime.COMPILE_CACHE_ENV] == "/somewhere/else"
    # a folder that cannot be made names the key
    (tmp_path / "file").write_text("")
    with pytest.raises(runtime.RuntimeSetupError, match=r"^train.compile_cache: cannot create"):
        runtime.setup_compile_cache(tmp_path / "file" / "cache")


def test_compile_model_wraps_the_model_with_its_caches_set_up(tmp_path, monkeypatch, compile_caches_off):
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, "/unset")  # restored after the test
    model = torch.nn.Linear(2, 2)
    compiled = runtime.compile_model(model, tmp_path / "cache", key="bench.cache")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    assert os.environ[runtime.COMPILE_CACHE_ENV] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
