"""The "polarquant" backend is found by name through the torch_dynamo_backends entry point, in a fresh process."""

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest


def run_fresh(code: str, tmp_path) -> subprocess.CompletedProcess:
    # a fresh interpreter, started outside the repo so nothing imports pqcompile from the working directory
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)


def test_entry_point_is_declared():
    eps = metadata.entry_points(group="torch_dynamo_backends")
    ep = {e.name: e for e in eps}["polarquant"]
    assert ep.value.startswith("pqcompile.")
    assert callable(ep.load())


def test_backend_by_name_without_import(tmp_path):
    proc = run_fresh("""
        import sys
        import torch
        assert "pqcompile" not in sys.modules
        out = torch.compile(lambda x: x + 1, backend="polarquant")(torch.ones(2))
        assert torch.equal(out, torch.full((2,), 2.0)), out
        assert "pqcompile" in sys.modules  # dynamo loaded it through the entry point
        print("OK", out.tolist())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK [2.0, 2.0]" in proc.stdout


@pytest.mark.parametrize("options", ["{'nope': 1}", "{'nope': 1, 'radius_bits': 3}"])
def test_unknown_option_lists_valid_names(tmp_path, options):
    proc = run_fresh(f"""
        import torch
        try:
            torch.compile(lambda x: x + 1, backend="polarquant", options={options})(torch.ones(2))
        except Exception as e:  # dynamo wraps backend errors (BackendCompilerFailed)
            print("ERROR", type(e).__name__, str(e))
        else:
            print("NO ERROR")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ERROR"), proc.stdout
    assert "nope" in proc.stdout
    for name in ("radius_bits", "angle_bits", "group_size", "pairing", "verify", "backend"):
        assert name in proc.stdout.split("valid")[-1], proc.stdout


def test_options_reach_the_backend(tmp_path):
    proc = run_fresh("""
        import torch
        try:
            torch.compile(lambda x: x + 1, backend="polarquant", options={"group_size": 48})(torch.ones(2))
        except Exception as e:
            print("ERROR", str(e))
        else:
            print("NO ERROR")
        out = torch.compile(lambda x: x * 3, backend="polarquant",
                            options={"radius_bits": 3, "angle_bits": 3, "backend": "eager"})(torch.ones(2))
        print("OK", out.tolist())
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR" in proc.stdout and "group_size=48" in proc.stdout, proc.stdout
    assert "OK [3.0, 3.0]" in proc.stdout
