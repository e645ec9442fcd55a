"""deit_jax.py: timm parity of converted checkpoints, the distillation losses, both recipes learning on digits,
teachers of both kinds, exact resume with EMA and a teacher, and bad input."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import REPO, assert_states_close

import deit_jax
from common import checkpoint, convert, jax_augment, loop
from common.runlog import read_log

# A small ViT on 16 px digits; augmentation that a few hundred steps can learn through.
TINY = ["--data", "digits", "--model", "t16", "--image-size", "16", "--patch-size", "4", "--layers", "2",
        "--dim", "64", "--heads", "2", "--dtype", "float32", "--workers", "0", "--batch-size", "64",
        "--eval-batch-size", "120", "--auto-augment", "none", "--random-erasing", "0", "--mixup", "0",
        "--cutmix", "0", "--augment-repeats", "1", "--random-crop", "none", "--lr-ref-batch", "0",
        "--learning-rate", "3e-3", "--droppath", "0", "--test-crop-ratio", "1",
        "--log-interval", "10"]
CHANCE = 10.0  # digits: 10 balanced classes, 359 val images


def evals(run_dir) -> list[dict]:
    return [r for r in read_log(run_dir) if "val_top1" in r]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def assert_trees_equal(a, b, path=""):
    assert a.keys() == b.keys(), path
    for key in a:
        if isinstance(a[key], dict):
            assert_trees_equal(a[key], b[key], f"{path}/{key}")
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path}/{key}")


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory):
    """The DeiT recipe (EMA on, reported raw) on digits; its checkpoint is the Flax teacher below."""
    out = tmp_path_factory.mktemp("deit") / "run"
    assert deit_jax.main([*TINY, "--epochs", "8", "--warmup-epochs", "1", "--eval-interval", "1000",
                          "--output-dir", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------- model

def random_params(config: deit_jax.ViTConfig, seed: int = 0):
    """Initialised params with every leaf perturbed (LayerNorms, biases and zero heads become non-trivial)."""
    model = deit_jax.VisionTransformer(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    params = model.init(jax.random.PRNGKey(seed), images)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def test_distilled_weights_give_the_logits_of_timm_deit_tiny_distilled():
    """By name: the full-size config is timm's `deit_tiny_distilled_patch16_224`; that model, built at depth 2,
    loads our converted weights (every leaf perturbed) strict and, in eval mode (its two heads averaged), gives our
    `predict` logits."""
    import timm

    run_config = dict(image_size=224, patch_size=16, dim=192, layers=12, heads=3, num_classes=1000, pooling="cls")
    kwargs = convert.timm_kwargs(run_config, no_embed_class=False)
    assert convert.timm_model_name(kwargs, distilled=True) == "deit_tiny_distilled_patch16_224"
    config = deit_jax.ViTConfig(num_classes=1000, distilled=True, dim=192, heads=3, layers=2)
    model, params = random_params(config)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_timm(params).items()},
                              strict=True)
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, x: deit_jax.predict(model.apply({"params": p}, x)))(params, images))
    with torch.no_grad():
        theirs = reference.eval()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("timm_name,pooling", [
    ("vit_tiny_patch16_224", "cls"),
    (None, "gap"),  # the MAE recipe: global average pooling + fc_norm (timm global_pool="avg")
])
def test_converted_weights_give_timm_logits(timm_name, pooling):
    """The full-size config maps to the timm model name; logits are compared at depth 2 and 64 px (same layout)."""
    run_config = dict(image_size=224, patch_size=16, dim=192, layers=12, heads=3, num_classes=1000, pooling=pooling)
    assert convert.timm_model_name(convert.timm_kwargs(run_config, no_embed_class=False)) == timm_name
    run_config.update(layers=2, image_size=64)
    kwargs = convert.timm_kwargs(run_config, no_embed_class=False)
    reference = convert.timm_model_class()(**kwargs)
    config = deit_jax.ViTConfig(num_classes=1000, image_size=64, pooling=pooling, dim=192,
                                heads=3, layers=2, head_init="zero" if pooling == "gap" else "trunc_normal")
    model, params = random_params(config)
    state = {k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_timm(params).items()}
    reference.load_state_dict(state, strict=True)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(deit_jax.predict(model.apply({"params": params}, images)))
    with torch.no_grad():
        theirs = reference.eval()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_drop_path_rises_linearly_with_depth():
    config = deit_jax.ViTConfig(num_classes=10, layers=12, droppath=0.1)
    np.testing.assert_allclose(deit_jax.droppath_rates(config), torch.linspace(0, 0.1, 12).numpy(), atol=1e-7)


# ---------------------------------------------------------------------------------------------- losses

def test_hard_distillation_loss_is_its_definition():
    class_logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], np.float32)
    dist_logits = np.array([[0.0, 1.0, 0.0], [1.5, -0.5, 0.5]], np.float32)
    targets = np.array([[0.9, 0.05, 0.05], [0.3, 0.3, 0.4]], np.float32)  # mixed, smoothed
    teacher = np.array([[0.1, 0.2, 3.0], [5.0, 0.0, 0.0]], np.float32)  # argmax: 2, 0

    def log_softmax(x):
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    base = -(targets * log_softmax(class_logits)).sum(-1).mean()
    hard = -log_softmax(dist_logits)[np.arange(2), [2, 0]].mean()
    got = deit_jax.distillation_loss((class_logits, dist_logits), targets, teacher, "hard", alpha=0.5, tau=3.0)
    np.testing.assert_allclose(float(got), 0.5 * base + 0.5 * hard, rtol=1e-6)


def test_soft_distillation_loss_matches_deit_code():
    """DeiT losses.py: F.kl_div(log_softmax(s/T), log_softmax(t/T), 'sum', log_target=True) * T^2 / s.numel()."""
    rng = np.random.default_rng(0)
    class_logits, dist_logits, teacher = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
    targets = np.eye(5, dtype=np.float32)[[0, 1, 2, 3]]
    tau, alpha = 3.0, 0.1
    s, t = torch.from_numpy(dist_logits), torch.from_numpy(teacher)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / tau, 1), torch.log_softmax(t / tau, 1), reduction="sum",
                                    log_target=True) * tau * tau / s.numel()
    base = torch.nn.functional.cross_entropy(torch.from_numpy(class_logits), torch.arange(4))
    expected = (1 - alpha) * base + alpha * kl
    got = deit_jax.distillation_loss((class_logits, dist_logits), targets, teacher, "soft", alpha=alpha, tau=tau)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- training

def test_deit_recipe_learns_digits(deit_run):
    last = evals(deit_run)[-1]
    # A 2-block ViT on 16 px digits for 176 steps reaches about 40% (the demo's 20 epochs reach about 95%).
    assert last["val_top1"] > 3 * CHANCE, f"chance is {CHANCE}%: got {last['val_top1']:.1f}%"
    assert "ema_val_top1" in last, "the DeiT recipe keeps an EMA (evaluated, not reported)"
    assert last["best_top1"] == max(r["val_top1"] for r in evals(deit_run))


def test_mae_recipe_learns_digits_and_reports_ema(tmp_path):
    out = tmp_path / "mae"
    # A faster EMA than the paper's 0.9999, so that a few hundred steps move it.
    assert deit_jax.main([*TINY, "--recipe", "mae", "--epochs", "8", "--warmup-epochs", "1", "--ema-decay", "0.98",
                          "--eval-interval", "88", "--output-dir", str(out)]) == 0
    records = evals(out)
    config = json.loads((out / "config.json").read_text())
    assert config["adam_b2"] == 0.95 and config["weight_decay"] == 0.3 and config["pooling"] == "gap"
    assert records[-1]["ema_val_top1"] > 3 * CHANCE, f"chance is {CHANCE}%: got {records[-1]['ema_val_top1']:.1f}%"
    assert records[0]["ema_val_top1"] != records[0]["val_top1"]
    assert records[-1]["best_top1"] == max(r["ema_val_top1"] for r in records), "best must follow the EMA weights"
    ema, _ = checkpoint.load_params_and_config(out, key="ema_params")
    raw, _ = checkpoint.load_params_and_config(out)
    assert not np.array_equal(ema["head"]["kernel"], raw["head"]["kernel"])


def test_converted_checkpoint_loads_into_timm(deit_run, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import convert_flax_to_timm

    out = tmp_path / "timm.pth"
    assert convert_flax_to_timm.main([str(deit_run), "--out", str(out), "--ema"]) == 0
    params, config = checkpoint.load_params_and_config(deit_run, key="ema_params")
    kwargs = convert.timm_kwargs(config)
    model = convert.timm_model_class(False)(**kwargs)
    model.load_state_dict(torch.load(out), strict=True)
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    flax_model = deit_jax.VisionTransformer(deit_jax.model_config(deit_jax.parse_args(TINY), 10))
    ours = np.asarray(flax_model.apply({"params": params}, images))
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4


def test_flax_teacher_gives_the_checkpoints_predictions(deit_run):
    """The Flax teacher's logits are those of timm's VisionTransformer loaded with the checkpoint's weights (an
    independent forward pass; mutation: a teacher that keeps its init weights fails)."""
    params, config = checkpoint.load_params_and_config(deit_run)
    args = deit_jax.parse_args([*TINY, "--distill", "hard", "--teacher-ckpt", str(deit_run)])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    teacher = deit_jax.FlaxTeacher(str(deit_run), args, 10, mesh)
    reference = convert.timm_model_class()(**convert.timm_kwargs(config, no_embed_class=False)).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in convert.flax_to_timm(params).items()},
                              strict=True)
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(teacher(images)), expected, rtol=1e-4, atol=1e-4)


def test_flax_teacher_hard_distillation_sees_the_students_mixed_input(deit_run, tmp_path, monkeypatch):
    """Hard distillation from a Flax checkpoint, converted to timm's VisionTransformerDistilled at the end.
    DeiT §4: the teacher gets the student's exact input, mixed. Every call of the input pipeline (in the student's
    compiled step and for the teacher) is recorded by a debug callback; at each step the teacher's images equal the
    student's, and they are mixed (not the normalised batch). Mutation that fails: the teacher fed
    jax_augment.normalize(batch['image'])."""

    seen, given = {}, {}
    make_inputs = deit_jax.make_inputs

    def recording_make_inputs(*args, **kwargs):
        inputs = make_inputs(*args, **kwargs)

        def recorded(step, batch):
            images, targets = inputs(step, batch)
            jax.debug.callback(lambda s, x, raw: seen.setdefault(int(s), []).append((np.asarray(x), np.asarray(raw))),
                               step, images, batch["image"])
            return images, targets

        return recorded

    teacher_call = deit_jax.FlaxTeacher.__call__

    def recording_call(self, images):
        given[len(given)] = np.asarray(images)
        return teacher_call(self, images)

    monkeypatch.setattr(deit_jax, "make_inputs", recording_make_inputs)
    monkeypatch.setattr(deit_jax.FlaxTeacher, "__call__", recording_call)
    out = tmp_path / "student"
    assert deit_jax.main([*TINY, "--distill", "hard", "--teacher-ckpt", str(deit_run), "--training-steps", "8",
                          "--warmup-steps", "2", "--eval-interval", "8", "--mixup", "0.8", "--cutmix", "1.0",
                          "--output-dir", str(out)]) == 0
    assert sorted(given) == sorted(seen) == list(range(8))
    mixed_steps = 0
    for step, images in given.items():
        assert len(seen[step]) == 2, "one call for the teacher, one in the student's step"
        for student_images, _ in seen[step]:
            np.testing.assert_allclose(images, student_images, rtol=1e-6, atol=1e-6, err_msg=f"step {step}")
        unmixed = np.asarray(jax_augment.normalize(jnp.asarray(seen[step][0][1])))
        mixed_steps += np.abs(images - unmixed).max() > 0.1
    assert mixed_steps >= 6, f"the teacher saw mixed images at {mixed_steps} of 8 steps (lam near 1 at a few)"

    params, config = checkpoint.load_params_and_config(out)
    assert config["distilled"] and "dist_token" in params and "head_dist" in params
    assert np.isfinite(losses(out)[8])
    # The distilled checkpoint converts to timm's VisionTransformerDistilled (the script loads it strict).
    sys.path.insert(0, str(REPO / "scripts"))
    import convert_flax_to_timm

    assert convert_flax_to_timm.main([str(out), "--out", str(tmp_path / "timm.pth")]) == 0
    assert {"dist_token", "head_dist.weight"} <= set(torch.load(tmp_path / "timm.pth"))


def test_timm_teacher_soft_distillation(tmp_path):
    import timm

    teacher = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("test_resnet", num_classes=10).state_dict()}, teacher)  # DeiT's layout
    out = tmp_path / "student"
    assert deit_jax.main([*TINY, "--distill", "soft", "--teacher", "test_resnet", "--teacher-ckpt", str(teacher),
                          "--training-steps", "10", "--warmup-steps", "2", "--eval-interval", "10",
                          "--output-dir", str(out), "--mixup", "0.8", "--cutmix", "1.0"]) == 0
    assert np.isfinite(losses(out)[10])


def test_timm_teacher_gets_the_students_input_by_dlpack(tmp_path):
    """Each device's rows go to PyTorch and come back as that device's shard of the logits."""
    import timm

    weights = tmp_path / "teacher.safetensors"
    model = timm.create_model("test_resnet", num_classes=10).eval()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(weights))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    teacher = deit_jax.TimmTeacher("test_resnet", str(weights), 10, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    images = jax.device_put(np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32), sharding)
    logits = teacher(images)
    assert logits.sharding.is_equivalent_to(sharding, 2)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_grad_accum_matches_the_full_batch(tmp_path):
    """Four micro-batches give the full batch's parameters, AdamW moments and EMA after two steps (mutation:
    summing the micro-batch gradients in `loop.accumulate_gradients` fails here)."""
    args = [*TINY, "--training-steps", "2", "--batch-size", "32", "--clip-grad", "0", "--eval-interval", "1000"]
    assert deit_jax.main([*args, "--output-dir", str(tmp_path / "full")]) == 0
    assert deit_jax.main([*args, "--grad-accum", "4", "--output-dir", str(tmp_path / "accum")]) == 0
    assert_states_close(checkpoint.load_state_and_config(tmp_path / "accum")[0],
                        checkpoint.load_state_and_config(tmp_path / "full")[0])


def test_preempted_and_resumed_run_equals_uninterrupted_run(deit_run, tmp_path, monkeypatch):
    """EMA, mixup, drop path, repeats and a Flax teacher: preempted after step 4 (the SIGTERM path of the loop;
    the signal itself is tested with deit3_jax.py), resumed, the same final state as an uninterrupted run."""
    args = [*TINY, "--distill", "hard", "--teacher-ckpt", str(deit_run), "--training-steps", "10",
            "--warmup-steps", "3", "--mixup", "0.8", "--cutmix", "1.0", "--droppath", "0.1", "--log-interval", "1",
            "--eval-interval", "1000", "--save-interval", "1000", "--ema-decay", "0.9", "--augment-repeats", "2"]
    assert deit_jax.main([*args, "--output-dir", str(tmp_path / "straight")]) == 0

    checks = iter(range(1, 100))
    monkeypatch.setattr(loop.Preemption, "__bool__", lambda self: next(checks) == 4)  # "SIGTERM" after step 4
    stopped = tmp_path / "stopped"
    assert deit_jax.main([*args, "--output-dir", str(stopped)]) == 0
    monkeypatch.undo()
    assert checkpoint.find_step_dir(stopped).name == "4" and max(losses(stopped)) == 4

    assert deit_jax.main([*args, "--output-dir", str(stopped), "--resume"]) == 0
    for key in ("params", "ema_params"):
        assert_trees_equal(checkpoint.load_params_and_config(tmp_path / "straight", key=key)[0],
                           checkpoint.load_params_and_config(stopped, key=key)[0])
    a, b = losses(tmp_path / "straight"), losses(stopped)
    assert all(a[s] == b[s] for s in a)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["--recipe", "beit"], "unknown recipe"),
    (["--model", "g14"], "unknown model"),
    (["--distill", "hard"], "needs a teacher"),
    (["--distill", "hard", "--teacher-ckpt", "x", "--pooling", "gap"], "--pooling cls"),
    (["--data", "/nonexistent/imagenet"], "does not exist"),
    (["--batch-size", "63", "--mixup", "0.8"], "must be even"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys, tmp_path):
    assert deit_jax.main([*TINY, "--training-steps", "1", "--output-dir", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.parametrize("teacher,make_ckpt,message", [
    ("flax", lambda p: p / "missing", "no checkpoint found"),
    ("test_resnet", lambda p: p / "missing.pth", "is not a file"),
    ("test_resnet", lambda p: (p / "junk.pth").write_text("junk") and p / "junk.pth", "not a PyTorch state dict"),
    ("resnet18", lambda p: torch.save({"fc.weight": torch.zeros(3, 3)}, p / "w.pth") or p / "w.pth",
     "does not fit resnet18"),
    ("no_such_net", lambda p: p / "w.pth", "unknown timm teacher"),
])
def test_bad_teachers_are_one_line_errors(teacher, make_ckpt, message, capsys, tmp_path):
    argv = [*TINY, "--training-steps", "1", "--output-dir", str(tmp_path / "r"), "--distill", "hard",
            "--teacher", teacher, "--teacher-ckpt", str(make_ckpt(tmp_path))]
    assert deit_jax.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], err


def test_another_scripts_checkpoint_is_not_a_flax_teacher(tmp_path, capsys):
    with checkpoint.Checkpointer(tmp_path / "deit3") as ckpt:
        ckpt.save(1, {"params": {"head": {"bias": np.zeros(10, np.float32)}}}, {"config": {"script": "deit3_jax.py"}})
    assert deit_jax.main([*TINY, "--distill", "hard", "--teacher-ckpt", str(tmp_path / "deit3"),
                          "--output-dir", str(tmp_path / "r"), "--training-steps", "1"]) == 2
    assert "not a checkpoint of deit_jax.py" in capsys.readouterr().err


