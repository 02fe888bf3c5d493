"""launchers/export.py on a real 2-step checkpoint: torchvision and fb/moco layouts, --inspect, errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from moco_scale import export
from moco_scale.config import ModelConfig
from moco_scale.models import build_backbone, build_resnet

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "launchers" / "export.py"
TAG = "step_00000002"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    cmd = [
        sys.executable,
        "launchers/pretrain.py",
        "--config",
        "configs/demo.yaml",
        "--train.max_steps=2",
        "--train.log_every=1",
        "--checkpoint.every_steps=2",
        "--train.progress=false",
        "--eval.every_steps=0",
        f"--train.run_dir={run}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def _stored_backbone(run_dir: Path) -> dict[str, torch.Tensor]:
    """The engine's query backbone, straight from DeepSpeed's model file."""
    states = torch.load(run_dir / "checkpoints" / TAG / "mp_rank_00_model_states.pt", weights_only=True)
    prefix = "encoder_q.backbone."
    return {k.removeprefix(prefix): v for k, v in states["module"].items() if k.startswith(prefix)}


def _torchvision_resnet18() -> torch.nn.Module:
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    return model


def test_exports_from_run_dir_checkpoints_folder_and_checkpoint_are_the_backbone(run_dir: Path, tmp_path: Path) -> None:
    stored = _stored_backbone(run_dir)
    sources = [run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / TAG]
    for i, source in enumerate(sources):
        out = tmp_path / f"backbone{i}.pt"
        assert export.main([str(source), str(out)]) == 0
        state = torch.load(out, weights_only=True)
        assert state.keys() == stored.keys() and not any(k.startswith("fc.") for k in state)
        for name, value in stored.items():
            assert torch.equal(state[name], value), (source, name)


def test_torchvision_model_computes_the_engine_backbone_features(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "backbone.pt"
    assert export.main([str(run_dir), str(out)]) == 0
    tv = _torchvision_resnet18()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ours = build_resnet("resnet18")
    ours.load_state_dict(_stored_backbone(run_dir), strict=True)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours.eval()(images), tv.eval()(images)
    assert got.shape == (4, 512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_fbmoco_layout_loads_like_fb_moco_main_lincls(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "moco.pth.tar"
    assert export.main([str(run_dir), str(out), "--layout", "fbmoco"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["arch"] == "resnet18" and saved["step"] == 2 and saved["epoch"] == 0
    state = saved["state_dict"]
    assert all(k.startswith("module.encoder_q.") for k in state)
    # fb/moco's main_lincls.py: keep encoder_q without its fc (the projection head), drop the prefix.
    kept = {
        k.removeprefix("module.encoder_q."): v
        for k, v in state.items()
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc")
    }
    result = torchvision.models.resnet18().load_state_dict(kept, strict=False)  # fc kept, as in main_lincls
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    head = {f"module.encoder_q.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}  # v2's MLP, as in fb/moco
    assert {k for k in state if ".fc." in k} == head


def test_inspect_prints_step_and_queue(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert export.main(["--inspect", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^step\s+2$", table, re.M), table
    assert re.search(r"^epoch\s+0.0428 \(samples consumed", table, re.M), table  # 2 x 32 of 1,497 samples
    assert re.search(r"^queue\s+256 keys x 128, ptr 64$", table, re.M), table
    assert re.search(r"^world size\s+1 ", table, re.M), table


def _run_export(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(EXPORT), *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_missing_path_and_truncated_file_give_one_line_errors(run_dir: Path, tmp_path: Path) -> None:
    damaged = tmp_path / TAG
    shutil.copytree(run_dir / "checkpoints" / TAG, damaged)
    model_file = damaged / "mp_rank_00_model_states.pt"
    os.truncate(model_file, model_file.stat().st_size // 2)
    cases = [(tmp_path / "missing", "does not exist"), (damaged, "truncated")]
    for source, message in cases:
        result = _run_export(str(source), str(tmp_path / "out.pt"))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr
    assert not (tmp_path / "out.pt").exists()


VIT_FLAGS = ["--model.arch=vit_tiny", "--model.patch_size=8", "--moco.version=v3", "--moco.shuffle_bn=sync"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MoCo v3 on vit_tiny through the launcher: 2 steps, a checkpoint and the kNN monitor at 0 and 2."""
    run = tmp_path_factory.mktemp("export_vit") / "vit"
    cmd = [sys.executable, "launchers/pretrain.py", "--config", "configs/demo.yaml", *VIT_FLAGS]
    cmd += ["--train.max_steps=2", "--checkpoint.every_steps=2", "--eval.every_steps=2", "--train.progress=false"]
    result = subprocess.run([*cmd, f"--train.run_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


def _features(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(images)


def _our_vit(weights: Path) -> torch.nn.Module:
    ours = build_backbone(ModelConfig("vit_tiny", patch_size=8), 32)
    ours.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return ours


@pytest.mark.slow
def test_a_vit_run_is_monitored_exported_to_torchvision_and_probed(vit_run: Path, tmp_path: Path) -> None:
    """The kNN monitor evaluates the ViT, the export loads strictly into torchvision's VisionTransformer with the
    same feature, and the linear probe trains on it."""
    records = [json.loads(line) for line in (vit_run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "knn_top1" in r) == [0, 2]
    out = tmp_path / "vit.pt"
    assert export.main([str(vit_run), str(out)]) == 0
    tv = torchvision.models.VisionTransformer(32, 8, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768)
    tv.heads = torch.nn.Identity()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    torch.testing.assert_close(_features(tv), _features(_our_vit(out)), rtol=1e-5, atol=1e-5)
    probe_cmd = [sys.executable, "launchers/linear_probe.py", f"--probe.init={vit_run}", "--probe.max_steps=3"]
    probe_cmd += ["--train.progress=false", f"--probe.run_dir={tmp_path / 'probe'}"]
    probed = subprocess.run(probe_cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert probed.returncode == 0, probed.stdout[-3000:] + probed.stderr[-3000:]
    record = json.loads((tmp_path / "probe" / "linear_probe.json").read_text())
    assert (record["arch"], record["steps"], record["val_samples"]) == ("vit_tiny", 3, 300)


@pytest.mark.slow
def test_timm_layout_loads_strictly_into_timm_with_the_same_features(
    run_dir: Path, vit_run: Path, tmp_path: Path
) -> None:
    timm = pytest.importorskip("timm")
    vit_out, resnet_out, ours_out = tmp_path / "vit_timm.pt", tmp_path / "r18_timm.pt", tmp_path / "vit.pt"
    assert export.main([str(vit_run), str(vit_out), "--layout", "timm"]) == 0
    assert export.main([str(vit_run), str(ours_out)]) == 0
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3, num_classes=0
    )
    vit.load_state_dict(torch.load(vit_out, weights_only=True), strict=True)
    torch.testing.assert_close(_features(vit), _features(_our_vit(ours_out)), rtol=1e-5, atol=1e-5)
    assert export.main([str(run_dir), str(resnet_out), "--layout", "timm"]) == 0
    resnet = timm.create_model("resnet18", num_classes=0, pretrained=False)
    resnet.load_state_dict(torch.load(resnet_out, weights_only=True), strict=True)
    ours = build_resnet("resnet18")
    ours.load_state_dict(_stored_backbone(run_dir), strict=True)
    torch.testing.assert_close(_features(resnet), _features(ours), rtol=0, atol=1e-6)


def _detectron2_r50_names() -> set[str]:
    """What detectron2's ResNet-50 backbone (``build_resnet_backbone``, frozen BN) holds, written out: the stem
    ``stem.conv1`` with its ``norm``, then res2-res5 of 3, 4, 6 and 3 bottlenecks, each conv1-conv3 with a
    ``norm``, the first of each stage with a ``shortcut`` projection and its ``norm``."""
    norm = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight", *(f"stem.conv1.norm.{n}" for n in norm)}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        for block in range(blocks):
            for conv in ("conv1", "conv2", "conv3", *(("shortcut",) if block == 0 else ())):
                names |= {f"res{stage}.{block}.{conv}.weight", *(f"res{stage}.{block}.{conv}.norm.{n}" for n in norm)}
    return names


def _from_detectron2(name: str) -> str:
    """detectron2's name back to torchvision's, undone rule by rule in the reverse order."""
    name = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", name)
    name = re.sub(r"\.shortcut\.", ".downsample.0.", name)
    name = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", name)
    name = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", name)
    return name.removeprefix("stem.")


def test_detectron2_layout_holds_detectron2s_r50_names_and_every_tensor(run_dir: Path, tmp_path: Path) -> None:
    r50 = export.detectron2_names(build_resnet("resnet50").state_dict(), "resnet50")
    assert r50["matching_heuristics"] is True and set(r50["model"]) == _detectron2_r50_names()

    out = tmp_path / "r18.pkl"
    assert export.main([str(run_dir), str(out), "--layout", "detectron2"]) == 0
    with out.open("rb") as f:
        model = pickle.load(f)["model"]
    stored = {k: v for k, v in _stored_backbone(run_dir).items() if not k.endswith("num_batches_tracked")}
    assert {_from_detectron2(k) for k in model} == stored.keys()
    for name, array in model.items():
        assert isinstance(array, np.ndarray) and torch.equal(torch.from_numpy(array), stored[_from_detectron2(name)])


def test_every_export_writes_a_model_card(run_dir: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r for r in records if "loss" in r][-1]["loss"]
    for layout, name in (("torchvision", "backbone.pt"), ("detectron2", "r18.pkl"), ("fbmoco", "moco.pth.tar")):
        out = tmp_path / name
        assert export.main([str(run_dir), str(out), "--layout", layout]) == 0
        card = export.card_path(out).read_text()
        for fact in ("resnet18", "v2", "2 steps", "demo (1497 samples)", f"{last_loss:.4f} (step 2)", out.name):
            assert fact in card, (layout, fact, card)
        assert re.search(r"moco_scale [0-9a-f]{40}", card) or "moco_scale unknown" in card


def _run_card_code(out: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """Run the loading lines of ``out``'s model card beside it, as a user pastes them; the model they build."""
    timm = pytest.importorskip("timm")
    code = export.card_path(out).read_text().split("```\n")[1]
    monkeypatch.chdir(out.parent)
    namespace = {"torch": torch, "torchvision": torchvision, "timm": timm}
    exec(code, namespace)  # a strict load_state_dict: raises on any missing or unexpected key
    return namespace["model"]


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_the_model_cards_loading_lines_load_the_export(
    run_dir: Path, vit_run: Path, tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, source in (("resnet", run_dir), ("vit", vit_run)):
        out = tmp_path / f"{name}_{layout}.pt"
        assert export.main([str(source), str(out), "--layout", layout]) == 0
        model = _run_card_code(out, monkeypatch)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_detectron2_layout_refuses_a_vit(vit_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert export.main([str(vit_run), str(tmp_path / "vit.pkl"), "--layout", "detectron2"]) == 2
    assert "error: --layout detectron2 is for ResNets; vit_tiny is a ViT" in capsys.readouterr().err
