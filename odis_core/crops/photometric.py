"""DINO/iBOT photometric augmentation, per view kind; applied to the image only.

Global view 1: colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=1.0.
Global view 2: same jitter and grayscale, blur p=0.1, solarize p=0.2.
Local views:   same jitter and grayscale, blur p=0.5.
Blur sigma is uniform in [0.1, 2.0] pixels. Then ToTensor and ImageNet normalisation.
`PhotometricSettings` scales these (its defaults are the values above); small grey data
may want less colour noise than ImageNet (issue 17).

The torchvision transforms draw from torch's global RNG; each call runs them under a forked
RNG seeded from the sample's own generator, so a sample's views depend only on its
(seed, epoch, index), in any DataLoader worker and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ViewKind = Literal["global_1", "global_2", "local"]

BLUR_SIGMA = (0.1, 2.0)
BLUR_PROBABILITY: dict[str, float] = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
SOLARIZE_PROBABILITY: dict[str, float] = {"global_1": 0.0, "global_2": 0.2, "local": 0.0}
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue


@dataclass(frozen=True)
class PhotometricSettings:
    """How strong the photometric augmentation is; the defaults are iBOT's recipe."""

    color_jitter: float = 1.0  # multiplies JITTER_STRENGTH; 0 turns jitter off
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob_scale: float = 1.0  # multiplies BLUR_PROBABILITY per view kind (capped at 1)
    solarize_prob: float = 0.2  # on the second global view only, as iBOT

    def jitter_strength(self) -> tuple[float, float, float, float]:
        return tuple(self.color_jitter * s for s in JITTER_STRENGTH)  # type: ignore[return-value]

    def blur_prob(self, kind: ViewKind) -> float:
        return min(1.0, self.blur_prob_scale * BLUR_PROBABILITY[kind])

    def solarize_prob_of(self, kind: ViewKind) -> float:
        return self.solarize_prob if SOLARIZE_PROBABILITY[kind] > 0 else 0.0


IBOT_PHOTOMETRIC = PhotometricSettings()

_to_normalized_tensor = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
)


def normalize_only(image: Image.Image) -> Tensor:
    """(3, H, W) float: ToTensor + ImageNet normalisation, no augmentation (inference)."""
    return _to_normalized_tensor(image)


def view_kind(index: int, is_global: bool) -> ViewKind:
    """DINO's recipe for the `index`-th global view alternates 1, 2; locals share one."""
    if not is_global:
        return "local"
    return "global_1" if index % 2 == 0 else "global_2"


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ uniform(sigma_min, sigma_max) from torch's global RNG.

    DINO's own blur (PIL ImageFilter, radius = sigma). torchvision's GaussianBlur computes
    the same blur as a dense 17x17 convolution on a tensor round trip, ~15x slower on a
    224-px view, and the crops are CPU-bound already (spec §13).
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def build_photometric(
    kind: ViewKind, settings: PhotometricSettings = IBOT_PHOTOMETRIC
) -> transforms.Compose:
    """PIL -> PIL random photometric transforms of one view kind (global RNG driven)."""
    brightness, contrast, saturation, hue = settings.jitter_strength()
    steps: list = [
        transforms.RandomApply(
            [transforms.ColorJitter(brightness, contrast, saturation, hue)],
            p=settings.jitter_prob,
        ),
        transforms.RandomGrayscale(p=settings.grayscale_prob),
    ]
    blur = GaussianBlur(BLUR_SIGMA)
    blur_p = settings.blur_prob(kind)
    steps.append(blur if blur_p >= 1.0 else transforms.RandomApply([blur], p=blur_p))
    if settings.solarize_prob_of(kind) > 0:
        # Solarize above 128 of 255, as DINO's ImageOps.solarize default.
        steps.append(
            transforms.RandomSolarize(threshold=128, p=settings.solarize_prob_of(kind))
        )
    return transforms.Compose(steps)


class Photometric:
    """One view kind's augmentation: PIL view + sample generator -> (3, S, S) normalised."""

    def __init__(
        self, kind: ViewKind, settings: PhotometricSettings = IBOT_PHOTOMETRIC
    ) -> None:
        self.kind = kind
        self.transform = build_photometric(kind, settings)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        # fork_rng restores the global CPU state afterwards; seeding only the CPU default
        # generator (not torch.manual_seed) leaves the CUDA RNG of the training process alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            augmented = self.transform(image)
        return normalize_only(augmented)
