"""The small latent diffusion prior that ships inside the package, and its evaluation classifier.

Folder layout (`SHIPPED_MODEL_DIR`, every part in a diffusers-style format, loaded offline):

    vae/          AutoencoderKL.save_pretrained (safetensors); `scaling_factor` = 1 / std of the
                  training latents, as Stable Diffusion does
    unet/         UNet2DModel.save_pretrained; class-conditional (`num_class_embeds` = classes + 1,
                  the last id is the null class used for classifier-free guidance)
    ig_head/      config.json + model.safetensors of the Internal-Guidance head (project code)
    scheduler/    DDIMScheduler.save_pretrained: the training noise schedule, epsilon prediction
    classifier/   config.json + model.safetensors of `DigitClassifier` (evaluation features)
    split.json    the held-out evaluation split
    shipped.json  latent shape, null class id, number of classes, image size, channels, model id, and
                  `description`: what it draws ("handwritten digits"), named with its size in messages
    README.md     the model card

Image convention everywhere: float tensors in [-1, 1], shape [n, C, H, W]. Latents are
`vae.encode(x).latent_dist.mode() * scaling_factor`; images are `vae.decode(z / scaling_factor).sample`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SHIPPED_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "mnist-ldm"

_HEAD_DIR = "ig_head"
_UNET_DIR = "unet"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class InternalGuidanceHead(nn.Module):
    """Auxiliary output head after an intermediate block (Internal Guidance, arXiv 2512.24176).

    A copy of the UNet's own output layer (GroupNorm -> SiLU -> 3x3 conv), applied to the features
    of block `block`; nearest-neighbour upsampling by `upsample_factor` when that block's
    resolution is below the latent's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        upsample_factor: int = 1,
        block: str = "up_blocks.0",
        loss_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm_num_groups": norm_num_groups,
            "upsample_factor": upsample_factor,
            "block": block,
            "loss_weight": loss_weight,
        }
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-5)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.upsample_factor = upsample_factor

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.act(self.norm(features)))
        if self.upsample_factor != 1:
            h = nn.functional.interpolate(h, scale_factor=self.upsample_factor, mode="nearest")
        return h


class InternalGuidanceUNet(nn.Module):
    """A diffusers `UNet2DModel` plus an Internal-Guidance head, evaluated in one backbone pass.

    `forward(sample, timestep, class_labels)` returns `(main, head)`: both are epsilon predictions
    of the latent's shape. The head reads the output of `head.config["block"]` (captured with a
    forward hook), so its training loss sends gradients into every block before it.
    At sampling time: out = head + w * (main - head), w ~ 1.4-2 (w = 1 is the plain model).
    """

    def __init__(self, unet: Any, head: InternalGuidanceHead) -> None:
        super().__init__()
        self.unet = unet
        self.head = head
        self._captured: torch.Tensor | None = None
        block = self.unet.get_submodule(head.config["block"])
        block.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    @property
    def config(self) -> Any:
        return self.unet.config

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured = None
        main = self.unet(sample, timestep, class_labels=class_labels).sample
        features, self._captured = self._captured, None
        if features is None:  # pragma: no cover - the hook always fires
            raise RuntimeError(f"block {self.head.config['block']!r} was not called")
        return main, self.head(features)

    @classmethod
    def build(
        cls,
        latent_channels: int = 4,
        latent_size: int = 8,
        num_classes: int = 10,
        block_out_channels: tuple[int, ...] = (64, 128),
        layers_per_block: int = 1,
        head_block: str = "up_blocks.0",
        loss_weight: float = 0.5,
    ) -> InternalGuidanceUNet:
        """A fresh model: attention at the lowest resolution, head after the first up block."""
        from diffusers import UNet2DModel

        n = len(block_out_channels)
        down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]
        up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
        unet = UNet2DModel(
            sample_size=latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            layers_per_block=layers_per_block,
            attention_head_dim=32,
            norm_num_groups=32,
            num_class_embeds=num_classes + 1,  # the last id is the null class
        )
        # up_blocks[i] ends at resolution latent_size / 2**(n-2-i) (the last up block has no upsampler)
        idx = int(head_block.split(".")[1]) if head_block.startswith("up_blocks.") else None
        if idx is None:
            raise ValueError(f"head_block must be 'up_blocks.<i>', got {head_block!r}")
        channels = list(reversed(block_out_channels))[idx]
        upsample = 2 ** max(0, n - 2 - idx)
        head = InternalGuidanceHead(
            channels, latent_channels, 32, upsample_factor=upsample, block=head_block, loss_weight=loss_weight
        )
        return cls(unet, head)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Save in diffusers' layout; `dtype` is the stored UNet weights' (loading upcasts to float32)."""
        directory = Path(directory)
        if dtype == torch.float32:
            self.unet.save_pretrained(directory / _UNET_DIR, safe_serialization=True)
        else:  # diffusers' layout, weights cast on the way out (the module itself stays float32)
            self.unet.save_config(directory / _UNET_DIR)
            state = {k: v.detach().to(dtype).contiguous() for k, v in self.unet.state_dict().items()}
            save_file(state, str(directory / _UNET_DIR / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
        (directory / _HEAD_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(directory / _HEAD_DIR / _CONFIG, self.head.config)
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(directory / _HEAD_DIR / _WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> InternalGuidanceUNet:
        """Load `directory/unet` and `directory/ig_head` (local files only, no network)."""
        from diffusers import UNet2DModel

        directory = Path(directory)
        unet = UNet2DModel.from_pretrained(directory / _UNET_DIR, local_files_only=True).float()
        head_config = json.loads((directory / _HEAD_DIR / _CONFIG).read_text())
        head = InternalGuidanceHead(**head_config)
        head.load_state_dict(load_file(str(directory / _HEAD_DIR / _WEIGHTS)))
        return cls(unet, head)


class DigitClassifier(nn.Module):
    """Small CNN on [n, C, H, W] images in [-1, 1]; penultimate features for Frechet distance etc.

    conv32-conv32-pool-conv64-conv64-pool-conv128-global-average-pool -> `features` (128-d)
    -> linear -> logits. BatchNorm after every conv; ~140k parameters (< 0.6 MB in float32).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width}
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * w, num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.config["width"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [n, 4 * width]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / _CONFIG, self.config)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / _WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DigitClassifier:
        directory = Path(directory)
        model = cls(**json.loads((directory / _CONFIG).read_text()))
        model.load_state_dict(load_file(str(directory / _WEIGHTS)))
        return model


@dataclass
class ShippedPrior:
    """Everything in the shipped model folder, loaded and in eval mode."""

    vae: Any
    unet: InternalGuidanceUNet
    scheduler: Any
    classifier: DigitClassifier | None
    info: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior mode, deterministic)."""
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (clamped)."""
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)


def _training_subject(path: Path) -> str:
    """What a prior without a `description` in shipped.json draws, from the training data split.json names
    (priors assembled before that field existed): "handwritten digits" for MNIST, else ""."""
    try:
        source = str(json.loads((path / "split.json").read_text()).get("source", ""))
    except (OSError, ValueError, AttributeError):
        return ""
    return "handwritten digits" if "mnist" in source.lower() else ""


def load_shipped(
    path: str | Path = SHIPPED_MODEL_DIR, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ShippedPrior:
    """Load the shipped prior (or any folder with the same layout) from a local path, offline; the VAE and
    the UNet in `dtype` (the classifier stays float32)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    path = Path(path)
    if not (path / "shipped.json").is_file():
        raise FileNotFoundError(f"{path} is not a shipped-model folder (no shipped.json)")
    info = json.loads((path / "shipped.json").read_text())
    info.setdefault("description", _training_subject(path))
    # the dtype at load (diffusers keeps a model's float32 modules), not a cast after it
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, dtype=dtype)
    unet = InternalGuidanceUNet.from_pretrained(path).to(dtype)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    classifier = DigitClassifier.from_pretrained(path / "classifier") if (path / "classifier").is_dir() else None
    modules: list[nn.Module] = [vae, unet] + ([classifier] if classifier is not None else [])
    for module in modules:
        module.to(device).eval().requires_grad_(False)
    return ShippedPrior(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        classifier=classifier,
        info=info,
        model_id=str(info.get("model_id", path.name)),
    )
