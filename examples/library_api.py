"""The odis pipeline from Python instead of the command line.

    python examples/library_api.py --workdir /tmp/odis_api         # minutes on 2 CPU cores
    python examples/library_api.py --workdir /tmp/odis_api --tiny  # seconds (the tests run it)

Every step is one library call; the library never prints, so this script decides what to
show. It compares the three object-level inference modes of the paper on the test scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from odis_core.demo import DemoSettings
from odis_core.embed.inference import embed, load_teacher_backbone
from odis_core.evaluate.knn import weighted_knn
from odis_core.masks.coco import import_coco
from odis_core.scenes.synthetic import SceneConfig, generate_scenes
from odis_core.train.loop import RunFinished, StepDone, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a few steps on a few scenes")
    args = parser.parse_args()

    n_train, n_test, epochs = (24, 12, 1) if args.tiny else (400, 200, 6)
    settings = DemoSettings().scaled(n_train, n_test, epochs)
    config = dataclasses.replace(settings.pretrain, device="cpu", workers=0)

    # 1. scenes with ground-truth objects, as an image folder + COCO instances JSON
    splits = generate_scenes(
        args.workdir / "scenes", n_train, n_test, seed=0,
        config=SceneConfig(image_size=settings.image_size),
    )
    # 2. the mask store every other step reads
    stores = {
        name: import_coco(split.annotations, args.workdir / "masks" / name,
                          images_root=split.images_dir)[0]
        for name, split in splits.items()
    }
    # 3. pretraining is a generator of events: draw them however you like
    run_dir = args.workdir / "run"
    for event in pretrain(config, splits["train"].images_dir, stores["train"], run_dir):
        if isinstance(event, StepDone) and event.step % 20 == 0:
            print(f"step {event.step}/{event.total_steps} loss {event.metrics['loss']:.3f}")
        elif isinstance(event, RunFinished):
            print(f"done: {event.report['images_per_second']} img/s")
    # 4. one feature per object with each inference mode, 5. weighted k-NN
    backbone, run_config = load_teacher_backbone(run_dir)
    for mode in ("masked", "crop", "blackout"):
        features = {
            name: embed(backbone, splits[name].images_dir, stores[name], level="object",
                        mode=mode, image_size=run_config.global_size)
            for name in ("train", "test")
        }
        result = weighted_knn(features["train"].features, features["train"].labels,
                              features["test"].features, features["test"].labels, ks=(20,))
        print(f"{mode:>8}: k-NN top-1 {result.to_json()['results']['20']['top1']:.1f}")


if __name__ == "__main__":
    main()
