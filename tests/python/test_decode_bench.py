"""bench/decode_bench.py runs end to end on a CPU: a tiny random decoder decoding through a real
storage node (host backend) and with full attention, its rows and its last-line JSON; and a
configuration whose first selection exceeds the client's staging budget is skipped, not hung.
Skips without the server binary or the client library (build them with bazel)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "client" / "python"))

import kvstar  # noqa: E402
import kvstar.node  # noqa: E402

TINY = ["--models", "tiny", "--contexts", "1024", "--warmup", "4", "--steps", "12",
        "--stride", "2", "--topic_period", "4", "--host_reserve_gib", "0",
        "--shared_memory_gib", "0.0625", "--no_graphs"]


@pytest.fixture(scope="module")
def environment():
    try:
        kvstar.node.find_server()
        kvstar._load()
    except (FileNotFoundError, OSError) as error:
        pytest.skip(str(error))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, even on a GPU machine
    return env


def run_bench(environment, tmp_path, *extra):
    results = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "decode_bench.py"), *TINY,
                           "--results", str(results), *extra],
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return rows, json.loads(done.stdout.strip().splitlines()[-1])


def test_full_and_kvstar_rows_and_summary(environment, tmp_path):
    rows, summary = run_bench(environment, tmp_path, "--configs", "full,kvstar0.25",
                              "--kvstar_max_batch_contexts", "1024", "--kvstar_max_batch", "2")
    full = [r for r in rows if r["config"] == "full"]
    sparse = [r for r in rows if r["config"] == "kvstar0.25"]
    assert [r["batch"] for r in sparse] == [2, 1]  # the largest batch run, then batch 1
    assert full and all(r["step_ms_p50"] > 0 for r in full + sparse)
    for r in sparse:
        assert r["retrievals"] > 0  # selections came back from the node while decoding
        assert r["selections_dropped"] == 0
        assert 0 < r["hbm_kv_fraction"]
    for key in ("step_ms_full", "step_ms_kvstar", "max_batch_full", "max_batch_kvstar",
                "tokens_per_s_full", "tokens_per_s_kvstar", "gpu_wait_fraction",
                "hbm_kv_fraction", "retrievals_per_s"):
        assert key in summary, key


def test_seal_over_the_staging_budget_is_skipped(environment, tmp_path):
    rows, summary = run_bench(environment, tmp_path, "--configs", "kvstar0.1",
                              "--client_staging_bytes", "1024")
    assert len(rows) == 1 and rows[0]["skipped"].startswith("Seal would wait forever")
    assert summary == {}  # nothing measured
