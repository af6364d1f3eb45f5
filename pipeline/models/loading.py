"""One loading path for every model: the shipped prior, a diffusers folder or hub id, or an import path.

Everything ends as a `LoadedModel`: a `Denoiser`, a scheduler, and an optional VAE with batched,
sliced encode/decode. The device and dtype are decided once, here.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from storage.errors import InputError

from .adapters import InternalGuidanceUNetAdapter, adapter_for, load_object
from .denoiser import Denoiser
from .families import FAMILY_CFG_SCALE, SUPPORTED_FAMILIES, TextToImageAdapter, text_adapter_for
from .vae import LatentEncoding, encoding_of_vae, posterior_mode

#: `--cfg-scale auto` for class-label models (the shipped prior, DiT, class-conditional DDPM), as measured on the
#: shipped prior (docs/results.md §6).
LABEL_CFG_SCALE = 2.0


def resolve_device(device: str = "auto") -> torch.device:
    """CUDA when present, else CPU; an explicit name wins if this machine has that device.

    Raises:
        InputError: the name is not a device, or names one this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N (a GPU index)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(
                f"--device {device}: no CUDA device on this machine (or torch was built without CUDA); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise InputError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device}: unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; float16 on CUDA unless bf16 is supported (then bfloat16); explicit names win.

    Raises:
        InputError: float16 on a CPU (its narrow range overflows to NaN part-way through guided runs).
    """
    if dtype == "float16" and device.type == "cpu":
        raise InputError(
            "--dtype float16 on cpu: float16 overflows to NaN part-way through guided runs on a CPU; "
            "use --dtype float32 (the default there) or bfloat16"
        )
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def configure_backends(device: torch.device) -> None:
    """Allow TF32 matmuls on Ampere+ (the MMD math itself runs in float32 regardless)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class LoadedModel:
    """A denoiser with its scheduler and (for latent models) its VAE."""

    denoiser: Denoiser
    scheduler: Any
    model_id: str
    vae: Any | None = None
    image_channels: int = 3
    image_size: int = 64
    num_classes: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    extras: dict[str, Any] = field(default_factory=dict)
    description: str = ""  # what it draws ("handwritten digits"); "" when unknown
    latent_encoding: LatentEncoding | None = None  # None: latents = z × the VAE's scaling factor
    family: str = "custom"  # "shipped", "ddpm", "dit", "sd", "sdxl", "sd3", "flux", "pixart", "sana", "custom"

    @property
    def text_conditioned(self) -> bool:
        """The model takes prompts (`pipeline.models.families`)."""
        return isinstance(self.denoiser, TextToImageAdapter)

    @property
    def flow_matching(self) -> bool:
        """A rectified-flow model (SD3, Flux, Sana): its own flow-matching scheduler is kept."""
        return self.denoiser.prediction_type == "flow_prediction"

    @property
    def default_cfg_scale(self) -> float:
        """`--cfg-scale auto`: the family's customary scale for text models, 2 for class-label models."""
        return FAMILY_CFG_SCALE.get(self.family, LABEL_CFG_SCALE)

    def _encoding(self) -> LatentEncoding:
        return self.latent_encoding or LatentEncoding(self.scaling_factor)

    @property
    def draws(self) -> str:
        """What the model draws, for messages: "32×32 handwritten digits (grayscale)", "512×512 images (RGB)"."""
        colour = {1: "grayscale", 3: "RGB"}.get(self.image_channels, f"{self.image_channels} channels")
        return f"{self.image_size}×{self.image_size} {self.description or 'images'} ({colour})"

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0)) if self.vae is not None else 1.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [−1, 1] -> latents (VAE posterior mode × scaling factor), float32, in batches."""
        if self.vae is None:
            return images.float()
        # a VAE kept in float32 (force_upcast) runs in it
        encoding, dtype = self._encoding(), getattr(self.vae, "dtype", self.dtype)
        out = []
        for chunk in images.split(batch_size):
            out.append(encoding.apply(posterior_mode(self.vae, chunk.to(self.device, dtype))))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Latents -> images in [−1, 1], float32 on the CPU, in batches (bounded memory)."""
        if self.vae is None:
            return latents.float().cpu().clamp(-1, 1)
        encoding, dtype = self._encoding(), getattr(self.vae, "dtype", self.dtype)
        out = []
        for chunk in latents.split(batch_size):
            img = self.vae.decode(encoding.invert(chunk.to(self.device, dtype))).sample
            out.append(img.float().cpu().clamp(-1, 1))
        return torch.cat(out)


def load_model(
    spec: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    *,
    resolution: int | None = None,
    offload: bool = False,
) -> LoadedModel:
    """Load a model by spec.

    - None or "shipped": the small MNIST latent diffusion prior inside the package (offline); a folder
      with the same layout (a prior trained with `python -m pipeline.train_prior --data DIR`);
    - "package.module:factory": a callable returning a LoadedModel or a Denoiser (a pixel-space model
      then needs its own scheduler: return a LoadedModel);
    - a local diffusers folder or a hub id: `DiffusionPipeline.from_pretrained` (DDPM's UNet2DModel, DiT,
      and the text-to-image families of `pipeline.models.families`), adapted to the denoiser contract;
      `resolution` (pixels) overrides a text-to-image model's default size, `offload` uses diffusers' model
      CPU offload on a GPU.

    Raises:
        InputError: the model cannot be loaded, or is no family the job drives (one line naming it).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    configure_backends(dev)
    if spec is None or spec == "shipped":
        model = _load_shipped(dev, dt)
    elif (Path(spec) / "shipped.json").is_file():  # a prior trained by `python -m pipeline.train_prior`
        model = _load_shipped(dev, dt, spec)
    elif ":" in spec and not Path(spec).exists() and "://" not in spec:
        model = _load_import_path(spec, dev, dt)
    elif _looks_like_a_path(spec) and not Path(spec).expanduser().exists():
        raise InputError(f"--model {spec}: no such folder (give a diffusers model folder, a hub id or pkg.mod:factory)")
    else:
        model = _load_diffusers(spec, dev, dt, resolution=resolution, offload=offload)
    if resolution is not None and resolution != model.image_size and not model.text_conditioned:
        raise InputError(
            f"--resolution {resolution}: {model.model_id} draws {model.draws} only; --resolution sets the size of "
            "text-to-image models"
        )
    return model


def peek_input(spec: str | None, resolution: int | None = None) -> tuple[int, int] | None:
    """(image channels, image side) a model takes, read from its config files without loading it: the shipped
    prior's `shipped.json`, a local diffusers folder's `model_index.json` and component configs. None where that
    cannot be told without loading (a hub id, an import path, an unknown layout)."""
    import json

    from .shipped import SHIPPED_MODEL_DIR

    folder = SHIPPED_MODEL_DIR if spec in (None, "shipped") else Path(str(spec)).expanduser()
    try:
        if (folder / "shipped.json").is_file():
            info = json.loads((folder / "shipped.json").read_text())
            return int(info["channels"]), int(info["image_size"])
        index = json.loads((folder / "model_index.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text()) if "vae" in index else None
        network = next(
            json.loads((folder / n / "config.json").read_text()) for n in ("unet", "transformer") if n in index
        )
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    text = "text_encoder" in index and index.get("text_encoder", [None])[0] is not None
    if vae is None:  # pixel space: the network's own channels, images when it has 1 or 3
        size, channels = network.get("sample_size"), network.get("in_channels")
        return (int(channels), int(size)) if isinstance(size, int) and channels in (1, 3) else None
    factor = 2 ** (len(vae.get("encoder_block_out_channels") or vae.get("block_out_channels") or [0]) - 1)
    channels = int(vae.get("in_channels", 3))
    if text and resolution is not None:
        return channels, int(resolution)
    size = network.get("sample_size")
    if isinstance(size, list | tuple):
        size = size[0]
    if not isinstance(size, int):  # Flux: the pipeline's default sample size (128 latents)
        size = 128
    return channels, size * factor


def _looks_like_a_path(spec: str) -> bool:
    """A local path rather than a hub id (`org/name`): absolute, `~`, `.`-relative, or more than one `/`."""
    return spec.startswith(("/", "~", "./", "../", ".\\", "..\\")) or spec in (".", "..") or spec.count("/") > 1


def _load_shipped(device: torch.device, dtype: torch.dtype, path: str | Path | None = None) -> LoadedModel:
    from .shipped import SHIPPED_MODEL_DIR, load_shipped

    prior = load_shipped(path or SHIPPED_MODEL_DIR, device=device, dtype=dtype)
    info = prior.info
    denoiser = InternalGuidanceUNetAdapter(prior.unet, null_class=int(info["null_class_id"]))
    return LoadedModel(
        family="shipped",
        denoiser=denoiser,
        scheduler=prior.scheduler,
        model_id=prior.model_id,
        vae=prior.vae,
        image_channels=int(info["channels"]),
        image_size=int(info["image_size"]),
        num_classes=int(info["num_classes"]),
        device=device,
        dtype=dtype,
        extras={"classifier": prior.classifier, "info": info},
        description=str(info.get("description", "")),
    )


def _load_import_path(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    try:
        factory: Callable[..., Any] = load_object(spec)
    except ValueError as exc:
        raise InputError(f"--model {spec}: {exc}") from exc
    if callable(factory) and not isinstance(factory, Denoiser):
        _require_factory_signature(spec, factory)
        obj = factory(device=device, dtype=dtype)
    else:
        obj = factory
    if isinstance(obj, LoadedModel):
        return obj
    raise InputError(
        f"--model {spec}: returned a {type(obj).__name__}; a custom model factory must return a "
        "pipeline.models.loading.LoadedModel (a Denoiser plus its scheduler and optional VAE)"
    )


def _require_factory_signature(spec: str, factory: Callable[..., Any]) -> None:
    """InputError unless `factory(device=..., dtype=...)` binds (checked without calling it)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # not introspectable (some builtins): the call itself will tell
    try:
        signature.bind(device=None, dtype=None)
    except TypeError as exc:
        raise InputError(
            f"--model {spec}: cannot be called as factory(device=..., dtype=...) ({exc}); a custom model "
            "factory takes (device, dtype) and returns a pipeline.models.loading.LoadedModel"
        ) from None


def _load_diffusers(
    spec: str, device: torch.device, dtype: torch.dtype, *, resolution: int | None = None, offload: bool = False
) -> LoadedModel:
    from diffusers import DiffusionPipeline

    hub_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    hub_logger.addFilter(_no_hub_traceback)
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _diffusers_load_error(spec, exc) from exc
    finally:
        hub_logger.removeFilter(_no_hub_traceback)
    prediction_type = _prediction_type(pipe.scheduler)
    text = text_adapter_for(pipe, prediction_type)
    if text is None:
        _require_label_family(spec, pipe)
    _place(pipe, device, dtype, offload)
    if text is not None:
        return _text_model(model_id_for(spec), pipe, text, device, dtype, resolution)
    vae = getattr(pipe, "vae", None)
    num_classes = None
    if getattr(pipe, "transformer", None) is not None:
        family, model = "dit", pipe.transformer
        denoiser = adapter_for(model, prediction_type=prediction_type)
        num_classes = model.config.num_embeds_ada_norm
    else:
        family, model, null = "ddpm", pipe.unet, None
        if model.config.num_class_embeds is not None:
            num_classes = model.config.num_class_embeds - 1
            null = num_classes  # convention: the last class id is the null class
        denoiser = adapter_for(model, prediction_type=prediction_type, null_class=null)
    channels = vae.config.in_channels if vae is not None else denoiser.latent_shape[0]
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return LoadedModel(
        family=family,
        denoiser=denoiser,
        scheduler=pipe.scheduler,
        model_id=model_id_for(spec),
        vae=vae,
        image_channels=channels,
        image_size=denoiser.latent_shape[-1] * factor,
        num_classes=num_classes,
        device=device,
        dtype=dtype,
    )


def _prediction_type(scheduler: Any) -> str:
    """What the model predicts, from its scheduler: flow matching (FlowMatch schedulers, DPM-Solver with flow
    sigmas) is the velocity ("flow_prediction"); otherwise the config's `prediction_type` (ε by default)."""
    config = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas", False):
        return "flow_prediction"
    return config.get("prediction_type", None) or "epsilon"


def _require_label_family(spec: str, pipe: Any) -> None:
    """InputError (one line) unless the pipeline is a DiT or a DDPM-style UNet2DModel the label adapters drive."""
    transformer, unet = getattr(pipe, "transformer", None), getattr(pipe, "unet", None)
    network = transformer if transformer is not None else unet
    found = type(network).__name__ if network is not None else "no unet or transformer"
    if found in ("DiTTransformer2DModel", "UNet2DModel"):
        return
    if found == "UNet2DConditionModel":
        found += " without a text encoder"
    raise InputError(
        f"--model {spec}: a {type(pipe).__name__} ({found}) is not a model family augment drives; supported: "
        f"{SUPPORTED_FAMILIES}"
    )


def _place(pipe: Any, device: torch.device, dtype: torch.dtype, offload: bool) -> None:
    """Move the pipeline to the device (or offload it there), keep a VAE that asks for it in float32, and tile
    the VAE of large images on a GPU."""
    vae = getattr(pipe, "vae", None)
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae is not None and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # as the pipelines' decode: SDXL's VAE overflows in float16
    if vae is not None and device.type == "cuda" and hasattr(vae, "enable_tiling"):
        size = getattr(vae.config, "sample_size", 0)
        if isinstance(size, int) and size >= 1024:
            vae.enable_tiling()


def loaded_from_pipeline(
    pipe: Any, model_id: str, *, resolution: int | None = None, offload: bool = False
) -> LoadedModel:
    """A text-to-image diffusers pipeline object already in memory (say, built with random weights by a benchmark)
    as a LoadedModel on its device and in its dtype.

    Raises:
        InputError: it is none of the text-to-image families of `pipeline.models.families`.
    """
    text = text_adapter_for(pipe, _prediction_type(pipe.scheduler))
    if text is None:
        raise InputError(
            f"{model_id}: a {type(pipe).__name__} is not a text-to-image family; supported: {SUPPORTED_FAMILIES}"
        )
    device = torch.device(getattr(pipe, "_execution_device", None) or pipe.device)
    dtype = pipe.dtype
    _place(pipe, device, dtype, offload)
    return _text_model(model_id, pipe, text, device, dtype, resolution)


def _text_model(
    model_id: str,
    pipe: Any,
    adapter: TextToImageAdapter,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int | None,
) -> LoadedModel:
    """A text-to-image pipeline as a LoadedModel at `resolution` pixels (default: the model's own)."""
    vae = pipe.vae
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    encoding = encoding_of_vae(vae)
    adapter.device = device
    if resolution is not None:
        multiple = factor * (2 if adapter.family == "flux" else 1)
        if resolution % multiple:
            raise InputError(
                f"--resolution {resolution}: {adapter.family} images must be a multiple of {multiple} pixels"
            )
        c = adapter.latent_shape[0]
        adapter.latent_shape = (c, resolution // factor, resolution // factor)
    return LoadedModel(
        family=adapter.family,
        denoiser=adapter,
        scheduler=pipe.scheduler,
        model_id=model_id,
        vae=vae,
        image_channels=int(vae.config.in_channels),
        image_size=adapter.latent_shape[-1] * factor,
        device=device,
        dtype=dtype,
        latent_encoding=encoding,
        extras={"pipeline": pipe},
    )


def _no_hub_traceback(record: logging.LogRecord) -> bool:
    """Drop diffusers' "Couldn't connect to the Hub: <traceback>" warning: a failed load says it in one line."""
    return not record.getMessage().startswith("Couldn't connect to the Hub")


def _diffusers_load_error(spec: str, exc: BaseException) -> InputError:
    """One line saying why `from_pretrained(spec)` failed and what to do."""
    chain = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if Path(spec).expanduser().exists():
        first = str(exc).strip().split("\n")[0]
        return InputError(f"--model {spec}: not a loadable diffusers model folder ({first[:200]})")
    if "RepositoryNotFoundError" in chain:
        return InputError(f"--model {spec}: no such model on the Hugging Face hub (or it is private: log in first)")
    if "GatedRepoError" in chain:
        return InputError(f"--model {spec}: a gated model; accept its terms on the hub and log in first")
    unreachable = ("OfflineModeIsEnabled", "ConnectError", "ConnectionError", "gaierror", "Timeout", "TimeoutError")
    if any(name in chain for name in unreachable) or "not fully cached locally" in str(exc):
        return InputError(
            f"--model {spec}: not in the local Hugging Face cache and the hub cannot be reached; download it "
            "where there is network (huggingface-cli download), or give a local model folder"
        )
    first = str(exc).strip().split("\n")[0]
    return InputError(f"--model {spec}: cannot load a diffusers model ({first[:200]})")


def model_id_for(spec: str) -> str:
    """A stable id: the hub id, or the folder name plus a hash of its model_index/config files."""
    path = Path(spec)
    if not path.exists():
        return spec
    import hashlib

    h = hashlib.sha256()
    for cfg in sorted(path.rglob("*.json")):
        h.update(cfg.relative_to(path).as_posix().encode())
        h.update(cfg.read_bytes())
    for weights in sorted([*path.rglob("*.safetensors"), *path.rglob("*.bin")]):
        # size + first and last MiB: a retrained model of the same architecture gets a new id without
        # reading gigabytes of weights
        size = weights.stat().st_size
        h.update(f"{weights.relative_to(path).as_posix()}:{size}".encode())
        with open(weights, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return f"{path.name}@{h.hexdigest()[:12]}"
