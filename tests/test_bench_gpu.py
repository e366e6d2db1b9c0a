"""bench/gpu.py, the GPU figure script, runs end to end on CPU at tiny sizes (--quick): every figure
gets a positive rate (vLLM a stated skip), the JSON names the commit, and one figure failing is
reported while the others still run. No timing is asserted: speed targets live in the benches."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_paths import PROJECT

SCRIPT = PROJECT / "bench" / "gpu.py"
FIGURES = ("clip_images", "clip_texts", "topk_fp16", "topk_fp32", "perplexity", "llm_transformers", "llm_vllm")


def run_bench(*args: str, prelude: str | None = None) -> subprocess.CompletedProcess:
    """`python bench/gpu.py ARGS` in a fresh interpreter; with `prelude`, that code runs first (to
    hide a package) and then the script, as __main__."""
    command = [sys.executable, str(SCRIPT), *args]
    if prelude:
        command = [sys.executable, "-c", f"import runpy, sys; {prelude}; sys.argv = {[str(SCRIPT), *args]!r}; "
                                         f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"]
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)


def head_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_quick_run_has_every_figure_and_the_commit(tmp_path):
    out = tmp_path / "gpu-cpu.json"
    proc = run_bench("--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert set(result["figures"]) == set(FIGURES)
    for name, fig in result["figures"].items():
        if name == "llm_vllm" and "skipped" in fig:
            assert "vllm" in fig["skipped"].lower() or "gpu" in fig["skipped"].lower(), fig
            continue
        assert "error" not in fig, (name, fig)
        assert fig["rate"] > 0 and fig["items"] > 0 and fig["calls"] >= 1, (name, fig)
        assert "peak_gpu_mem_gib" in fig  # None on CPU
    assert result["failed"] == []
    assert result["figures"]["topk_fp16"]["same_answer_fp16_fp32"] is True  # the exact re-score's promise
    assert result["commit"] and (result["commit"] == head_commit() or head_commit() is None)
    assert result["device"] == "cpu" and result["quick"] is True
    # The printed table names every figure; the weights are said to be a random init.
    for name in FIGURES:
        assert name in proc.stdout
    assert "throughput does not depend on weights" in proc.stdout
    assert f"wrote {out}" in proc.stdout


def test_a_failing_figure_is_reported_and_the_others_still_run(tmp_path):
    """Without open_clip (as on the GPU machine until its wheels are carried): the CLIP figures
    fail with one line saying so, the next figure still runs, and the exit status says it failed."""
    out = tmp_path / "gpu-no-open-clip.json"
    proc = run_bench("--device", "cpu", "--quick", "--figures", "clip_images,clip_texts,topk_fp16",
                     "--out", str(out), prelude="sys.modules['open_clip'] = None")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())["figures"]
    for name in ("clip_images", "clip_texts"):
        assert figures[name]["error"].startswith("open_clip is not installed: carry its wheels"), figures[name]
        assert "\n" not in figures[name]["error"]
    assert figures["topk_fp16"]["rate"] > 0
    assert "FAILED: clip_images, clip_texts" in proc.stdout


def test_no_cuda_device_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = run_bench("--device", "cuda", "--quick", "--out", "/dev/null")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "no CUDA device" in proc.stderr
