"""Adapters: one per model family, each turning a model into the `Denoiser` contract.

- `UNet2DAdapter`: diffusers `UNet2DModel` (unconditional or class-conditional via `num_class_embeds`).
- `InternalGuidanceUNetAdapter`: the shipped prior (UNet2DModel + Internal-Guidance head).
- `DiTAdapter`: diffusers `DiTTransformer2DModel` (class labels; null class = `num_embeds_ada_norm`).
- `UNet2DConditionAdapter`: diffusers `UNet2DConditionModel` with a text encoder (prompts).
- `CallableAdapter`: any function (x_t, t, condition) -> output, e.g. loaded by import path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .denoiser import Denoiser, DenoiserOutput


def _timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class _LabelAdapter:
    """Shared behaviour of class-label models: labels as int64 tensors, a null class for CFG."""

    null_class: int | None
    device: torch.device

    @property
    def supports_cfg(self) -> bool:
        return self.null_class is not None

    def _labels(self, condition: Any, batch: int) -> torch.Tensor | None:
        if condition is None:
            return None if self.null_class is None else self.null_condition(batch)
        labels = torch.as_tensor(condition, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() != batch:
            raise ValueError(f"condition has {labels.numel()} labels for a batch of {batch}")
        return labels

    def null_condition(self, batch_size: int) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("this model has no null class, so classifier-free guidance is not possible")
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.device)


class UNet2DAdapter(_LabelAdapter):
    """diffusers `UNet2DModel`; class labels when the model has a class embedding."""

    supports_internal_guidance = False

    def __init__(self, unet: torch.nn.Module, prediction_type: str = "epsilon", null_class: int | None = None):
        self.unet = unet
        self.prediction_type = prediction_type
        cfg = unet.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.conditional = cfg.num_class_embeds is not None or cfg.class_embed_type is not None
        self.null_class = null_class if self.conditional else None
        self.device = unet.device

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        dtype = _model_dtype(self.unet)
        labels = self._labels(condition, x_t.shape[0]) if self.conditional else None
        out = self.unet(x_t.to(dtype), _timesteps(t, x_t.shape[0], x_t.device), class_labels=labels).sample
        return DenoiserOutput(sample=out)


class InternalGuidanceUNetAdapter(_LabelAdapter):
    """The shipped prior: one backbone pass returns the final and the intermediate-head outputs."""

    supports_internal_guidance = True

    def __init__(self, model: torch.nn.Module, null_class: int, prediction_type: str = "epsilon"):
        self.model = model
        self.prediction_type = prediction_type
        cfg = model.unet.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.null_class = null_class
        self.device = model.unet.device

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        dtype = _model_dtype(self.model)
        labels = self._labels(condition, x_t.shape[0])
        main, head = self.model(x_t.to(dtype), _timesteps(t, x_t.shape[0], x_t.device), labels)
        return DenoiserOutput(sample=main, intermediate=head)


class DiTAdapter(_LabelAdapter):
    """diffusers `DiTTransformer2DModel` (class-conditional; learned-σ outputs are split off)."""

    supports_internal_guidance = False

    def __init__(self, transformer: torch.nn.Module, prediction_type: str = "epsilon"):
        self.transformer = transformer
        self.prediction_type = prediction_type
        cfg = transformer.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.null_class = cfg.num_embeds_ada_norm  # DiT's label table has one extra row: the null class
        self.device = transformer.device

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        dtype = _model_dtype(self.transformer)
        labels = self._labels(condition, x_t.shape[0])
        out = self.transformer(
            x_t.to(dtype), timestep=_timesteps(t, x_t.shape[0], x_t.device), class_labels=labels
        ).sample
        channels = self.latent_shape[0]
        if out.shape[1] == 2 * channels:  # learned variance: [ε, v] (DiT, Peebles & Xie 2023)
            out = out[:, :channels]
        return DenoiserOutput(sample=out)


class UNet2DConditionAdapter:
    """diffusers `UNet2DConditionModel` conditioned on prompt embeddings from a text encoder.

    Conditions are prompt-embedding tensors [B, L, D]; `encode_prompts` turns strings into them with
    the pipeline's own tokenizer and text encoder (transformers-compatible objects).
    """

    supports_internal_guidance = False
    supports_cfg = True

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        prediction_type: str = "epsilon",
        max_length: int | None = None,
    ):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.prediction_type = prediction_type
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.latent_shape = (cfg.in_channels, size, size)
        self.max_length = max_length or getattr(tokenizer, "model_max_length", 77)
        self.device = unet.device
        self._null: torch.Tensor | None = None

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens.input_ids
        out = self.text_encoder(ids.to(self.device))
        hidden = out[0] if isinstance(out, tuple | list) else getattr(out, "last_hidden_state", out)
        return hidden.to(_model_dtype(self.unet))

    def null_condition(self, batch_size: int) -> torch.Tensor:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null.expand(batch_size, *self._null.shape[1:])

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        batch = x_t.shape[0]
        if condition is None:
            condition = self.null_condition(batch)
        elif isinstance(condition, list | tuple) and condition and isinstance(condition[0], str):
            condition = self.encode_prompts(condition)
        dtype = _model_dtype(self.unet)
        out = self.unet(
            x_t.to(dtype), _timesteps(t, batch, x_t.device), encoder_hidden_states=condition.to(dtype)
        ).sample
        return DenoiserOutput(sample=out)


class CallableAdapter:
    """Any callable `fn(x_t, t, condition) -> Tensor | (Tensor, Tensor)` as a Denoiser."""

    def __init__(
        self,
        fn: Callable[..., Any],
        latent_shape: tuple[int, int, int],
        prediction_type: str = "epsilon",
        null_condition: Callable[[int], Any] | None = None,
        supports_internal_guidance: bool = False,
    ):
        self.fn = fn
        self.latent_shape = tuple(latent_shape)
        self.prediction_type = prediction_type
        self._null = null_condition
        self.supports_cfg = null_condition is not None
        self.supports_internal_guidance = supports_internal_guidance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any) -> DenoiserOutput:
        out = self.fn(x_t, t, condition)
        if isinstance(out, DenoiserOutput):
            return out
        if isinstance(out, tuple):
            return DenoiserOutput(sample=out[0], intermediate=out[1])
        return DenoiserOutput(sample=out)

    def null_condition(self, batch_size: int) -> Any:
        if self._null is None:
            raise ValueError("this denoiser defines no null condition, so classifier-free guidance is not possible")
        return self._null(batch_size)


def load_object(import_path: str) -> Any:
    """`package.module:attribute` -> the attribute (a denoiser factory or a Denoiser)."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"import path must look like 'package.module:name', got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} from {import_path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from exc


def adapter_for(model: Any, **kwargs: Any) -> Denoiser:
    """The adapter for a model object (dispatch on its class name; no heavy imports needed)."""
    if isinstance(model, Denoiser):
        return model
    name = type(model).__name__
    if name == "InternalGuidanceUNet":
        return InternalGuidanceUNetAdapter(model, **kwargs)
    if name == "UNet2DModel":
        return UNet2DAdapter(model, **kwargs)
    if name == "DiTTransformer2DModel":
        return DiTAdapter(model, **kwargs)
    if name == "UNet2DConditionModel":
        return UNet2DConditionAdapter(model, **kwargs)
    raise ValueError(
        f"no adapter for a {name}; supported: UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, "
        "the shipped InternalGuidanceUNet, or a callable passed by import path ('pkg.module:factory')"
    )
