"""DeiT's recipe end to end: one `zosam train` on a generated ImageFolder, every piece checked to act.

The images of a class are one flat colour, so anything but a flat image of that colour in a
training input that Mixup/CutMix left alone (a "pure" batch: one-hot targets) comes from
RandAugment or random erasing (random-resized crop and flip keep a flat image flat).
Torch's global module hooks (a public API, nothing replaced) watch every forward pass: the
model's inputs, the soft-target loss and drop-path.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from zosam.cli import main
from zosam.engine import CHECKPOINT_FILE
from zosam.runner import run

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
SMOOTHING = 0.1


def _image_tree(root: Path, train_per_class: int = 16, val_per_class: int = 4) -> list[torch.Tensor]:
    """Flat-colour JPEGs in ``root/{train,val}/c<k>/``; returns each class's decoded colour, normalised."""
    refs = []
    for k, colour in enumerate(COLOURS):
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            d = root / split / f"c{k}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), colour).save(d / f"{i}.jpg", quality=95)
        decoded = torch.tensor(Image.open(root / "train" / f"c{k}" / "0.jpg").getpixel((20, 20)), dtype=torch.float32)
        refs.append((decoded / 255 - MEAN) / STD)
    return refs


def _noise_pixels(img: torch.Tensor) -> int:
    """Pixels of channel 0 that differ by > 0.2 from all four neighbours: per-pixel noise
    (random erasing's pixel mode) has many; flat regions, edges and blends have none."""
    c = img[0]
    mid = c[1:-1, 1:-1]
    diffs = [(mid - c[1:-1, :-2]).abs(), (mid - c[1:-1, 2:]).abs(), (mid - c[:-2, 1:-1]).abs(),
             (mid - c[2:, 1:-1]).abs()]
    return int(torch.stack(diffs).gt(0.2).all(0).sum())


def test_deit_recipe_every_piece_acts(tmp_path: Path) -> None:
    refs = _image_tree(tmp_path / "imagenet")
    cfg = {
        "name": "deit-recipe", "seed": 0, "epochs": 2, "device": "cpu", "label_smoothing": SMOOTHING,
        # mixup_prob 0.5 (DeiT: 1.0) leaves some batches pure, where the pixel checks see the transforms alone.
        "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 0.5, "mixup_switch_prob": 0.5, "mixup_mode": "batch",
        "model_ema_decay": 0.9,
        "data": {"name": "imagenet", "data_dir": str(tmp_path / "imagenet"), "image_size": 32, "batch_size": 8,
                 "eval_batch_size": 12, "num_workers": 1, "imagenet_recipe": "deit", "repeated_aug": 3},
        "model": {"name": "deit_tiny", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.1},
        "optimizer": {"name": "zosam", "base": "adamw", "lr": 5.0e-4, "weight_decay": 0.05, "rho": 0.05,
                      "mu": 1.0e-3, "q": 1, "filter_bias_and_bn": True},
        "sparse": {"method": "rigl", "density": 0.5, "update_interval": 4, "dense_first_layer": True,
                   "dense_classifier": True},
        "schedule": {"warmup_epochs": 0.5},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "deit.yaml"
    path.write_text(yaml.safe_dump(cfg))

    from timm.layers import DropPath
    from timm.loss import SoftTargetCrossEntropy
    from timm.models.vision_transformer import VisionTransformer

    events: list[tuple[str, object, torch.Tensor, bool]] = []  # (kind, module, tensor, training)
    drop_path_acted = {True: 0, False: 0}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, VisionTransformer):
            events.append(("model", module, args[0].detach().clone(), module.training))
        elif isinstance(module, SoftTargetCrossEntropy):
            events.append(("targets", module, args[1].detach().clone(), True))
        elif isinstance(module, DropPath):
            drop_path_acted[module.training] += int(not torch.equal(out, args[0]))

    handle = nn.modules.module.register_module_forward_hook(hook)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, more threads of a tiny model mostly wait on each other
    try:
        assert main(["train", "--config", str(path), "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    steps = ckpt["global_step"]
    assert steps == 2 * 6  # 48 images, batch 8

    train = [(m, x) for kind, m, x, training in events if kind == "model" and training]
    # (other eval-mode passes, of one sample, count FLOPs for the summary)
    evals = [(m, x) for kind, m, x, training in events if kind == "model" and not training and len(x) == 12]
    targets = [t for kind, _, t, _ in events if kind == "targets"]
    trained_module = train[0][0]

    # Mixup/CutMix: drawn once per step. ZO-SAM runs 3 passes a step (2 queries, 1 gradient)
    # and every pass sees the same mixed batch and the same soft targets.
    assert len(train) == len(targets) == 3 * steps
    for s in range(steps):
        xs, ts = [x for _, x in train[3 * s:3 * s + 3]], targets[3 * s:3 * s + 3]
        assert all(torch.equal(xs[0], x) for x in xs) and all(torch.equal(ts[0], t) for t in ts), s
    per_step = [(train[3 * s][1], targets[3 * s]) for s in range(steps)]
    # Soft targets (label smoothing in them, rows sum to 1); mixed batches hold two classes per row.
    pure_max = 1 - SMOOTHING + SMOOTHING / 3
    for _, t in per_step:
        assert t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8))
        assert t.min() >= SMOOTHING / 3 - 1e-6 and t.max() <= pure_max + 1e-6
    pure = [(x, t.argmax(1)) for x, t in per_step if torch.allclose(t.max(1).values, torch.full((8,), pure_max))]
    mixed = [t for _, t in per_step if not torch.allclose(t.max(1).values, torch.full((8,), pure_max))]
    assert pure and mixed
    assert any(((t > SMOOTHING / 3 + 0.05).sum(1) == 2).any() for t in mixed)

    # Evaluation, after each epoch: the EMA (another module than the trained one, reported),
    # then the trained weights (reported as test_loss_raw); val images are flat.
    assert [m is trained_module for m, _ in evals] == [False, True, False, True]
    for _, x in evals:
        assert (x.amax((2, 3)) - x.amin((2, 3))).max() < 0.05

    # RandAugment and random erasing changed the pixels of pure (unmixed) training images.
    erased = changed = 0
    for x, labels in pure:
        for img, k in zip(x, labels, strict=True):
            noise = _noise_pixels(img)
            erased += noise >= 5
            changed += noise == 0 and (img - refs[k].view(3, 1, 1)).abs().max() > 0.2
    assert erased > 0 and changed > 0

    # Repeated augmentation: the sampler deals each image 3 times in a row, so neighbours in
    # a pure batch share their class far more often than the 1 in 3 of a plain shuffle.
    same = [int(a == b) for _, labels in pure for a, b in pairwise(labels.tolist())]
    assert sum(same) / len(same) > 0.6

    # Drop-path: active in training (it rescales or drops every sample), the identity in evaluation.
    assert drop_path_acted[True] > 0 and drop_path_acted[False] == 0

    # Weight decay: norms, biases, pos_embed and cls_token in a group without it.
    model_state = ckpt["model"]
    groups = ckpt["optimizer"]["base"]["param_groups"]
    state = ckpt["optimizer"]["base"]["state"]
    shapes = {g["weight_decay"]: [tuple(state[i]["exp_avg"].shape) for i in g["params"]] for g in groups}
    assert set(shapes) == {0.0, 0.05}
    embed = {tuple(model_state["pos_embed"].shape), tuple(model_state["cls_token"].shape)}
    assert all(len(s) == 1 or s in embed for s in shapes[0.0])
    assert len(shapes[0.0]) == sum(t.dim() == 1 for t in model_state.values()) + 2
    assert all(len(s) >= 2 and s not in embed for s in shapes[0.05])

    # EMA: in the checkpoint, different from the weights, as sparse as they are, and what was reported.
    ema = ckpt["ema"]
    assert ema.keys() == model_state.keys()
    assert any(not torch.equal(ema[n], model_state[n]) for n in ema)
    for name, mask in ckpt["masking"]["masks"].items():
        assert not mask.all() and ema[name][~mask].abs().max() == 0, name
    last = ckpt["history"][-1]
    assert last["test_loss"] != last["diagnostics"]["test_loss_raw"]
    assert abs(last["test_loss"] - _val_loss(tmp_path / "imagenet", ema)) < 1e-4
    assert abs(last["diagnostics"]["test_loss_raw"] - _val_loss(tmp_path / "imagenet", model_state)) < 1e-4


def _val_loss(root: Path, state: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy on val/ of a DeiT-Tiny with ``state`` (the run's eval transform)."""
    import torch.nn.functional as F

    from zosam.data import DataConfig, load_dataset
    from zosam.models import create_model

    bundle = load_dataset(DataConfig(name="imagenet", data_dir=str(root), image_size=32, num_workers=0))
    model = create_model("deit_tiny", 3, img_size=32, patch_size=8)
    model.load_state_dict(state)
    model.eval()
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


DIGITS = ["data.name=digits", "data.image_size=16", "data.train_subset=128", "data.test_subset=64",
          "data.batch_size=16", "model.name=tiny_cnn", "model.width=8", "optimizer.name=sam", "optimizer.rho=0.05",
          "optimizer.filter_bias_and_bn=true", "mixup=0.8", "cutmix=1.0", "label_smoothing=0.1",
          "model_ema_decay=0.8", "sparse.method=rigl", "sparse.density=0.5", "sparse.update_interval=2",
          "sparse.dense_first_layer=false", "epochs=2", "max_steps_per_epoch=3", "tracking.enabled=false",
          "seed=5"]


def test_mixup_and_ema_resume_exactly(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, a run with Mixup/CutMix and an EMA ends where an
    uninterrupted one does: the mix of step t is drawn from (seed, t), the EMA is in the checkpoint."""
    from zosam.config import load_config

    cfg = load_config(None, DIGITS)

    def stop(trainer, res, path, logger) -> None:
        if res.epoch == 0:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        run(cfg, checkpoint_dir=tmp_path / "a", on_epoch=stop, log=None)
    assert torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)["epoch"] == 0
    assert run(cfg, resume=True, checkpoint_dir=tmp_path / "a", log=None).status == "finished"
    assert run(cfg, checkpoint_dir=tmp_path / "b", log=None).status == "finished"
    a, b = (torch.load(tmp_path / d / CHECKPOINT_FILE, weights_only=True) for d in "ab")
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    assert any(not torch.equal(a["ema"][n], a["model"][n]) for n in a["model"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_step_mixup_is_a_function_of_seed_and_step_and_leaves_numpy_alone() -> None:
    import numpy as np

    from zosam.recipe import StepMixup

    mix = StepMixup(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, seed=3)
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    state = np.random.get_state()
    a = [mix(x.clone(), y, step) for step in range(6)]
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]  # the global stream did not move
    b = [mix(x.clone(), y, step) for step in range(6)]
    for (xa, ta), (xb, tb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert len({tuple(t[1].tolist()) for _, t in a}) > 1  # the mix differs from step to step
    other = StepMixup(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, seed=4)(x.clone(), y, 0)
    assert not torch.equal(other[1], a[0][1])


BAD_RECIPE = [
    (["mixup=-0.5"], "mixup=-0.5 is invalid"),
    (["cutmix=-1"], "cutmix=-1 is invalid"),
    (["mixup_prob=1.5"], "mixup_prob=1.5 is invalid"),
    (["mixup_switch_prob=-1"], "mixup_switch_prob=-1 is invalid"),
    (["mixup_mode=pixel"], "mixup_mode='pixel' is invalid; allowed: 'batch', 'pair', 'elem'"),
    (["mixup=0.8", "data.batch_size=7"], "data.batch_size=7 is invalid with mixup/cutmix"),
    (["model_ema_decay=1"], "model_ema_decay=1 is invalid; must be a number in (0, 1)"),
    (["optimizer.filter_bias_and_bn=maybe"], "optimizer.filter_bias_and_bn='maybe' is invalid; allowed: true, false"),
    (["data.repeated_aug=0"], "data.repeated_aug=0 is invalid"),
    (["data.repeated_aug=3"], "data.repeated_aug=3 is invalid for data.name='digits'"),
]


@pytest.mark.parametrize(("overrides", "start"), BAD_RECIPE, ids=[" ".join(o) for o, _ in BAD_RECIPE])
def test_bad_recipe_fields_are_config_errors_naming_the_field(overrides: list[str], start: str) -> None:
    from zosam.config import load_config
    from zosam.validate import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.name=tiny_cnn", "data.name=digits", *overrides])
    assert str(info.value).startswith(start), str(info.value)


def test_weight_decay_groups_skip_norms_biases_and_embeddings() -> None:
    from zosam.config import OptimizerConfig
    from zosam.models import create_model

    model = create_model("deit_tiny", 10, img_size=32, patch_size=8)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = OptimizerConfig.from_dict({"name": "base", "base": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                     "filter_bias_and_bn": True}).build(model, model=None)
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"} <= by_decay[0.0]
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= by_decay[0.05]
    assert by_decay[0.0].isdisjoint(by_decay[0.05]) and len(by_decay[0.0] | by_decay[0.05]) == len(names)
    # Off (the default): one group, everything decayed, as before.
    plain = OptimizerConfig.from_dict({"name": "base", "base": "adamw", "lr": 1e-3, "weight_decay": 0.05})
    assert [g["weight_decay"] for g in plain.build(model, model=None).param_groups] == [0.05]


def test_soft_target_loss_per_sample_agrees_with_timms_mean() -> None:
    from zosam.recipe import soft_target_loss

    g = torch.Generator().manual_seed(0)
    out, t = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g).softmax(1)
    loss = soft_target_loss()
    per_sample = loss(out, t, reduction="none")
    assert per_sample.shape == (6,)
    torch.testing.assert_close(per_sample.mean(), loss(out, t))
    torch.testing.assert_close(per_sample, -(t * out.log_softmax(1)).sum(1))
