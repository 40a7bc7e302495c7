"""benchmarks/gpu.sh, the one device call, dry-run on the CPU: its stages under one deadline, each recorded."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ["bench", "comfyui_memory", "loading", "new_process"]
MARGIN_S = 5  # past the deadline: bash's start, whole seconds, the summary's 2 s of grace when it is stopped


def dry_run(tmp_path, tiny_models, deadline_s):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEADLINE_S": str(deadline_s), "TINY_VLM": str(tiny_models["vlm"]),
           "CARRY": str(tmp_path / "no-carry"),  # the stand-in host, not a ComfyUI carried here
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its python3: this one
    started = time.monotonic()
    completed = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run-cpu"], env=env,
                               capture_output=True, text=True, timeout=deadline_s + 60)
    return completed, time.monotonic() - started, out


@pytest.mark.slow
def test_a_dry_run_runs_every_stage_within_the_deadline(tiny_models, tmp_path):
    completed, seconds, out = dry_run(tmp_path, tiny_models, deadline_s=150)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert seconds <= 150 + MARGIN_S
    stages = json.loads((out / "stages.json").read_text())
    assert stages["deadline_s"] == 150 and stages["dry_run_cpu"] is True and list(stages["stages"]) == STAGES
    for stage in stages["stages"].values():
        assert stage["ran"] and stage["exit"] == 0 and stage["seconds"] <= stage["limit_s"] <= 60
    # What the device sends back: at most 8 files.
    assert sorted(path.name for path in out.iterdir()) == ["bench.json", "bench_loading.json", "bench_new_process.json",
                                                          "comfyui_memory.json", "gpu.log", "stages.json"]

    bench = json.loads((out / "bench.json").read_text())
    fast = bench["fast"]
    assert bench["generate"]["warm_s"] > 0 and fast["vs_generate"]["same_tokens"] and fast["leak"]["runs"] == 2
    assert fast["step_profile"]["step"]["ms_per_step"] > 0 and bench["exactness"]["same_tokens"]
    assert bench["fast_compiled"] == {"skipped": "compilation is used with CUDA graphs only"}
    memory = json.loads((out / "comfyui_memory.json").read_text())
    assert memory["tokens"] == 4 and list(memory["passes"]) == ["fp32"]
    assert memory["passes"]["fp32"]["summary"]["queued_runs"] == 2
    assert memory["passes"]["fp32"]["summary"]["same_conditioning_after_reload"] is True
    loading = json.loads((out / "bench_loading.json").read_text())
    assert loading["load"]["min_cosine_vs_before_saving"] > 0.99999
    assert loading["saved_to"].startswith("/dev/shm/") == (shutil.disk_usage("/dev/shm").free >= 2 ** 30)
    assert not Path(loading["saved_to"]).exists()  # removed after the stage
    assert not {"generate", "fast", "exactness"} & loading.keys()  # stage bench measured those
    new_process = json.loads((out / "bench_new_process.json").read_text())
    assert new_process["fast"]["warm_s"] > 0 and not {"generate", "exactness"} & new_process.keys()
    # The output ends with each bench JSON's summary (after the name; bench itself printed "results: NAME").
    last = completed.stdout.rsplit(f"{out}/bench_new_process.json\n", 1)[1]
    assert last.startswith("cpu: floor None s (None TB/s copy), prompt 40 tokens\n  fast: first_call_s=")


@pytest.mark.slow
def test_a_short_deadline_runs_what_fits_and_skips_the_rest_with_a_note(tiny_models, tmp_path):
    completed, seconds, out = dry_run(tmp_path, tiny_models, deadline_s=20)  # the first stage needs 10 s
    assert seconds <= 20 + MARGIN_S, completed.stdout[-3000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert list(stages) == STAGES and stages["bench"]["ran"] and stages["bench"]["limit_s"] <= 15
    log = (out / "gpu.log").read_text()
    for name in STAGES[1:]:
        assert stages[name]["ran"] is False
        left, needed = map(int, re.fullmatch(r"deadline: (-?\d+) s left, (\d+) s needed", stages[name]["why"]).groups())
        assert left < needed
        assert f"== {name} skipped: {stages[name]['why']}\n" in log
