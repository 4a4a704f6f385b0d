"""Shared test setup: golden fixtures live in ../shared/fixtures (beside the checkout); the Triton-interpreter child
process of the kernel tests."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "opensora_v1"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path to ../shared/fixtures/opensora_v1; fails loudly (never skips) when absent."""
    if not FIXTURES.is_dir():
        pytest.fail(
            f"golden fixtures not found at {FIXTURES}: the parity tests need ../shared/fixtures "
            "beside the checkout (CI provides it)."
        )
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: tiny models gain nothing from threads, and on a shared
    2-core CI machine threads make them many times slower. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def run_interpreter_child():
    """run(test_file, child_flag, keyword="interp", passed=None, at_least=None) runs the tests of `test_file` that
    match `keyword` in a child pytest under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported, so this process cannot switch to it) with `child_flag`=1 in its environment, and asserts that they pass:
    exactly `passed` of them with none skipped, or at least `at_least`. Returns the child's output."""
    def run(test_file, child_flag: str, keyword: str | None = "interp", passed: int | None = None,
            at_least: int | None = None, timeout: int = 900) -> str:
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), **{child_flag: "1"})
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                   str(test_file), *(["-k", keyword] if keyword else [])]
        proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        count = re.search(r"(\d+) passed", output)
        assert proc.returncode == 0 and count, output[-4000:]
        if passed is not None:
            assert int(count.group(1)) == passed and "skipped" not in output, output[-4000:]
        if at_least is not None:
            assert int(count.group(1)) >= at_least, output[-4000:]
        return output

    return run


@pytest.fixture
def recorded_ops():
    """recorded_ops(fn, *args) -> (eager fn(*args), compiled fn(*args), names of the qdiff custom ops in the one graph
    dynamo captures). Compiled with fullgraph, static shapes and aot_eager (the ops' fake impls and AOT dispatch run;
    no inductor)."""
    def record(fn, *args):
        from torch._dynamo.backends.common import aot_autograd

        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
        torch._dynamo.reset()
        assert len(graphs) == 1
        names = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
        return fn(*args), compiled, [name.removesuffix(".default") for name in names if name.startswith("qdiff.")]

    return record


@pytest.fixture
def interpreter():
    """In a kernel test's interpreter child (TRITON_INTERPRET=1): the shims that make Triton 3.6's CPU interpreter
    run with numpy >= 2.4 and round float32 -> bf16 / e4m3 casts as the GPU does (`bench.check_int_kernels`)."""
    from bench.check_int_kernels import install_interpreter_shims
    from qdiff.kernels.act_quant import interpret_mode

    assert interpret_mode()
    install_interpreter_shims()
