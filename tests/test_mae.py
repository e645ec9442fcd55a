"""mae_jax.py: masking and the loss against MAE's definitions, encoder parity with timm's `vit_*.mae`, loading
official-layout weights, layer-wise lr decay and LARS, pretraining / probing / fine-tuning on digits, conversion of
every stage to timm, exact resume and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import REPO, assert_states_close

import mae_jax
from common import checkpoint, convert, jax_augment, loop, optim, schedules
from common.runlog import read_log

# A 2-block ViT on 16 px digits with 4 px patches (16 patches, 4 visible at mask ratio 0.75). Pretraining a
# minute on 1,437 images teaches such a model the digits' shapes (raw pixel targets: the 2x2-pixel patches of
# upscaled 8x8 digits are mostly flat, so per-patch normalisation leaves little to learn), but not yet a cls
# token worth probing: the probe reads the mean patch token (main_linprobe.py --global_pool), and both
# downstream runs are short, where a better start shows (with long runs random init catches up on digits).
MODEL = ["--data", "digits", "--image-size", "16", "--patch-size", "4", "--layers", "2", "--dim", "64",
         "--heads", "4", "--dtype", "float32", "--workers", "0", "--eval-batch-size", "120", "--log-interval", "10"]
PRETRAIN = ["pretrain", *MODEL, "--decoder-layers", "1", "--decoder-dim", "32", "--decoder-heads", "4",
            "--batch-size", "64", "--learning-rate", "1.5e-3", "--warmup-epochs", "2", "--no-norm-pix-loss"]
PROBE = ["linprobe", *MODEL, "--batch-size", "128", "--random-crop", "none", "--learning-rate", "6.4",
         "--lr-ref-batch", "0", "--epochs", "4", "--warmup-epochs", "1", "--eval-interval", "1000", "--pooling", "gap"]
FINETUNE = ["finetune", *MODEL, "--batch-size", "64", "--random-crop", "none", "--auto-augment", "none",
            "--random-erasing", "0", "--mixup", "0", "--cutmix", "0", "--label-smoothing", "0",
            "--droppath", "0", "--learning-rate", "2e-3", "--epochs", "2", "--warmup-epochs", "0.5",
            "--eval-interval", "1000"]


def evals(run_dir, key: str) -> list[float]:
    return [r[key] for r in read_log(run_dir) if key in r]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def assert_trees_equal(a, b, path=""):
    assert a.keys() == b.keys(), path
    for key in a:
        if isinstance(a[key], dict):
            assert_trees_equal(a[key], b[key], f"{path}/{key}")
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path}/{key}")


# ---------------------------------------------------------------------------------------------- masking, loss

def test_masking_keeps_int_n_patches_per_sample_and_restores_order():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 196, 8))
    masking = jax.jit(mae_jax.random_masking, static_argnums=2)
    kept, mask, ids_restore = masking(jax.random.PRNGKey(1), x, 0.75)
    assert kept.shape == (4, 49, 8)  # int(196 * 0.25), models_mae.py's len_keep
    np.testing.assert_array_equal(mask.sum(axis=1), [147] * 4)
    for b in range(4):  # the kept rows are exactly the unmasked patches, none twice
        visible = np.flatnonzero(np.asarray(mask[b]) == 0)
        np.testing.assert_array_equal(np.sort(np.asarray(kept[b]), axis=0), np.sort(np.asarray(x[b, visible]), axis=0))
    removed = jnp.zeros((4, 147, 8))  # [kept, removed] unshuffled by ids_restore: the original order
    restored = jnp.take_along_axis(jnp.concatenate([kept, removed], 1), ids_restore[:, :, None], axis=1)
    np.testing.assert_array_equal(np.where(np.asarray(mask)[..., None] == 0, x, 0), restored)
    assert len({tuple(np.asarray(m)) for m in mask}) == 4  # each sample draws its own mask
    _, mask_odd, _ = masking(jax.random.PRNGKey(2), x[:, :10], 0.6)
    np.testing.assert_array_equal(mask_odd.sum(axis=1), [10 - int(10 * 0.4)] * 4)


def test_loss_counts_the_removed_patches_only():
    pred = jnp.zeros((2, 4, 3))
    target = jnp.arange(24, dtype=jnp.float32).reshape(2, 4, 3) / 10
    mask = jnp.array([[1, 0, 0, 1], [0, 1, 0, 0]], jnp.float32)
    per_patch = (np.asarray(target) ** 2).mean(-1)
    expected = (per_patch[0, 0] + per_patch[0, 3] + per_patch[1, 1]) / 3
    np.testing.assert_allclose(mae_jax.reconstruction_loss(pred, target, mask), expected, rtol=1e-6)
    wrong_visible = pred.at[0, 1].set(100.0).at[1, 3].set(-7.0)  # errors on visible patches cost nothing
    np.testing.assert_allclose(mae_jax.reconstruction_loss(wrong_visible, target, mask), expected, rtol=1e-6)
    np.testing.assert_allclose(mae_jax.per_sample_loss(pred, target, mask),
                               [(per_patch[0, 0] + per_patch[0, 3]) / 2, per_patch[1, 1]], rtol=1e-6)


def test_patch_targets_follow_models_mae():
    """patchify in (row, column, channel) order and the norm-pix target with the unbiased variance, as
    models_mae.py computes them on NCHW tensors."""
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    imgs = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = imgs.reshape(2, 3, 2, 4, 2, 4)
    expected = torch.einsum("nchpwq->nhwpqc", x).reshape(2, 4, 4 * 4 * 3)
    mean, var = expected.mean(dim=-1, keepdim=True), expected.var(dim=-1, keepdim=True)
    np.testing.assert_allclose(mae_jax.patch_targets(jnp.asarray(images), 4, norm_pix=False), expected, rtol=1e-6)
    np.testing.assert_allclose(mae_jax.patch_targets(jnp.asarray(images), 4, norm_pix=True),
                               (expected - mean) / (var + 1e-6) ** 0.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mae_jax.unpatchify(mae_jax.patchify(jnp.asarray(images), 4), 4), images)


# ---------------------------------------------------------------------------------------------- timm parity

def forward_features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def test_encoder_gives_the_features_of_timm_vit_base_mae():
    """By name: timm's `vit_base_patch16_224.mae` (random weights, built at depth 2, every tensor perturbed) and
    our b16 encoder at depth 2 give the same features in float32; timm -> Flax -> timm is bit-exact; at full depth
    the Flax encoder has exactly the tensors (names and shapes) of the timm model."""
    import timm

    with torch.device("meta"):
        full = timm.create_model("vit_base_patch16_224.mae", pretrained=False)
    full_flax = jax.eval_shape(lambda: mae_jax.VisionTransformer(mae_jax.ViTConfig()).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"])
    assert full.num_classes == 0
    full_as_timm = convert.flax_to_timm(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.int8), full_flax))
    assert {k: v.shape for k, v in full_as_timm.items()} == {k: v.shape for k, v in full.state_dict().items()}
    reference = timm.create_model("vit_base_patch16_224.mae", pretrained=False, depth=2).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial LayerNorms, biases and position embedding
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = reference.state_dict()
    params = convert.timm_to_flax(state)
    back = convert.flax_to_timm(params)
    assert back.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)

    model = mae_jax.VisionTransformer(mae_jax.ViTConfig(layers=2))  # b16, cls pooling, no head: the .mae encoder
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    ours, _, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.tokens))(params, images)
    np.testing.assert_allclose(np.asarray(ours), forward_features(reference, images), atol=1e-4, rtol=1e-4)


def tiny_run_config(**overrides) -> dict:
    return dict(image_size=16, patch_size=4, layers=2, dim=64, heads=4, num_classes=0, pooling="cls",
                class_token=True, no_embed_class=False, **overrides)


def test_official_checkpoint_with_decoder_loads_into_the_finetune_model(tmp_path):
    """An official-layout MAE file ({'model': state dict} with the decoder) initialises fine-tuning: every encoder
    tensor arrives unchanged, the decoder is dropped, head and fc_norm stay new, the pos-emb is resized."""
    from timm.models.vision_transformer import VisionTransformer

    reference = VisionTransformer(**convert.timm_kwargs(tiny_run_config()))
    encoder = {k: v.clone() for k, v in reference.state_dict().items()}
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
               "decoder_blocks.0.attn.qkv.weight": torch.zeros(96, 32), "decoder_pred.bias": torch.zeros(48)}
    torch.save({"model": {**encoder, **decoder}, "epoch": 799}, tmp_path / "mae_pretrain.pth")

    for image_size in (16, 24):  # a 4x4 grid as pretrained, then 6x6: the pos-emb resized bicubically
        config = mae_jax.ViTConfig(image_size=image_size, patch_size=4, layers=2, dim=64, heads=4)
        model = mae_jax.VisionTransformer(config, num_classes=10, pooling="gap")
        template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
        loaded = mae_jax.load_encoder(template["params"], str(tmp_path / "mae_pretrain.pth"), config)
        assert loaded["head"] is template["params"]["head"] and loaded["fc_norm"] is template["params"]["fc_norm"]
        flat = convert.flax_to_timm({k: v for k, v in loaded.items() if k not in ("head", "fc_norm")})
        assert flat.keys() == {k for k in encoder if not k.startswith("norm.")}  # decoder and final norm dropped
        for name, value in flat.items():
            expected = encoder[name].numpy()
            if name == "pos_embed" and image_size != 16:
                expected = convert.resize_pos_embed(expected, 6, prefix_rows=1)
            np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------- optimizers

def test_layer_decay_gives_each_parameter_its_scale():
    """Fine-tuning's AdamW with layer decay 0.65 on a 3-block model: the first Adam step moves every parameter by
    lr * 0.65 ** (depth + 1 - layer id) (embeddings 0, block i -> i + 1, fc_norm and head depth + 1)."""
    depth, decay, lr = 3, 0.65, 1e-3
    config = mae_jax.ViTConfig(image_size=16, patch_size=4, layers=depth, dim=32, heads=2)
    model = mae_jax.VisionTransformer(config, num_classes=5, pooling="gap")
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    params = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape), shapes)
    expected = {"patch_embed": decay**4, "cls_token": decay**4, "pos_embed": decay**4, "blocks_0": decay**3,
                "blocks_1": decay**2, "blocks_2": decay, "fc_norm": 1.0, "head": 1.0}
    assert expected.keys() == params.keys()
    optimizer = optim.make_optimizer("adamw", lr, params, weight_decay=0.0, layer_decay=decay, depth=depth)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    for name, scale in expected.items():
        for leaf in jax.tree_util.tree_leaves(updates[name]):
            np.testing.assert_allclose(-np.asarray(leaf), lr * scale, rtol=1e-4, err_msg=name)
        for leaf in jax.tree_util.tree_leaves(schedules.layer_decay_scales(params, depth, decay)[name]):
            assert leaf == pytest.approx(scale), name


def test_lars_follows_mae_util_lars():
    """Two steps against MAE's util/lars.py (MoCo v3's LARS) written out in numpy: weight decay and the trust
    ratio on matrices only, momentum on the scaled update, then the lr."""
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(2)]
    lrs, wd, momentum, trust = [0.5, 0.2], 0.1, 0.9, 0.001
    schedule = lambda step: jnp.asarray(lrs)[step]  # noqa: E731
    optimizer = optim.lars(schedule, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    state, ours = optimizer.init(params), dict(params)
    expected, mu = {k: v.astype(np.float64) for k, v in params.items()}, {k: 0.0 for k in params}
    for step in range(2):
        updates, state = optimizer.update(grads[step], state, ours)
        ours = optax.apply_updates(ours, updates)
        for name, p in expected.items():
            dp = grads[step][name].astype(np.float64)
            if p.ndim > 1:
                dp = dp + wd * p
                dp = dp * (trust * np.linalg.norm(p) / np.linalg.norm(dp))
            mu[name] = momentum * mu[name] + dp
            expected[name] = p - lrs[step] * mu[name]
    for name in params:
        np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, err_msg=name)


def test_stage_presets_are_the_papers():
    """Tables 8-10 and the official code: blr, batch, betas, wd, warmup, epochs, layer decay, drop path."""
    pre = mae_jax.parse_args(["pretrain", "--model", "b16"])
    assert (pre.lr, pre.batch_size, pre.adam_b2, pre.weight_decay, pre.warmup_epochs, pre.epochs,
            pre.mask_ratio, pre.norm_pix_loss, pre.decoder_layers, pre.decoder_dim, pre.min_crop_scale) == \
        (1.5e-4, 4096, 0.95, 0.05, 40, 800, 0.75, True, 8, 512, 0.2)
    assert schedules.scaled_lr(pre.lr, pre.batch_size, pre.lr_ref_batch) == pytest.approx(2.4e-3)
    for model, lr, epochs, decay, droppath in [("b16", 5e-4, 100, 0.65, 0.1), ("l16", 1e-3, 50, 0.75, 0.2),
                                               ("h14", 1e-3, 50, 0.75, 0.3)]:
        ft = mae_jax.parse_args(["finetune", "--model", model])
        assert (ft.lr, ft.epochs, ft.layer_decay, ft.drop_path, ft.batch_size, ft.warmup_epochs,
                ft.min_lr, ft.weight_decay, ft.mixup, ft.cutmix, ft.label_smoothing, ft.random_erasing,
                ft.auto_augment) == (lr, epochs, decay, droppath, 1024, 5, 1e-6, 0.05, 0.8, 1.0, 0.1, 0.25,
                                     "rand-m9-mstd0.5-inc1")
    probe = mae_jax.parse_args(["linprobe", "--model", "l16"])
    assert (probe.lr, probe.batch_size, probe.weight_decay, probe.warmup_epochs, probe.epochs,
            probe.pooling) == (0.1, 16384, 0.0, 10, 50, "cls")
    assert schedules.scaled_lr(probe.lr, probe.batch_size, probe.lr_ref_batch) == pytest.approx(6.4)


# ---------------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """MAE pretraining on digits; the checkpoint the probing, fine-tuning and conversion tests start from."""
    out = tmp_path_factory.mktemp("mae") / "pretrain"
    assert mae_jax.main([*PRETRAIN, "--epochs", "30", "--eval-interval", "220", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def downstream(pretrained, tmp_path_factory):
    """Linear probe and fine-tune, each from the pretrained encoder and from random init: {(stage, init): dir}."""
    root = tmp_path_factory.mktemp("mae_downstream")
    runs = {}
    for stage, argv in (("linprobe", PROBE), ("finetune", FINETUNE)):
        for init in ("pretrained", "random"):
            out = root / f"{stage}_{init}"
            init_args = ["--init", str(pretrained)] if init == "pretrained" else []
            assert mae_jax.main([*argv, *init_args, "--output-dir", str(out)]) == 0
            runs[stage, init] = out
    return runs


def test_pretraining_lowers_the_reconstruction_loss(pretrained):
    val = evals(pretrained, "val_loss")
    assert len(val) == 3 and val[-1] < 0.9 * val[0], val
    config = json.loads((pretrained / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["peak_lr"] == pytest.approx(1.5e-3 * 64 / 256)


@pytest.mark.parametrize("stage", ["linprobe", "finetune"])
def test_pretrained_encoder_beats_random_init(downstream, stage):
    pretrained_top1 = evals(downstream[stage, "pretrained"], "val_top1")[-1]
    random_top1 = evals(downstream[stage, "random"], "val_top1")[-1]
    assert pretrained_top1 > random_top1 + 5, (pretrained_top1, random_top1)


def test_visualize_writes_a_grid_of_reconstructions(pretrained):
    from PIL import Image

    assert mae_jax.main([*PRETRAIN, "--output-dir", str(pretrained), "--visualize", "3"]) == 0
    grid = Image.open(pretrained / "reconstructions.png")
    assert grid.size == (4 * 16 * 6, 3 * 16 * 6)  # 4 columns x 3 images of 16 px, zoomed 6x
    pixels = np.asarray(grid.convert("RGB"))[::6, ::6].astype(np.float64)  # back to 16 px tiles: (3 x 16, 4 x 16)
    mean_color = np.round(np.asarray(jax_augment.IMAGENET_DEFAULT_MEAN) * 255)  # a removed patch: 0 after normalising
    errors = {"reconstruction": 0.0, "masked": 0.0}
    for row in range(3):
        original, masked, pasted, reconstruction = (pixels[16 * row:16 * row + 16, 16 * col:16 * col + 16]
                                                    for col in range(4))
        patches = lambda x: x.reshape(4, 4, 4, 4, 3).swapaxes(1, 2).reshape(16, 16 * 3)  # noqa: E731 (4 px patches)
        removed = np.all(np.abs(patches(masked) - np.tile(mean_color, 16)) <= 1, axis=1)
        assert removed.sum() == 12, f"image {row}: mask ratio 0.75 of 16 patches, got {removed.sum()} removed"
        np.testing.assert_array_equal(patches(masked)[~removed], patches(original)[~removed])
        np.testing.assert_array_equal(patches(pasted)[~removed], patches(original)[~removed])
        np.testing.assert_array_equal(patches(pasted)[removed], patches(reconstruction)[removed])
        for name, panel in (("reconstruction", reconstruction), ("masked", masked)):
            errors[name] += ((patches(panel)[removed] - patches(original)[removed]) ** 2).sum()
    # On the removed patches the reconstruction is nearer the original than the masked input's flat grey (measured:
    # about 0.8 of its squared error after this short pretraining; a random-init decoder is farther than the grey).
    assert errors["reconstruction"] < 0.9 * errors["masked"], errors


def converted(run_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_flax_to_timm", REPO / "scripts" / "convert_flax_to_timm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / f"{run_dir.name}.pth"
    assert script.main([str(run_dir), "--out", str(out)]) == 0, capsys.readouterr().err
    return torch.load(out), capsys.readouterr().out


def timm_model(run_dir, state):
    from timm.models.vision_transformer import VisionTransformer

    kwargs = convert.timm_kwargs(json.loads((run_dir / "config.json").read_text()))
    model = VisionTransformer(**kwargs).eval()
    model.load_state_dict(state, strict=True)
    return model


def digit_images(count: int = 8) -> np.ndarray:
    from sklearn.datasets import load_digits

    small = load_digits().images[:count] / 16.0
    big = np.kron(small, np.ones((2, 2)))[..., None].repeat(3, -1)  # 16 px RGB, white digits on black
    return ((big - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype(np.float32)


def test_every_stage_converts_to_timm(pretrained, downstream, tmp_path, capsys):
    """Pretraining -> timm ViT without head (`vit_*.mae` layout, decoder dropped); fine-tune -> GAP + fc_norm;
    linear probe -> cls token with the BatchNorm folded into the head. timm's outputs equal ours."""
    images = digit_images()
    state, printed = converted(pretrained, tmp_path, capsys)
    assert not any(name.startswith(("decoder", "mask_token")) for name in state)
    params, _ = checkpoint.load_params_and_config(pretrained)
    decoder = {"decoder_embed", "mask_token", "decoder_blocks_0", "decoder_norm", "decoder_pred"}
    assert params.keys() == {"encoder", *decoder}
    config = mae_jax.ViTConfig(image_size=16, patch_size=4, layers=2, dim=64, heads=4)
    encoder = mae_jax.VisionTransformer(config, fixed_pos_embed=True)
    ours, _, _ = jax.jit(lambda p, x: encoder.apply({"params": p}, x, method=encoder.tokens))(params["encoder"], images)
    np.testing.assert_allclose(forward_features(timm_model(pretrained, state), images), ours, atol=1e-4)

    for stage in ("finetune", "linprobe"):
        run_dir = downstream[stage, "pretrained"]
        state, printed = converted(run_dir, tmp_path, capsys)
        saved, _ = checkpoint.load_state_and_config(run_dir)
        args = mae_jax.parse_args(PROBE if stage == "linprobe" else FINETUNE)
        model, head, _ = mae_jax.init_state(args, 10)
        weights = mae_jax.eval_weights(args, saved)
        if head is None:
            expected = jax.jit(model.apply)({"params": weights["params"]}, images)
        else:
            features = jax.jit(model.apply)({"params": weights["encoder"]}, images)
            expected = head.apply({"params": weights["params"], "batch_stats": weights["batch_stats"]}, features,
                                  train=False)
        with torch.no_grad():
            theirs = timm_model(run_dir, state)(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(theirs, expected, atol=1e-4, rtol=1e-4, err_msg=stage)
        assert stage != "finetune" or "avg" in printed, printed  # timm needs global_pool='avg' for the GAP head


def test_finetune_grad_accum_matches_the_full_batch(tmp_path):
    """Fine-tuning with four micro-batches gives the full batch's parameters and AdamW moments after two steps
    (pretraining draws a mask per micro-batch, so it cannot equal the full batch; mutation: summing the
    micro-batch gradients in `loop.accumulate_gradients` fails here)."""
    args = [*FINETUNE, "--training-steps", "2", "--batch-size", "32"]
    assert mae_jax.main([*args, "--output-dir", str(tmp_path / "full")]) == 0
    assert mae_jax.main([*args, "--grad-accum", "4", "--output-dir", str(tmp_path / "accum")]) == 0
    assert_states_close(checkpoint.load_state_and_config(tmp_path / "accum")[0],
                        checkpoint.load_state_and_config(tmp_path / "full")[0])


def test_preempted_and_resumed_pretraining_equals_uninterrupted(tmp_path, monkeypatch):
    """Masking noise and data order continue exactly: stopped after step 3 (the loop's SIGTERM path), resumed,
    the same final params and losses as a straight run (with gradient accumulation)."""
    args = [*PRETRAIN, "--training-steps", "6", "--warmup-steps", "2", "--grad-accum", "2", "--log-interval", "1",
            "--eval-interval", "1000", "--save-interval", "1000"]
    assert mae_jax.main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    checks = iter(range(1, 100))
    monkeypatch.setattr(loop.Preemption, "__bool__", lambda self: next(checks) == 3)
    stopped = tmp_path / "stopped"
    assert mae_jax.main([*args, "--output-dir", str(stopped)]) == 0
    monkeypatch.undo()
    assert checkpoint.find_step_dir(stopped).name == "3"
    assert mae_jax.main([*args, "--output-dir", str(stopped), "--resume"]) == 0
    assert_trees_equal(checkpoint.load_params_and_config(tmp_path / "straight")[0],
                       checkpoint.load_params_and_config(stopped)[0])
    assert losses(tmp_path / "straight") == losses(stopped)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--model", "g14"], "unknown model"),
    ([*PRETRAIN, "--mask-ratio", "1.0"], "--mask-ratio"),
    ([*PRETRAIN, "--data", "/nonexistent/imagenet"], "does not exist"),
    ([*FINETUNE, "--init", "/nonexistent/mae.pth"], "does not exist"),
    ([*FINETUNE, "--batch-size", "63", "--mixup", "0.8"], "must be even"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys, tmp_path):
    assert mae_jax.main([*argv, "--training-steps", "1", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and message in err[-1], err


def test_bad_init_checkpoints_are_refused(pretrained, downstream, tmp_path, capsys):
    (tmp_path / "junk.pth").write_text("junk")
    cases = [(tmp_path / "junk.pth", "not a PyTorch state dict"),
             (downstream["finetune", "random"], "not a checkpoint of `mae_jax.py pretrain`")]
    for path, message in cases:
        assert mae_jax.main([*FINETUNE, "--init", str(path), "--output-dir", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
    wider = [a if a != "64" else "128" for a in FINETUNE]  # --dim 128
    assert mae_jax.main([*wider, "--init", str(pretrained), "--output-dir", str(tmp_path / "r")]) == 2
    assert "does not fit this model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- presets

PRESETS = REPO / "scripts" / "mae"
PAPER = {  # Tables 8-10 and the official code; the fine-tune / probe rows start from the 1600-epoch pretraining
    "pretrain": dict(batch_size=4096, lr=1.5e-4, lr_ref_batch=256, adam_b1=0.9, adam_b2=0.95,
                     weight_decay=0.05, warmup_epochs=40, min_lr=0.0, mask_ratio=0.75, norm_pix_loss=True,
                     decoder_layers=8, decoder_dim=512, decoder_heads=16, min_crop_scale=0.2, random_crop="rrc"),
    "finetune": dict(batch_size=1024, lr_ref_batch=256, adam_b1=0.9, adam_b2=0.999, weight_decay=0.05,
                     warmup_epochs=5, min_lr=1e-6, random_crop="rrc", auto_augment="rand-m9-mstd0.5-inc1",
                     random_erasing=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1, clip_grad=0.0,
                     test_crop_ratio=0.875),
    "linprobe": dict(batch_size=16384, lr=0.1, lr_ref_batch=256, weight_decay=0.0, warmup_epochs=10,
                     pooling="cls", lars_momentum=0.9, random_crop="rrc"),
}
ROWS = {f"pretrain_{m}_{e}ep": dict(PAPER["pretrain"], model=m, epochs=e)
        for m in ("b16", "l16", "h14") for e in (800, 1600)}
ROWS |= {f"finetune_{m}": dict(PAPER["finetune"], model=m, epochs=e, lr=lr, layer_decay=ld, drop_path=dp)
         for m, e, lr, ld, dp in (("b16", 100, 5e-4, 0.65, 0.1), ("l16", 50, 1e-3, 0.75, 0.2),
                                  ("h14", 50, 1e-3, 0.75, 0.3))}
ROWS |= {f"linprobe_{m}": dict(PAPER["linprobe"], model=m, epochs=e)
         for m, e in (("b16", 90), ("l16", 50), ("h14", 50))}
for row in ROWS.values():
    row.setdefault("image_size", 224)
# Table 3's ViT-H448 (87.8): FINETUNE.md's ViT-H command at 448 px (no 448 command is published), eval crop 1.0 as
# MAE's util/datasets.py above 224 px.
ROWS["finetune_h14_448"] = dict(ROWS["finetune_h14"], image_size=448, test_crop_ratio=1.0)

# The top-1 each header states: Table 3 (fine-tuned, 1600-epoch weights), Table 1d "pixel (w/ norm)" for the
# 800-epoch ViT-L, the official README's linear-probing table; the other 800-epoch rows have no paper number.
TOP1 = {"pretrain_b16_1600ep": 83.6, "pretrain_l16_1600ep": 85.9, "pretrain_h14_1600ep": 86.9,
        "pretrain_l16_800ep": 85.4, "pretrain_b16_800ep": None, "pretrain_h14_800ep": None,
        "finetune_b16": 83.6, "finetune_l16": 85.9, "finetune_h14": 86.9, "finetune_h14_448": 87.8,
        "linprobe_b16": 68.0, "linprobe_l16": 75.8, "linprobe_h14": 76.6}


def test_one_preset_per_paper_row():
    assert {p.stem for p in PRESETS.glob("*.sh")} - {"digits_demo"} == set(ROWS)


def test_demo_says_it_is_not_a_paper_row():
    from test_presets import header

    assert "not a paper row" in header(PRESETS / "digits_demo.sh"), "digits_demo.sh: say it is not a paper row"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_matches_the_paper(name):
    from test_presets import read_preset

    argv, _ = read_preset(PRESETS / f"{name}.sh", script="mae_jax.py")
    args = mae_jax.parse_args(argv)
    expected = ROWS[name]
    mismatches = {key: (getattr(args, key), value) for key, value in expected.items()
                  if getattr(args, key) != (pytest.approx(value) if isinstance(value, float) else value)}
    assert not mismatches, f"{name}: flag (preset, paper) {mismatches}"
    assert args.stage == name.split("_")[0]
    from test_presets import header

    text = " ".join(line.lstrip("#").strip() for line in header(PRESETS / f"{name}.sh").splitlines())
    assert "He et al., CVPR 2022" in text and "Table" in text, f"{name}: the header must name the paper and its table"
    if TOP1[name] is None:
        assert "reports no top-1" in text, f"{name}: say that the paper reports no top-1 for this row"
    else:
        assert f"top-1 {TOP1[name]}" in text, f"{name}: the header must state the expected top-1 {TOP1[name]}"
