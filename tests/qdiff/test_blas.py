import os

import torch

from qdiff.blas import drop_cublaslt_workspace


def test_a_workspace_size_the_user_chose_wins(monkeypatch):
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "cublaslt_workspace_size", calls.append, raising=False)
    assert drop_cublaslt_workspace() == "kept"
    assert calls == [] and os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_the_run_time_setter_is_used_where_torch_has_it(monkeypatch):
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "0")  # restored (removed) after the test
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")
    calls = []
    monkeypatch.setattr(torch.backends.cuda, "cublaslt_workspace_size", calls.append, raising=False)
    assert drop_cublaslt_workspace() == "run time"
    assert calls == [0] and "CUBLASLT_WORKSPACE_SIZE" not in os.environ


def test_without_the_setter_the_environment_asks_for_no_workspace(monkeypatch):
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "0")
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")

    def missing_binding(size):  # what a CPU-only build's setter does
        raise AttributeError("module 'torch._C' has no attribute '_cuda_setCublasLtWorkspaceSize'")

    monkeypatch.setattr(torch.backends.cuda, "cublaslt_workspace_size", missing_binding, raising=False)
    assert drop_cublaslt_workspace() == "environment"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
    monkeypatch.delattr(torch.backends.cuda, "cublaslt_workspace_size")  # torch < 2.13
    os.environ.pop("CUBLASLT_WORKSPACE_SIZE")
    assert drop_cublaslt_workspace() == "environment"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
