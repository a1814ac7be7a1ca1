"""The probe of z (utils/eval/probe.py, analysis/probe.py) on planted encoders whose answers are
known by construction, and on a tiny trained run."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from utils.eval.probe import detail_gap, nearest_class_mean, probe, rain_gap, scene_accuracy

TYPES, SCENES = 4, 6
# Rain type r adds OFFSETS[r] to every pixel: four directions, pairwise orthogonal after the
# scene's grey level (0.3) is removed.
OFFSETS = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.3], [-0.2, -0.2, -0.2]])


CLEAN_TINT = torch.tensor([0.3, 0.2, 0.1])[:, None, None]


def _texture(seed: int, size: int = 32) -> torch.Tensor:
    """A zero-mean texture per channel (3,size,size) of amplitude ~0.1: what tells scenes apart."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(3, size, size, generator=g) - 0.5
    return 0.2 * (t - t.mean(dim=(1, 2), keepdim=True))


def _planted_data(fit_scenes=range(100, 103), held_scenes=range(SCENES)):
    """fit: {type: rainy images}; held: {type: [(name, rainy, clean)]}: every held scene under every type."""
    names = [f"t{r}" for r in range(TYPES)]
    fit = {n: [0.3 + _texture(s) + OFFSETS[r, :, None, None] for s in fit_scenes] for r, n in enumerate(names)}
    # The clean images get a colour of their own, so that the rain encoder's code of them is defined.
    held = {n: [(f"{s:03d}.png", 0.3 + _texture(s) + OFFSETS[r, :, None, None], 0.3 + _texture(s) + CLEAN_TINT)
                for s in held_scenes] for r, n in enumerate(names)}
    return fit, held


def rain_encoder(x):
    """Knows the rain only: the mean colour minus the scenes' grey level (textures have zero mean)."""
    return F.normalize(x.mean(dim=(-2, -1)) - 0.3, dim=1)


def scene_encoder(x):
    """Knows the scene only: the texture, with each channel's mean (grey level + rain) removed."""
    return F.normalize((x - x.mean(dim=(-2, -1), keepdim=True)).flatten(1), dim=1)


def constant_encoder(x):
    return torch.ones(x.shape[0], 5)


def detail_encoder(x):
    """Sees detail only: the energy of the image's horizontal differences, against a constant."""
    energy = (x[..., 1:] - x[..., :-1]).pow(2).mean(dim=(1, 2, 3))
    return F.normalize(torch.stack([100 * energy, torch.full_like(energy, 0.05)], dim=1), dim=1)


def test_rain_encoder_is_right_everywhere_and_groups_by_rain():
    r = probe(rain_encoder, *_planted_data())
    assert r.accuracy == 1.0 and r.scene_accuracy == 1.0 and r.per_class == {f"t{i}": 1.0 for i in range(TYPES)}
    # Same rain: cos 1; same scene under two rains: the offsets' directions, orthogonal -> 0, except the
    # fourth, (-1,-1,-1)/sqrt(3), whose cos with the first three is -1/sqrt(3).
    pair_cos = F.normalize(OFFSETS, dim=1) @ F.normalize(OFFSETS, dim=1).T
    other_rain = pair_cos[~torch.eye(TYPES, dtype=torch.bool)].mean()
    assert r.rain_gap == pytest.approx(1.0 - float(other_rain), abs=1e-5)
    assert r.rain_retrieval == 1.0 and r.retrieval_chance == pytest.approx((SCENES - 1) / (TYPES * SCENES - 1))
    assert r.scenes == SCENES and r.held_out_images == TYPES * SCENES and r.fit_images == TYPES * 3
    assert abs(r.detail_gap) < 1e-3  # the mean colour ignores blur and flips


def test_scene_encoder_is_at_chance_and_groups_by_scene():
    r = probe(scene_encoder, *_planted_data())
    assert r.rain_gap < -0.9  # same scene: cos 1; two independent textures: about 0
    assert r.rain_retrieval == 0.0  # the nearest code is always the same scene under another rain
    assert r.accuracy <= 0.5 and r.scene_accuracy <= 0.5


def test_constant_encoder_scores_chance_and_no_gaps():
    r = probe(constant_encoder, *_planted_data())
    assert r.accuracy == 0.25 and r.chance == 0.25  # ties go to the first class: one type in four
    assert r.rain_gap == pytest.approx(0.0, abs=1e-12) and r.detail_gap == pytest.approx(0.0, abs=1e-12)


def test_detail_gap_sees_blur_and_ignores_flips():
    clean = [0.5 + _texture(s, 64) for s in range(4)]
    gap = detail_gap(detail_encoder, clean)
    assert gap > 0.05
    # by hand for one image: cos(z, z_flip) = 1, so the gap is 1 - cos(z, z_blur)
    from utils.eval.inference import ENCODER_SIZE
    from utils.images import resize_square
    from utils.train.exemplars import gaussian_blur

    x = resize_square(clean[0][None], ENCODER_SIZE)
    z, zb = detail_encoder(x).double(), detail_encoder(gaussian_blur(x, torch.full((1,), 1.5))).double()
    assert detail_gap(detail_encoder, clean[:1]) == pytest.approx(1 - float((z * zb).sum()), abs=1e-6)


def test_scene_accuracy_by_hand_leaves_each_scene_out():
    # Type 0 reads (1,0) on scene 0 and (.6,.8) on scene 1; type 1 reads (0,1) and (.8,.6).
    # Scene 1 left out: the means are scene 0's codes, (1,0) and (0,1); (.6,.8) is nearer (0,1) and
    # (.8,.6) nearer (1,0): both wrong. Scene 0 left out: the means are scene 1's codes, (.6,.8) and
    # (.8,.6); (1,0) is nearer (.8,.6) and (0,1) nearer (.6,.8): both wrong. 0 of 4. (Fitted on
    # every scene, the left-out ones included, 2 of 4 would be right.)
    codes = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]])
    assert scene_accuracy(codes) == 0.0
    # Three scenes, the third an outlier of type 0: 4 of 6 (scene 2's two codes wrong, the rest right).
    codes = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]]])
    assert scene_accuracy(codes) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="2 scenes"):
        scene_accuracy(codes[:, :1])


def test_scene_accuracy_does_not_read_the_fit_set():
    """Fitted on pictures of another kind (here each class's fit images carry another class's rain), the
    train-fitted accuracy fails while the accuracy fitted on the held-out set's other scenes does not."""
    fit, held = _planted_data()
    names = list(fit)
    shifted = {n: fit[names[(i + 1) % TYPES]] for i, n in enumerate(names)}
    r = probe(rain_encoder, shifted, held)
    assert r.accuracy == 0.0 and r.scene_accuracy == 1.0
    assert probe(constant_encoder, *_planted_data()).scene_accuracy == pytest.approx(1 / TYPES)  # ties: class 0


def test_summary_line_by_hand():
    from utils.eval.probe import ProbeResult

    r = ProbeResult(accuracy=0.4375, scene_accuracy=None, per_class={}, chance=0.25, rain_gap=-0.0824,
                    rain_retrieval=None, retrieval_chance=None, detail_gap=0.0005, fit_images=8, held_out_images=8,
                    scenes=1)
    assert r.summary() == "rain type 44 % (other scenes —, chance 25 %), rain gap -0.082, detail gap +0.001"


def test_nearest_class_mean_by_hand():
    fit = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]], dtype=torch.float64), dim=1)
    held = F.normalize(torch.tensor([[0.9, 0.3], [0.2, 1.0], [0.6, 0.5]], dtype=torch.float64), dim=1)
    # class means (unnormalised): (0.9-ish, 0.1-ish) and (0.05, 0.95): the third point is nearer class 0
    assert nearest_class_mean(fit, [0, 0, 1, 1], held).tolist() == [0, 1, 0]


def test_rain_gap_by_hand_on_two_types_two_scenes():
    a = F.normalize(torch.tensor([1.0, 0.0]), dim=0)
    b = F.normalize(torch.tensor([0.8, 0.6]), dim=0)
    c = F.normalize(torch.tensor([0.0, 1.0]), dim=0)
    codes = torch.stack([torch.stack([a, b]), torch.stack([c, a])]).double()  # [type][scene]
    gap, retrieval, chance = rain_gap(codes)
    same_rain = (a @ b + c @ a) / 2  # type 0: scenes 0,1; type 1: scenes 0,1
    same_scene = (a @ c + b @ a) / 2  # scene 0: types 0,1; scene 1: types 0,1
    assert gap == pytest.approx(float(same_rain - same_scene))
    # nearest other code: a(0,0): a(1,1) (cos 1), type 1 -> miss; b(0,1): a(0,0) and a(1,1) tie at 0.8, the
    # first wins, type 0 -> hit; c(1,0): b (0.6), type 0 -> miss; a(1,1): a(0,0) (1), type 0 -> miss
    assert retrieval == 0.25 and chance == pytest.approx(1 / 3)


def test_probe_refuses_mismatched_classes():
    fit, held = _planted_data()
    held.pop("t3")
    with pytest.raises(ValueError, match="classes differ"):
        probe(rain_encoder, fit, held)


@pytest.fixture(scope="module")
def tiny_trained_brn(tmp_path_factory, tiny_demo):
    """A tiny CoIC BRN trained on the demo's four types, probed every 2 iterations on their val splits."""
    from utils.data.demo import demo_splits
    from helpers import make_trainer

    save = tmp_path_factory.mktemp("probe_run")
    trainer = make_trainer(save, list(demo_splits(tiny_demo, "train").values()), tot_iters=4, stage1_iters=1,
                           probe_freq=2, probe_paths=",".join(demo_splits(tiny_demo, "val").values()))
    return trainer.train()


def test_training_logs_the_probe_every_probe_freq_iterations(tiny_trained_brn):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.dirname(tiny_trained_brn))
    events.Reload()
    for tag in ("probe/rain_type_accuracy", "probe/scene_accuracy", "probe/rain_gap", "probe/rain_retrieval",
                "probe/detail_gap"):
        assert [e.step for e in events.Scalars(tag)] == [0, 2, 4], tag
    assert all(0 <= e.value <= 1 for e in events.Scalars("probe/rain_type_accuracy"))


def test_probe_command_on_a_tiny_trained_run(tiny_trained_brn, tiny_demo, tmp_path, capsys):
    """The command runs on a checkpoint of a tiny CoIC run, beside an untrained encoder, on the demo's
    held-out split, and writes what it printed."""
    from analysis.probe import main

    out = str(tmp_path / "probe")
    assert main(["--feat_ext", tiny_trained_brn, "--untrained", "--demo_root", tiny_demo, "--save_path", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "probe.json")) as f:
        results = json.load(f)
    assert set(results) == {os.path.basename(tiny_trained_brn), "untrained"}
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["chance"] == 0.25
        assert r["scenes"] == 8 and r["held_out_images"] == 32  # 8 validation scenes under each of 4 types
        assert r["rain_gap"] is not None and r["detail_gap"] is not None
    assert "untrained" in printed and "rain-type accuracy" in printed
    with open(os.path.join(out, "probe.md")) as f:
        assert f.read() == printed


def test_probe_command_needs_an_encoder(tiny_demo, tmp_path, capsys):
    from analysis.probe import main

    assert main(["--demo_root", tiny_demo, "--save_path", str(tmp_path / "p")]) == 2
    assert "--feat_ext" in capsys.readouterr().err
