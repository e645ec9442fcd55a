"""deit3_jax.py end to end on CPU: learning, multi-device parity, exact resume, preemption, bad input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_states_close, assert_user_error, recipe_env, run_script
from PIL import Image

from common import checkpoint
from common.runlog import read_log

# A small ViT on 32 px digits: fast on two CPU cores.
TINY = ["--data", "digits", "--model", "t16", "--image-size", "32", "--patch-size", "8", "--layers", "2",
        "--dim", "64", "--heads", "4", "--dtype", "float32", "--workers", "0", "--batch-size", "32",
        "--eval-batch-size", "120", "--log-interval", "1", "--random-crop", "none", "--auto-augment", "none",
        "--color-jitter", "0", "--augment-repeats", "1"]


def run_main(*argv) -> int:
    """deit3_jax.main in this process (no interpreter start-up); its output goes to pytest's capsys."""
    import deit3_jax

    return deit3_jax.main([str(a) for a in argv])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def final_params(run_dir):
    params, _ = checkpoint.load_params_and_config(run_dir, which="last")
    return params


def assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_trees_equal(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_default_recipe_learns_digits_beyond_chance(tmp_path):
    """DeiT-III's own recipe (LAMB, binary cross-entropy on the binarised mixup targets, LayerScale; cutmix and drop
    path off, a larger lr for a 2-block model) learns the digits: 10 classes, chance 10%; this run ends near 70%.
    Mutation that fails: BCE targets `targets >= 0` (every class 1) instead of `targets > 0` stays at chance."""
    out = tmp_path / "run"
    assert run_main(*TINY, "--batch-size", "64", "--epochs", "16", "--warmup-epochs", "1", "--learning-rate", "2e-2",
                    "--cutmix", "0", "--droppath", "0", "--log-interval", "20", "--eval-interval", "1000",
                    "--output-dir", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["criterion"], config["mixup"], config["layerscale"]) == ("lamb", "bce", 0.8,
                                                                                                 True)
    evals = [r for r in read_log(out) if "val_top1" in r]
    assert evals, "no eval record in log.jsonl"
    assert evals[-1]["val_top1"] > 45, f"10 classes, chance is 10%: got {evals[-1]['val_top1']:.1f}%"
    assert config["num_classes"] == 10 and config["model"] == "t16"


def test_eight_devices_match_one_device(tmp_path):
    """Same global batch on 1 and 8 (simulated) devices: the same loss curve, mixup and drop path included."""
    common_args = [*TINY, "--training-steps", "6", "--warmup-steps", "2", "--mixup", "0.8", "--cutmix", "1.0",
                   "--droppath", "0.1", "--eval-interval", "1000"]
    assert run_main(*common_args, "--output-dir", tmp_path / "one") == 0  # this process: one CPU device
    eight = run_script("deit3_jax.py", *common_args, "--output-dir", tmp_path / "eight", devices=8)
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert json.loads((tmp_path / "eight" / "config.json").read_text())["devices"] == 8
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------- bad input

def image_folder(root: Path, classes=("a", "b"), per_class=4, corrupt: bool = False) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                color = (40 * c + 20 * i, 255 - 40 * c, 30 * i)
                Image.new("RGB", (40, 36), color).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def run_folder(folder, out, *extra) -> int:
    return run_main(*TINY, "--data", folder, "--batch-size", "4", "--eval-batch-size", "4", "--training-steps", "3",
                    "--output-dir", out, *extra)


def test_corrupt_jpeg_is_skipped_and_reported(tmp_path, capsys):
    folder = image_folder(tmp_path / "data", corrupt=True)
    assert run_folder(folder, tmp_path / "run", "--augment-repeats", "1", "--training-steps", "6") == 0
    assert "broken.jpg" in capsys.readouterr().err
    assert any(r.get("skipped_images", 0) >= 1 for r in read_log(tmp_path / "run"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-step run, shared read-only by the tests below."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert run_main(*TINY, "--training-steps", "2", "--output-dir", out) == 0
    return out


def test_a_real_run_converts_to_timm_with_the_same_logits(tiny_run, tmp_path, capsys):
    """scripts/convert_flax_to_timm.py on a checkpoint written by the CLI (its saved config, LayerScale, pos-emb on
    the patches only): timm's VisionTransformer loads it strict and gives the recipe's logits."""
    import argparse
    import importlib.util

    import jax
    import torch
    from timm.models.vision_transformer import VisionTransformer

    import deit3_jax
    from common import convert

    spec = importlib.util.spec_from_file_location("convert_flax_to_timm", REPO / "scripts" / "convert_flax_to_timm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tiny_run), "--out", str(tmp_path / "timm.pth")]) == 0, capsys.readouterr().err
    params, config = checkpoint.load_params_and_config(tiny_run)
    reference = VisionTransformer(**convert.timm_kwargs(config, no_embed_class=True)).eval()
    reference.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    model = deit3_jax.VisionTransformer(deit3_jax.model_config(argparse.Namespace(**config), config["num_classes"]))
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.std() > 0 and np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(ours).max()), (ours, theirs)


def test_benchmark_prints_throughput(tmp_path, capsys):
    assert run_main(*TINY, "--benchmark", "--benchmark-steps", "2", "--data", "synthetic", "--labels", "10",
                    "--output-dir", tmp_path) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["img_per_sec"] > 0 and result["step_ms"] > 0 and result["train_gflops_per_img"] > 0
    assert set(result) >= {"peak_memory_gib", "mfu"}


def test_grad_accum_and_grad_ckpt_match_full_batch(tmp_path):
    """Four micro-batches (with rematerialisation) give the full batch's losses, parameters and LAMB moments.
    Clipping is off: clipped to norm 1, a gradient four times too large looks the same (mutation: summing the
    micro-batch gradients in `loop.accumulate_gradients` passed the loss comparison and fails the state one)."""
    args = [*TINY, "--training-steps", "3", "--mixup", "0", "--cutmix", "0", "--droppath", "0",
            "--eval-interval", "1000", "--clip-grad", "0"]
    assert run_main(*args, "--output-dir", tmp_path / "full") == 0
    assert run_main(*args, "--grad-accum", "4", "--grad-ckpt", "--output-dir", tmp_path / "accum") == 0
    a, b = losses(tmp_path / "full"), losses(tmp_path / "accum")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-4)
    assert os.path.exists(tmp_path / "accum" / "config.json")
    assert_states_close(checkpoint.load_state_and_config(tmp_path / "accum")[0],
                        checkpoint.load_state_and_config(tmp_path / "full")[0])


def test_checkpointer_writes_one_checkpoint_at_a_time(tmp_path, monkeypatch):
    """Each orbax manager finishes a save in a background thread with barriers across the processes; `last` and `best`
    saving at once could deadlock a multi-host run (issue 16). Every save must start only after the other manager's
    pending save was waited for."""
    writing, saves = set(), []

    class RecordingManager:
        def __init__(self, directory, options):
            self.name = Path(directory).name
            self.barrier_prefix = options.multiprocessing_options.barrier_sync_key_prefix

        def save(self, step, **_):
            assert writing <= {self.name}, f"{self.name}/{step} started while {sorted(writing)} was still writing"
            writing.add(self.name)
            saves.append(f"{self.name}/{step}")

        def wait_until_finished(self):
            writing.discard(self.name)

        def close(self):
            pass

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", RecordingManager)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.last.barrier_prefix != ckpt.best.barrier_prefix, "the managers' barriers need their own names"
        for step, best in ((1, True), (2, False), (3, True), (4, True)):
            ckpt.save(step, {"w": np.zeros(2)}, {"step": step}, best=best)
    assert saves == ["checkpoints/1", "best/1", "checkpoints/2", "checkpoints/3", "best/3", "checkpoints/4", "best/4"]
    assert not writing, f"{sorted(writing)} still writing after the Checkpointer closed"


def test_two_process_jax_distributed_matches_one_process(tmp_path):
    """A 2-host run (jax.distributed on CPU, one device each) follows the 1-host 2-device loss curve."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "--training-steps", "4", "--warmup-steps", "1", "--mixup", "0.8", "--cutmix", "1.0",
            "--eval-interval", "4"]
    single = run_script("deit3_jax.py", *args, "--output-dir", tmp_path / "single", devices=2)
    assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(REPO / "deit3_jax.py"), *args, "--output-dir", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=recipe_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                             JAX_PROCESS_ID=str(rank)))
             for rank in range(2)]
    deadline = time.monotonic() + 300
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "".join(f"--- rank {rank}:\n{p.communicate()[0][-2000:]}\n" for rank, p in enumerate(procs))
        pytest.fail(f"the 2-process run did not finish in 300 s (a hang?); both ranks were killed\n{tails}")
    finally:
        for p in procs:  # whatever failed above, leave no rank running
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    a, b = losses(tmp_path / "single"), losses(out)
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5, atol=2e-6)
    evals = [r for r in read_log(out) if "val_images" in r]
    assert evals and evals[-1]["val_images"] == [r for r in read_log(tmp_path / "single")
                                                 if "val_images" in r][-1]["val_images"]


def test_finetune_at_new_resolution_with_label_mapping_then_eval_only(tmp_path, tiny_run, capsys):
    """DeiT-III's second stage: pretrained weights at 32 px -> fine-tune at 48 px, head remapped; then --eval-only."""
    pre = tiny_run
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps([[i, 9 - i] for i in range(10)]))
    fine = tmp_path / "fine"
    assert run_main(*TINY, "--image-size", "48", "--training-steps", "1", "--learning-rate", "0", "--warmup-lr", "0",
                    "--min-lr", "0", "--pretrained-ckpt", pre, "--label-mapping", mapping, "--output-dir", fine) == 0
    source, _ = checkpoint.load_params_and_config(pre)
    tuned, config = checkpoint.load_params_and_config(fine)
    assert config["image_size"] == 48 and tuned["pos_embed"].shape == (1, 36, 64)
    # lr 0: the pos-emb is as loaded, resized as DeiT's main.py --finetune does it (F.interpolate, bicubic,
    # align_corners=False on the (1, D, g, g) grid; DeiT-III has no cls row in it).
    grid = torch.from_numpy(np.asarray(source["pos_embed"], np.float32)).reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(tuned["pos_embed"], expected.permute(0, 2, 3, 1).reshape(1, 36, 64).numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(tuned["head"]["kernel"][:, ::-1], source["head"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(tuned["blocks_1"]["mlp"]["fc1"]["kernel"], source["blocks_1"]["mlp"]["fc1"]["kernel"],
                               atol=1e-6)
    logged = [r for r in read_log(fine) if "val_top1" in r][-1]  # the fine-tune's own eval of the same weights
    capsys.readouterr()
    assert run_main(*TINY, "--image-size", "48", "--eval-only", "--output-dir", fine) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_top1"] == pytest.approx(logged["val_top1"], abs=1e-6), (result, logged)
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5), (result, logged)
    code = run_main(*TINY, "--training-steps", "1", "--pretrained-ckpt", tmp_path / "none", "--output-dir",
                    tmp_path / "bad")
    assert_user_error(code, capsys, "none")


# ---------------------------------------------------------------------------------------------- deit3-jax's files

def webdataset_shard(path: Path, labels: list[int]) -> None:
    """A webdataset .tar: one 40x36 JPEG (`NNNNNN.jpg`) and its class (`NNNNNN.cls`) per sample."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            image = io.BytesIO()
            Image.new("RGB", (40, 36), (80 * label, 255 - 80 * label, 20 * i)).save(image, format="JPEG")
            for suffix, payload in (("jpg", image.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_a_deit3_jax_command_line_runs_unchanged(tmp_path, capsys, monkeypatch):
    """A command line of deit3-jax's config/ scripts (its flag names: --train-dataset-shards with a `pipe:` command,
    --train-batch-size, --learning-rate, --droppath, --labels, --layerscale, its W&B and val-loader flags) parses and
    trains; its flags land under this script's canonical names in config.json."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # --project is --wandb: never go online from a test
    for name, count in (("train-0", 8), ("train-1", 8), ("val-0", 6)):
        webdataset_shard(tmp_path / f"{name}.tar", [i % 3 for i in range(count)])
    out = tmp_path / "run"
    argv = ["--output-dir", out,
            "--train-dataset-shards", f"pipe:cat {tmp_path}/train-{{0..1}}.tar",
            "--valid-dataset-shards", f"pipe:cat {tmp_path}/val-{{0..0}}.tar",
            "--train-batch-size", "8", "--valid-batch-size", "8", "--train-loader-workers", "0",
            "--valid-loader-workers", "0", "--random-crop", "rrc", "--color-jitter", "0.3", "--auto-augment", "3a",
            "--random-erasing", "0.0", "--augment-repeats", "3", "--test-crop-ratio", "1.0", "--mixup", "0.8",
            "--cutmix", "1.0", "--criterion", "bce", "--label-smoothing", "0.0", "--layers", "2", "--dim", "32",
            "--heads", "2", "--labels", "3", "--layerscale", "--patch-size", "8", "--image-size", "32",
            "--posemb", "learnable", "--pooling", "cls", "--dropout", "0.0", "--droppath", "0.1", "--init-seed", "0",
            "--mixup-seed", "0", "--dropout-seed", "0", "--shuffle-seed", "0", "--optimizer", "lamb",
            "--learning-rate", "0.003", "--weight-decay", "0.02", "--adam-b1", "0.9", "--adam-b2", "0.999",
            "--adam-eps", "1e-8", "--lr-decay", "1.0", "--clip-grad", "1.0", "--grad-accum", "1",
            "--warmup-steps", "1", "--training-steps", "2", "--log-interval", "1", "--eval-interval", "2",
            "--project", "deit3-jax", "--name", "deit3-tiny", "--ipaddr", "127.0.0.1", "--hostname", "localhost"]
    code = run_main(*argv)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert sorted(losses(out)) == [1, 2] and all(np.isfinite(list(losses(out).values())))
    flags = json.loads((out / "config.json").read_text())["flags"]
    expected = dict(data=f"pipe:cat {tmp_path}/train-{{0..1}}.tar", batch_size=8, eval_batch_size=8, workers=0,
                    num_classes=3, lr=0.003, drop_path=0.1, layerscale=True, wandb="deit3-jax", training_steps=2)
    assert {key: flags.get(key) for key in expected} == expected
    assert not {"name", "ipaddr", "hostname", "valid_loader_workers", "valid_dataset_shards"} & set(flags)
    assert "--valid-dataset-shards" in err, "say that raw val shards are not evaluated"


def deit3_jax_tree(params: dict, heads: int) -> dict:
    """This model's params in deit3-jax's layout (src/modeling.py: embed/wte, embed/wpe (grid, grid, dim),
    layer_i/attn/wq (dim, heads, head_dim), ff/w1, scale1, ...), as its msgpack checkpoints hold them."""
    dim = params["cls_token"].shape[-1]
    grid = int(round(params["pos_embed"].shape[1] ** 0.5))
    model = {"embed": {"wte": params["patch_embed"]["proj"], "cls_token": params["cls_token"],
                       "wpe": params["pos_embed"].reshape(grid, grid, dim)},
             "norm": params["norm"], "head": params["head"]}
    for name, block in params.items():
        if not name.startswith("blocks_"):
            continue
        qkv, proj = block["attn"]["qkv"], block["attn"]["proj"]
        attn = {w: {"kernel": qkv["kernel"][:, i * dim:(i + 1) * dim].reshape(dim, heads, dim // heads),
                    "bias": qkv["bias"][i * dim:(i + 1) * dim].reshape(heads, dim // heads)}
                for i, w in enumerate(("wq", "wk", "wv"))}
        attn["wo"] = {"kernel": proj["kernel"].reshape(heads, dim // heads, dim), "bias": proj["bias"]}
        model[name.replace("blocks_", "layer_")] = {
            "attn": attn, "ff": {"w1": block["mlp"]["fc1"], "w2": block["mlp"]["fc2"]}, "norm1": block["norm1"],
            "norm2": block["norm2"], "scale1": block["ls1"]["gamma"], "scale2": block["ls2"]["gamma"]}
    return {"model": model}


def test_a_deit3_jax_msgpack_checkpoint_loads_and_exports(tiny_run, tmp_path, capsys):
    """deit3-jax's checkpoints (flax.serialization.msgpack_serialize of its params) load as --pretrained-ckpt with
    every weight in place, and scripts/convert_flax_to_timm.py exports them as it exports this script's own run."""
    import importlib.util

    import torch
    from flax import serialization

    source, _ = checkpoint.load_params_and_config(tiny_run)
    msgpack = tmp_path / "deit3-tiny-last.msgpack"
    msgpack.write_bytes(serialization.msgpack_serialize(deit3_jax_tree(source, heads=4)))
    fine = tmp_path / "fine"
    assert run_main(*TINY, "--training-steps", "1", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
                    "--eval-interval", "1000", "--pretrained-ckpt", msgpack, "--output-dir", fine) == 0
    tuned, _ = checkpoint.load_params_and_config(fine)
    for name in ("pos_embed", "cls_token"):
        np.testing.assert_allclose(tuned[name], source[name], atol=1e-6, err_msg=name)
    for name in ("qkv", "proj"):
        np.testing.assert_allclose(tuned["blocks_1"]["attn"][name]["kernel"],
                                   source["blocks_1"]["attn"][name]["kernel"], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(tuned["blocks_0"]["ls2"]["gamma"], source["blocks_0"]["ls2"]["gamma"], atol=1e-6)

    spec = importlib.util.spec_from_file_location("convert_flax_to_timm", REPO / "scripts" / "convert_flax_to_timm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(msgpack), "--out", str(tmp_path / "from_msgpack.pth")]) == 0, capsys.readouterr().err
    assert script.main([str(tiny_run), "--out", str(tmp_path / "from_run.pth")]) == 0, capsys.readouterr().err
    ours, theirs = torch.load(tmp_path / "from_msgpack.pth"), torch.load(tmp_path / "from_run.pth")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert "deit3_small" not in capsys.readouterr().out  # the tiny model has no timm name; it still loads strict
    code = run_main(*TINY, "--training-steps", "1", "--pretrained-ckpt", tmp_path / "from_run.pth.msgpack",
                    "--output-dir", tmp_path / "bad")
    assert_user_error(code, capsys, "deit3-jax")


def test_deit3_jax_shard_pair_in_a_make_shards_folder_becomes_that_folder(tmp_path):
    """--train-dataset-shards / --valid-dataset-shards inside a folder with scripts/make_shards.py's info.json: --data
    is that folder, whose info.json gives both splits with their sizes (so the run is evaluated)."""
    import deit3_jax

    (tmp_path / "info.json").write_text("{}")
    args = deit3_jax.parse_args(["--train-dataset-shards", f"{tmp_path}/train-{{0..1}}.tar",
                                 "--valid-dataset-shards", f"{tmp_path}/val-{{0..0}}.tar"])
    assert args.data == str(tmp_path) and not hasattr(args, "valid_dataset_shards")


def test_m16_exports_as_timm_deit3_medium_patch16_224():
    """ViT-M of the official README (`--model m16`): its params load strict into timm's deit3_medium_patch16_224."""
    import jax
    import jax.numpy as jnp
    import timm
    import torch

    import deit3_jax
    from common import convert

    args = deit3_jax.parse_args(["--model", "m16", "--num-classes", "1000"])
    model = deit3_jax.VisionTransformer(deit3_jax.model_config(args, 1000))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"])
    params = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, np.float32), shapes)
    export = convert.flax_params_to_timm(params, dict(vars(args), num_classes=1000), "deit3")
    assert "'deit3_medium_patch16_224'" in export.create, export.create
    reference = timm.create_model("deit3_medium_patch16_224", pretrained=False, num_classes=1000)
    reference.load_state_dict({name: torch.from_numpy(value) for name, value in export.tensors.items()}, strict=True)
