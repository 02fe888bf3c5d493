"""Every benchmark runs in its smoke mode and writes its JSON; their figures live in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco_scale.data.dali import dali_available
from moco_scale.moco.momentum import MomentumUpdater

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "key"),
    [
        ("ema.py", "ratio_vs_copy"),
        ("shuffle_bn.py", "ratio_vs_reference"),
        ("checkpoint_io.py", "save_s_max"),
        ("sharded_queue.py", "ratio_at_largest_k"),  # 2 ranks, a fresh pair per method
        ("memory.py", "train_peak_mib_max"),  # 2 ranks, vit_tiny: ZeRO-0, FSDP2 sharded and whole
        pytest.param("throughput.py", "ratio_vs_reference", marks=pytest.mark.slow),  # 2 ranks, ours and fb/moco's
        pytest.param(
            "quality.py", "knn_top1_ours", marks=pytest.mark.slow
        ),  # vit_tiny, 4 steps: ours, moco-v3 reference
        ("shard_check.py", "ratio_full_vs_pil"),  # PIL alone, JPEG structure walk, PIL + DALI
        pytest.param("faults.py", "survived_fraction", marks=pytest.mark.slow),  # 9 short 2-rank jobs
        ("resume_cost.py", "resume_ms_ratio_last_vs_first"),  # torch loader resumes after 1 and 10 epochs
        pytest.param(
            "data_throughput.py",
            "ratio_vs_reference",
            marks=pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI"),
        ),
    ],
)
def test_benchmark_smoke(tmp_path: Path, script: str, key: str) -> None:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    value = json.loads(out.read_text())[key]
    assert isinstance(value, float) and value > 0
    assert "|" in result.stdout  # the printed table


def test_the_divergent_quality_protocol_is_the_v2_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13's protocol: the v2 paper's views at 64 px, whatever configs/demo.yaml sets for its own demo."""
    from moco_scale.config import load_config
    from moco_scale.data.augment import moco_views

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from quality import PROTOCOLS, protocol_flags

    cfg = load_config(ROOT / "configs" / "demo.yaml", protocol_flags("divergent", 0, 0))
    assert cfg.aug.views(cfg.data.image_size) == moco_views("v2", 64)
    assert (cfg.moco.queue_size, cfg.moco.temperature, cfg.moco.momentum, cfg.train.batch_size) == (256, 0.1, 0.99, 64)
    assert cfg.optim.base_lr * 128 / 256 == 0.06 and cfg.optim.warmup_steps == 0 and cfg.train.max_steps == 600
    assert load_config(ROOT / "configs" / "demo.yaml", PROTOCOLS["demo"]) == load_config(ROOT / "configs" / "demo.yaml")


def test_quality_resume_keeps_finished_runs_and_runs_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--resume`` takes an earlier partial JSON's runs as they are and trains only the missing ones."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import quality

    def fake_run(loss: float) -> dict[str, dict[int, float]]:
        return {"loss": {10: loss + 1, 20: loss}, "inst_acc": {10: 0.1, 20: 0.2}, "knn_top1": {0: 70.0, 20: 80.0}}

    earlier = tmp_path / "earlier.json.partial"
    curves = {"divergent": {"ref-pil": [fake_run(5.0)], "ours-dali": []}}
    earlier.write_text(json.dumps({"seeds": [0, 1], "curves": curves}))  # string step keys, as JSON has them
    trained: list[tuple[str, int]] = []

    def run_arm(arm: str, protocol: str, flags: dict, work: Path, image_folder: Path) -> dict:
        trained.append((arm, flags["train.seed"]))
        return fake_run(3.0)

    monkeypatch.setattr(quality, "run_arm", run_arm)
    monkeypatch.setattr(quality, "unpack_to_image_folder", lambda shards, root: root)
    argv = ["--seeds", "0", "--protocols", "divergent", "--arms", "ref-pil", "ours-dali"]
    payload = quality.main([*argv, "--resume", str(earlier), "--json", str(tmp_path / "out.json")])
    assert trained == [("ours-dali", 0)]
    assert payload["summary"]["divergent"]["ref-pil"]["last_loss"] == pytest.approx(5.5)  # mean of the last losses
    assert payload["summary"]["divergent"]["ours-dali"]["last_loss"] == pytest.approx(3.5)


def test_gpu_suite_dry_run_of_the_vit(tmp_path: Path) -> None:
    """``--arch vit_base`` (issue 15's GPU row) in its CPU dry run: MoCo v3 on vit_tiny, every phase."""
    out = tmp_path / "vit.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--arch", "vit_base"]
    cmd += ["--checks", "placement", "--loader-batches", "0"]  # as gpu_suite.sh runs it, after the ResNet's run
    result = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["title"].startswith("gpu_suite: vit_tiny MoCo v3") and payload["pairs_per_s_compute"] > 0
    assert payload["max_batch"]["largest_batch_that_fits"] == 24 and not payload.get("failed")
    assert list(payload["correctness"]) == ["placement"] and payload["checks_failed"] == []


def test_gpu_suite_dry_run_runs_every_check(tmp_path: Path) -> None:
    """The ResNet's CPU dry run (CI's): the correctness phase's every check runs and passes, then the timed
    phases, the torch loader's device path among them."""
    out = tmp_path / "gpu_suite.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    checks = payload["correctness"]
    expected = {"placement", "ema", "memory_format", "split_bn", "decode"}
    assert expected <= set(checks) and {"training_resnet18_v2", "training_vit_tiny_v3", "cpu_twin_resnet18_v2"} <= set(
        checks
    )
    assert all(check["status"] == "pass" for check in checks.values()), checks
    assert payload["checks_failed"] == [] and payload["pairs_per_s_compute"] > 0
    assert payload["loader"]["pairs_per_s"] > 0 and "torch loader device path" in result.stdout
    table = result.stdout[result.stdout.index("| what") :]
    assert table.splitlines()[2].startswith("| check placement") and "PASS" in table  # the checks come first


class FrozenMomentum(MomentumUpdater):
    """A broken update: the first momentum forever, as a graph captured with the momentum baked in."""

    def __call__(self, momentum: float) -> None:
        self.first = getattr(self, "first", momentum)
        super().__call__(self.first)


class BlindToMoves(MomentumUpdater):
    """A broken update: keeps the tensors it first resolved after the module is moved or re-cast."""

    def _current_placement(self) -> tuple[int, ...]:
        return getattr(self, "_placement", ())


@pytest.mark.parametrize("broken", [FrozenMomentum, BlindToMoves])
def test_the_ema_check_fails_for_a_broken_update(monkeypatch: pytest.MonkeyPatch, broken: type) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_checks import check_ema

    assert check_ema(torch.device("cpu"), steps=16)["status"] == "pass"
    monkeypatch.setattr("moco_scale.moco.model.MomentumUpdater", broken)
    result = check_ema(torch.device("cpu"), steps=16)
    assert result["status"] == "fail" and result["tensors_differing"] > 0, result["detail"]


def test_our_initial_module_maps_onto_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ref-our-init`` (issue 13's A/B of the initialisation): the reference loads our launcher's initial module
    and its query encoder then computes what ours computes."""
    from moco_scale.config import load_config
    from moco_scale.moco import MoCo
    from moco_scale.models import build_backbone

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from quality import our_initial_state, protocol_flags
    from reference_moco import ReferenceMoCo

    cfg = load_config(ROOT / "configs" / "demo.yaml", protocol_flags("divergent", 1, 1))
    m = cfg.moco
    reference = ReferenceMoCo(cfg.model.arch, m.dim, True, m.queue_size, m.momentum, m.temperature)
    missing, unexpected = reference.load_state_dict(our_initial_state(cfg), strict=False)
    assert missing == ["queue_ptr"] and not unexpected
    ours = MoCo(build_backbone(cfg.model, cfg.data.image_size), m, world_size=2, cuda_graph_ema=False)
    ours.initialise(cfg.train.seed)
    assert torch.equal(reference.queue, ours.queue.keys.T)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reference.encoder_q.eval()(x), ours.encoder_q.eval()(x))
        torch.testing.assert_close(reference.encoder_k.eval()(x), ours.encoder_k.eval()(x))
