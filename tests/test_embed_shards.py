"""Sharded, resumable embedding (odis_core/embed/shards.py), foreign backbones
(backbones.py) and the attention / PCA pictures (viz.py), on a tiny ViT and tiny scenes."""

import argparse
import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from odis_core.embed.backbones import load_backbone, weights_fingerprint
from odis_core.embed.features import read_features
from odis_core.embed.inference import embed, embed_records, list_records
from odis_core.embed.shards import (
    EmbedFinished,
    EmbedSettings,
    ShardDone,
    embed_to_directory,
    rank_image_count,
    records_fingerprint,
)
from odis_core.embed.viz import obj_attention, pca_rgb, write_viz
from odis_core.masks.coco import import_coco
from odis_core.model.obj_vit import ObjViT
from odis_core.scenes.synthetic import SceneConfig, generate_scenes
from odis_core.train.checkpoint import CheckpointError

TINY = dict(img_size=32, patch_size=8, depth=2, drop_path_rate=0.0)
# A foreign checkpoint carries its architecture's full depth (12 blocks for vit_tiny).
FOREIGN = dict(img_size=32, patch_size=8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    splits = generate_scenes(root / "scenes", 10, 2, seed=5, config=SceneConfig(image_size=32))
    store, _ = import_coco(
        splits["train"].annotations, root / "store", images_root=splits["train"].images_dir
    )
    return splits["train"].images_dir, store


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    return ObjViT("vit_tiny", **TINY).eval()


def run_to_end(
    out, images, store, shard_size=3, rank=0, world_size=1, backbone=None, decode="loader",
    progress=None,
):
    backbone = backbone or tiny_backbone()
    records = list_records(images, store, "object", "masked")
    settings = EmbedSettings(
        "object",
        "masked",
        32,
        shard_size,
        "float32",
        weights_fingerprint(backbone.vit),
        len(records),
        records_fingerprint(records),
        decode,
    )
    return list(
        embed_to_directory(
            backbone,
            images,
            records,
            store,
            out,
            settings,
            {"backbone": "vit_tiny"},
            batch_size=2,
            rank=rank,
            world_size=world_size,
            progress=progress,
        )
    )


def test_sharded_run_equals_one_pass_and_cleans_up(tmp_path, scenes):
    images, store = scenes
    events = run_to_end(tmp_path / "feat", images, store, shard_size=3)
    assert [e.shard for e in events if isinstance(e, ShardDone)] == [0, 1, 2, 3]
    assert isinstance(events[-1], EmbedFinished)
    merged = read_features(tmp_path / "feat")
    whole = embed(tiny_backbone(), images, store, image_size=32, batch_size=64)
    np.testing.assert_allclose(merged.features, whole.features, atol=1e-5)
    np.testing.assert_array_equal(merged.labels, whole.labels)
    assert [row["object_id"] for row in merged.meta] == [row["object_id"] for row in whole.meta]
    assert merged.info["settings"]["shard_size"] == 3 and merged.info["n"] == len(whole.labels)
    assert not (tmp_path / "feat" / "shards").exists()
    # numpy reads the streamed features.npy on its own.
    assert np.load(tmp_path / "feat" / "features.npy").shape == whole.features.shape


def test_progress_counts_images_of_this_rank_resumed_shards_included(tmp_path, scenes):
    images, store = scenes
    n_images = len(list_records(images, store, "object", "masked"))
    assert rank_image_count(n_images, 3, 0, 2) == 3 + 3  # shards 0 and 2 of 0..3
    seen = []
    run_to_end(tmp_path / "feat", images, store, rank=0, world_size=2, progress=seen.append)
    # Batches of 2 within shards of 3: the bar moves per batch, in images, not per shard.
    assert seen == [2, 3, 5, 6]
    seen.clear()
    run_to_end(tmp_path / "feat", images, store, progress=seen.append)
    assert seen[0] == 3 and seen == sorted(seen) and seen[-1] == n_images == 10


def test_resume_skips_finished_shards_and_redoes_partial_ones(tmp_path, scenes):
    images, store = scenes
    out = tmp_path / "feat"
    # A first "rank 0 of 2" run leaves shards 0 and 2 behind, as a killed run would.
    first = run_to_end(out, images, store, rank=0, world_size=2)
    assert [e.shard for e in first] == [0, 2]
    # A half-written shard: no info.json, so it is not complete and gets redone.
    partial = out / "shards" / "000001"
    partial.mkdir()
    (partial / "features.npy").write_bytes(b"garbage")
    events = run_to_end(out, images, store)
    assert [(e.shard, e.resumed) for e in events if isinstance(e, ShardDone)] == [
        (0, True),
        (1, False),
        (2, True),
        (3, False),
    ]
    fresh = read_features(out)
    reference = run_to_end(tmp_path / "ref", images, store)
    np.testing.assert_array_equal(fresh.features, read_features(tmp_path / "ref").features)
    assert reference[-1].n_features == len(fresh)
    # A third run has nothing to do.
    again = run_to_end(out, images, store)
    assert len(again) == 1 and again[0].already_complete


def test_other_settings_do_not_mix_with_unfinished_shards(tmp_path, scenes):
    images, store = scenes
    run_to_end(tmp_path / "feat", images, store, rank=0, world_size=2)
    with pytest.raises(ValueError, match="weights"):
        run_to_end(tmp_path / "feat", images, store, backbone=tiny_backbone(seed=1))
    with pytest.raises(ValueError, match="shard_size"):
        run_to_end(tmp_path / "feat", images, store, shard_size=4)


def test_shards_of_a_version_without_decode_resume_as_loader_decoded(tmp_path, scenes):
    images, store = scenes
    out = tmp_path / "feat"
    run_to_end(out, images, store, rank=0, world_size=2)
    settings_file = out / "shards" / "settings.json"
    old = json.loads(settings_file.read_text())
    del old["decode"]  # written before the loader/device choice existed
    settings_file.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="decode"):
        run_to_end(out, images, store, decode="device")
    events = run_to_end(out, images, store)
    assert [e.resumed for e in events if isinstance(e, ShardDone)] == [True, False, True, False]


def test_records_fingerprint_follows_names_and_order(scenes):
    _, store = scenes
    records = list(store.images)
    assert records_fingerprint(records) == records_fingerprint(list(records))
    assert records_fingerprint(records) != records_fingerprint(records[::-1])
    assert records_fingerprint(records) != records_fingerprint(records[:-1])


def test_timm_safetensors_and_prefixed_pth_load_exactly(tmp_path):
    torch.manual_seed(3)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **FOREIGN)
    state = plain.state_dict()
    save_file(state, tmp_path / "vit.safetensors")
    loaded = load_backbone(tmp_path / "vit.safetensors", arch="vit_tiny_patch16_224")
    assert (loaded.image_size, loaded.backbone.patch_size, loaded.source) == (32, 8, "timm")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.backbone(images)[:, 0], plain.forward_features(images)[:, 0]
        )
    # DINO/iBOT layout: under "teacher", with "module." and "backbone." prefixes and a head.
    dino_like = {f"module.backbone.{key}": value for key, value in state.items()}
    dino_like["module.head.last_layer.weight"] = torch.zeros(4, 4)
    torch.save({"teacher": dino_like, "epoch": 3}, tmp_path / "dino.pth")
    from_dino = load_backbone(tmp_path / "dino.pth", arch="vit_tiny_patch16_224")
    assert from_dino.weights == loaded.weights == weights_fingerprint(plain)


def test_mismatched_checkpoints_are_refused_with_the_keys(tmp_path):
    torch.manual_seed(3)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **FOREIGN)
    state = plain.state_dict()
    # Two blocks of weights for a model with twelve: missing keys, listed.
    torch.save(
        {
            k: v
            for k, v in state.items()
            if not k.startswith(tuple(f"blocks.{i}." for i in range(2, 12)))
        },
        tmp_path / "short.pth",
    )
    with pytest.raises(CheckpointError, match=r"short\.pth.*missing \[blocks\.2\."):
        load_backbone(tmp_path / "short.pth", arch="vit_tiny_patch16_224")
    # A foreign model (a ResNet) is not a ViT at all.
    torch.save(
        timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet.pth"
    )
    with pytest.raises(CheckpointError, match="resnet.pth.*not match a ViT"):
        load_backbone(tmp_path / "resnet.pth", arch="vit_tiny_patch16_224")
    # An unknown extra key is unexpected, not ignored.
    torch.save({**state, "blocks.0.extra": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \[blocks\.0\.extra\]"):
        load_backbone(tmp_path / "extra.pth", arch="vit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match="--arch"):
        load_backbone(tmp_path / "extra.pth")
    # Pickled Python objects are never unpickled (weights_only=True).
    torch.save({"teacher": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone(tmp_path / "pickled.pth", arch="vit_tiny_patch16_224")


def test_obj_attention_is_the_blocks_own_attention_and_stays_in_the_object():
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 4, 5]] = True
    mask[1, 10] = True
    attention, block_input = obj_attention(backbone, images, mask)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    assert (attention[:, 1:][~mask] == 0).all() and (attention[:, 1:][mask] > 0).all()
    # Rebuilt from the attention row, the block's attention output for [OBJ] must come back
    # (head-averaged weights are not enough: recompute per head via the same qkv).
    block = backbone.vit.blocks[-1]
    captured = {}
    handle = block.attn.register_forward_hook(lambda m, a, out: captured.__setitem__("o", out))
    with torch.no_grad():
        backbone(images, obj_patch_mask=mask, force_masked_path=True)
    handle.remove()
    attn = block.attn
    b, t, d = block_input.shape
    qkv = attn.qkv(block_input).reshape(b, t, 3, attn.num_heads, d // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale
    visible = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], 1)[:, None, None]
    per_head = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(per_head.mean(1)[:, 0], attention)
    obj_out = attn.proj((per_head @ v).transpose(1, 2).reshape(b, 1, d))
    torch.testing.assert_close(obj_out[:, 0], captured["o"][:, 0], atol=1e-5, rtol=1e-4)


def test_pca_rgb_spans_unit_range():
    tokens = torch.randn(16, 24)
    rgb = pca_rgb(tokens, (4, 4))
    assert rgb.shape == (4, 4, 3) and rgb.min() == 0.0 and rgb.max() == pytest.approx(1.0)


def test_write_viz_draws_one_png_per_image(tmp_path, scenes):
    images, store = scenes
    paths = write_viz(tiny_backbone(), images, list(store.images)[:2], store, tmp_path / "viz", 32)
    assert len(paths) == 2
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["masked", "crop", "blackout", "meanpool"])
def test_objects_of_a_batch_get_their_own_image_and_mask(scenes, mode):
    """Batched embedding (objects of several images in one forward, masked objects sharing
    one image tensor) equals one forward per object on that object's own inputs."""
    from odis_core.embed.inference import _ObjectInputs
    from odis_core.model.network import meanpool_object

    images, store = scenes
    records = list(store.images)[:3]
    backbone = tiny_backbone()
    batched = embed_records(backbone, images, records, store, "object", mode, 32, batch_size=3,
                            precision="fp32")
    dataset = _ObjectInputs(images, records, store, "object", mode, 32, 8)
    expected = []
    for index in range(len(records)):
        item = dataset[index]
        # Masked/meanpool objects share their image's one tensor; crop/blackout have one each.
        n_objects = len(item["masks"])
        assert len(item["images"]) == (1 if mode in ("masked", "meanpool") else n_objects)
        for owner, mask in zip(item["owner"], item["masks"], strict=True):
            image = item["images"][owner][None]
            with torch.no_grad():
                if mode == "meanpool":
                    feature = meanpool_object(backbone(image)[:, 1:], mask[None])
                else:
                    feature = backbone(image, obj_patch_mask=mask[None])[:, 0]
            expected.append(feature[0])
    assert len(expected) == len(batched.labels) > 3
    torch.testing.assert_close(
        torch.from_numpy(batched.features), torch.stack(expected), atol=1e-5, rtol=1e-4
    )
    # Objects differ from each other (a wrong owner index would repeat one image's input).
    assert len(np.unique(batched.features.round(4), axis=0)) == len(expected)
