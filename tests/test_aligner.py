import json
import math
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thinkdiff_core import Aligner, CheckpointError, convert_to_safetensors, load_aligner
from thinkdiff_core.files import save_safetensors

from conftest import REPO

D_IN, D_OUT = 12, 16


def official_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "mm_projector.0.weight": torch.randn(D_OUT, D_IN, generator=g) * 0.3,
        "mm_projector.0.bias": torch.randn(D_OUT, generator=g) * 0.1,
        "mm_projector.2.weight": torch.randn(D_OUT, D_OUT, generator=g) * 0.3,
        "mm_projector.2.bias": torch.randn(D_OUT, generator=g) * 0.1,
        "mm_projector.3.weight": 1 + torch.randn(D_OUT, generator=g) * 0.1,
    }


def reference_aligner(x, w):
    """The paper's mlp2x_gelu_t5_norm written out: Linear, erf GELU, Linear, T5 RMSNorm (eps 1e-6)."""
    h = x @ w["mm_projector.0.weight"].T + w["mm_projector.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = h @ w["mm_projector.2.weight"].T + w["mm_projector.2.bias"]
    rms = torch.sqrt((h.double() ** 2).mean(-1, keepdim=True) + 1e-6)
    return (w["mm_projector.3.weight"].double() * (h.double() / rms)).float()


@pytest.fixture
def official_pth(tmp_path):
    """The authors' runner checkpoint: {'model', 'optimizer', 'config', 'scaler', 'epoch'}."""
    w = official_weights()
    path = tmp_path / "thinkdiff_lvlm.pth"
    torch.save({"model": w, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "config": {"model": {"mm_projector_type": "mlp2x_gelu_t5_norm"}},
                "scaler": {"scale": 65536.0}, "epoch": 3}, path)
    return path


def test_matches_reference_computation(official_pth):
    aligner = load_aligner(official_pth)
    x = torch.randn(5, 7, D_IN, generator=torch.Generator().manual_seed(1))
    out = aligner(x)
    assert out.shape == (5, 7, D_OUT) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_aligner(x, official_weights()), rtol=1e-5, atol=1e-5)
    assert (aligner.in_features, aligner.out_features) == (D_IN, D_OUT)


def test_bfloat16_aligner_keeps_the_norm_statistics_in_float32(official_pth):
    aligner = load_aligner(official_pth, dtype=torch.bfloat16)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2))
    out = aligner(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_aligner(x, official_weights()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layout", ["official", "stripped", "bare", "safetensors"])
def test_every_checkpoint_layout_loads_the_same_weights(tmp_path, official_pth, layout):
    w = official_weights()
    if layout == "official":
        path = official_pth
    elif layout == "stripped":
        path = tmp_path / "stripped.pth"
        torch.save({"model": w}, path)
    elif layout == "bare":
        path = tmp_path / "bare.pth"
        torch.save(w, path)
    else:
        path = tmp_path / "aligner.safetensors"
        save_file(w, str(path))
    state = load_aligner(path).state_dict()
    for key, value in w.items():
        torch.testing.assert_close(state[key.removeprefix("mm_projector.")], value, rtol=0, atol=0)


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"model": official_weights(), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load") as error:
        load_aligner(path)
    assert str(path) in str(error.value)
    assert not marker.exists()
    # torch's diagnosis is kept, its advice to load with weights_only=False or allowlist the code is not.
    assert re.search(r"Only weights are accepted\. Details: Unsupported global: GLOBAL (builtins\.)?exec was not an "
                     r"allowed global by default\.$", str(error.value))
    assert "weights_only" not in str(error.value) and "safe_globals" not in str(error.value)


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_aligner(missing)

    unknown = tmp_path / "unknown.pth"
    torch.save({"model": {"proj.weight": torch.zeros(2, 2)}}, unknown)
    with pytest.raises(CheckpointError, match=r"unknown\.pth: no aligner weights found.*mm_projector\.0\.weight"):
        load_aligner(unknown)

    incomplete = tmp_path / "incomplete.pth"
    w = official_weights()
    del w["mm_projector.3.weight"]
    torch.save(w, incomplete)
    with pytest.raises(CheckpointError, match=r"incomplete\.pth: incomplete aligner, missing mm_projector\.3\.weight"):
        load_aligner(incomplete)

    wrong = tmp_path / "wrong.pth"
    w = official_weights()
    w["mm_projector.2.weight"] = torch.zeros(D_OUT, D_OUT + 1)
    torch.save(w, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pth: mm_projector\.2\.weight has shape \(16, 17\), "
                                              r"expected \(16, 16\)"):
        load_aligner(wrong)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"{corrupt} is not a .safetensors file, or an incomplete download "
                                                   f"(8 bytes); download it again")):
        load_aligner(corrupt)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_aligner(truncated)

    text = tmp_path / "README.md"
    text.write_text("# ThinkDiff\n")
    with pytest.raises(CheckpointError, match=r"README\.md: not a PyTorch checkpoint or safetensors file \(expected "
                                              r"the official \.pth or a \.safetensors aligner\)"):
        load_aligner(text)

    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder; expected an aligner file"):
        load_aligner(tmp_path)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(CheckpointError, match=r"tensor\.pth: expected a dict"):
        load_aligner(not_a_dict)


def test_wrong_input_width_is_a_clear_error(official_pth):
    with pytest.raises(ValueError, match=f"width {D_IN}"):
        load_aligner(official_pth)(torch.zeros(2, D_IN + 1))


def test_convert_keeps_only_the_aligner_with_metadata(tmp_path, official_pth):
    out = tmp_path / "thinkdiff_lvlm.safetensors"
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "convert", str(official_pth), str(out)],
                            cwd=REPO, capture_output=True, text=True, check=True, preexec_fn=lambda: os.umask(0o022))
    report = json.loads(result.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # readable by a ComfyUI running as another user
    assert report["output_bytes"] and report["input_bytes"] and (report["d_in"], report["d_out"]) == (D_IN, D_OUT)
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(official_weights())
        assert f.metadata()["d_in"] == str(D_IN) and f.metadata()["d_out"] == str(D_OUT)
        assert f.metadata()["variant"] == "unknown"
    for key, value in load_aligner(out).state_dict().items():
        torch.testing.assert_close(value, load_aligner(official_pth).state_dict()[key], rtol=0, atol=0)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_model_files_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == mode


def test_convert_guesses_the_variant_from_d_in(tmp_path, tiny_models):
    report = convert_to_safetensors(tiny_models["aligner"], tmp_path / "a.safetensors", variant="lvlm")
    assert report["variant"] == "lvlm" and report["output_bytes"] < report["input_bytes"]
    w = {"mm_projector.0.weight": torch.zeros(8, 1408), "mm_projector.0.bias": torch.zeros(8),
         "mm_projector.2.weight": torch.zeros(8, 8), "mm_projector.2.bias": torch.zeros(8),
         "mm_projector.3.weight": torch.ones(8)}
    torch.save(w, tmp_path / "clip.pth")
    assert convert_to_safetensors(tmp_path / "clip.pth", tmp_path / "clip.safetensors")["variant"] == "clip"
    with pytest.raises(ValueError, match=r"clip\.pth: the aligner takes 1408-d inputs, the ThinkDiff-CLIP \(BLIP-2 "
                                         r"ViT-g features\) width, not the lvlm variant's; leave --variant out"):
        convert_to_safetensors(tmp_path / "clip.pth", tmp_path / "lvlm.safetensors", variant="lvlm")
    assert not (tmp_path / "lvlm.safetensors").exists()


def test_convert_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "convert", str(tmp_path / "x.pth"),
                             str(tmp_path / "y.safetensors")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: aligner checkpoint not found:") and "Traceback" not in result.stderr


def test_aligner_is_the_official_sequential_layout():
    aligner = Aligner(D_IN, D_OUT)
    assert sorted(aligner.state_dict()) == sorted(k.removeprefix("mm_projector.") for k in official_weights())
