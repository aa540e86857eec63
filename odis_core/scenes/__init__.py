"""Demo data: synthetic multi-object scenes written as images + a COCO instances file."""

from odis_core.scenes.synthetic import (
    SCENE_CLASSES,
    Scene,
    SceneConfig,
    SceneGenerationError,
    SceneObject,
    SceneSplit,
    compose_scene,
    generate_scenes,
    generate_split,
    render_scene,
    scene_rng,
)

__all__ = [
    "SCENE_CLASSES",
    "Scene",
    "SceneConfig",
    "SceneGenerationError",
    "SceneObject",
    "SceneSplit",
    "compose_scene",
    "generate_scenes",
    "generate_split",
    "render_scene",
    "scene_rng",
]
