"""The multimodal glue: image -> views -> SigLIP -> projector -> prune hook -> merge -> prompt.

LaViDa's order matters and is kept: every view goes through SigLIP and the projector first,
pooling (bilinear 27x27 -> 14x14) acts on the *projected* 4096-d grid, then the tiles are
merged spatially, unpadded to the image's aspect and given one `image_newline` per row.

Prune methods (`shirg_patches` registry) plug in at three hook points and nowhere else:
the pooling flag (LaViDa's own methods), the selection hook after the projector (a method gets
a `PruneContext` over the unpooled candidates and returns what to keep), and a method's own
view encoder (`PruneMethod.encode`) or in-LM prefill hook. This file names no method. Every
choice is made once per image, before the diffusion steps, so the prefix K/V cache stays valid.
"""
from __future__ import annotations

import ast
import functools
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import DEFAULT_GRID_PINPOINTS, IMAGE_TOKEN_INDEX, SIGLIP_MEAN
from llava.errors import ConfigError, InputError
from llava.mm_utils import get_anyres_image_grid_shape, image_to_tensor, process_anyres_image, unpad_bounds
from llava.utils import NullTimer, StageTimer, logger
from shirg_patches import EncodeRequest, MethodOptions, PruneContext, PruneMethod, VisualTokens, get_method, run_select

POOL_ENV = "NOT_ALWASY_DO_2DPOOL"  # upstream's (misspelled) switch; any non-empty value disables pooling


@dataclass
class MultimodalConfig:
    """The `mm_*` keys of a LaViDa config.json (same names as upstream), plus `mm_2d_pool`.

    `mm_2d_pool` is this project's explicit pooling switch (true/false; null = LaViDa default,
    which is to pool). `mm_vision_attn_implementation` picks SigLIP's attention kernel: `eager`
    (upstream's numerics, default) or `sdpa` (faster; ~1 % relative feature drift in bf16).
    `vision_config` holds the SigLIP config for checkpoints whose tower is not
    the stock so400m (the built-in small model); real LaViDa configs don't have it.
    """

    mm_vision_tower: str = "google/siglip-so400m-patch14-384"
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1152
    mm_patch_merge_type: str = "spatial_unpad"
    image_aspect_ratio: str = "anyres"
    image_grid_pinpoints: Any = field(default_factory=lambda: [list(p) for p in DEFAULT_GRID_PINPOINTS])
    mm_spatial_pool_mode: str = "bilinear"
    tokenizer_model_max_length: int = 4096
    mm_2d_pool: Optional[bool] = None
    mm_vision_attn_implementation: str = "eager"
    vision_config: Optional[dict] = None

    MERGE_TYPES = ("spatial_unpad", "flat")
    ASPECTS = ("anyres", "square", "pad")
    POOL_MODES = ("bilinear", "average", "max")

    @classmethod
    def from_dict(cls, d: dict) -> "MultimodalConfig":
        """Read and type-check the keys once, naming the culprit (so a bad value fails at load, not mid-run)."""
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        cfg = cls(**kw)
        for key in ("mm_vision_tower", "mm_projector_type", "mm_patch_merge_type", "image_aspect_ratio",
                    "mm_spatial_pool_mode", "mm_vision_attn_implementation"):
            if not isinstance(getattr(cfg, key), str):
                raise ConfigError(f"config key {key!r} must be a string, got {getattr(cfg, key)!r}")
        for key in ("mm_hidden_size", "tokenizer_model_max_length"):
            value = getattr(cfg, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
        if cfg.mm_2d_pool is not None and not isinstance(cfg.mm_2d_pool, bool):
            raise ConfigError(f"config key 'mm_2d_pool' must be true, false or null, got {cfg.mm_2d_pool!r}")
        if cfg.vision_config is not None and not isinstance(cfg.vision_config, dict):
            raise ConfigError(f"config key 'vision_config' must be an object, got {cfg.vision_config!r}")
        cfg.image_grid_pinpoints = parse_pinpoints(cfg.image_grid_pinpoints)
        if cfg.mm_patch_merge_type not in cls.MERGE_TYPES:
            raise ConfigError(f"mm_patch_merge_type {cfg.mm_patch_merge_type!r} unsupported; use {cls.MERGE_TYPES}")
        if cfg.image_aspect_ratio not in cls.ASPECTS:
            raise ConfigError(f"image_aspect_ratio {cfg.image_aspect_ratio!r} unsupported; use {cls.ASPECTS}")
        if cfg.mm_spatial_pool_mode not in cls.POOL_MODES:
            raise ConfigError(f"mm_spatial_pool_mode {cfg.mm_spatial_pool_mode!r} unsupported; use {cls.POOL_MODES}")
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return d


def parse_pinpoints(value: Any) -> list[tuple[int, int]]:
    """`image_grid_pinpoints` as [(w, h), ...] of positive integers; upstream's CLI writes the list as a string
    ("[(384, 768), ...]"). Anything else is a ConfigError naming the key."""
    raw = value
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ConfigError(f"config key 'image_grid_pinpoints' {raw!r} is not a list of [width, height]") from None

    def side(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 1 or int(v) != v:
            raise ValueError
        return int(v)

    try:
        pinpoints = [(side(w), side(h)) for w, h in value]
        if not pinpoints:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key 'image_grid_pinpoints' must be a non-empty list of [width, height] positive integers, "
            f"got {raw!r}"
        ) from None
    return pinpoints


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
    """Log a pooling decision the first time it is made (a training run encodes thousands of images)."""
    logger.info(message)


def resolve_pooling(explicit: Optional[bool] = None, config_value: Optional[bool] = None) -> tuple[bool, str]:
    """Decide LaViDa's 2-D pooling, read at call time (upstream latches it at import).

    Precedence: explicit flag (`--pool/--no-pool`) > `NOT_ALWASY_DO_2DPOOL` > config `mm_2d_pool`
    > default (pool). The env var keeps upstream's string semantics: unset or empty means pool,
    ANY non-empty value -- including "0" and "false" -- means no pooling; we say so out loud.
    """
    if explicit is not None:
        return explicit, f"pooling {'on' if explicit else 'off'} (explicit flag)"
    raw = os.environ.get(POOL_ENV)
    if raw:
        reason = f"pooling off ({POOL_ENV}={raw!r}: any non-empty value disables pooling, as upstream)"
        if raw.strip().lower() in {"0", "false", "no", "off"}:
            reason += f"; note {raw!r} looks like 'false' but still DISABLES pooling -- unset it to pool"
        return False, reason
    if config_value is not None:
        return bool(config_value), f"pooling {'on' if config_value else 'off'} (config mm_2d_pool)"
    return True, "pooling on (LaViDa default)"


def pool_2d(tokens: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """[V, n*n, D] -> [V, m*m, D]: bilinear to ceil(n/2) (LaViDa: 27 -> 14), or 2x2 avg/max (-> 13)."""
    v, n2, d = tokens.shape
    n = math.isqrt(n2)
    x = tokens.view(v, n, n, d).permute(0, 3, 1, 2)
    if mode == "bilinear":
        x = F.interpolate(x, size=(math.ceil(n / 2),) * 2, mode="bilinear", align_corners=False)
    elif mode == "average":
        x = F.avg_pool2d(x, 2)
    elif mode == "max":
        x = F.max_pool2d(x, 2)
    else:
        raise ConfigError(f"mm_spatial_pool_mode {mode!r} unsupported")
    return x.permute(0, 2, 3, 1).reshape(v, -1, d)


def tile_grid(tile_tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, n*n, C] tiles (row-major) -> one [rows*n, cols*n, C] spatial map."""
    _, n2, c = tile_tokens.shape
    n = math.isqrt(n2)
    return tile_tokens.view(rows, cols, n, n, c).permute(0, 2, 1, 3, 4).reshape(rows * n, cols * n, c)


def unpadded_tiles(view_tokens: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The tile views [V-1 of n*n, C] as one spatial map, cropped to the image's aspect: [Hk, Wk, C]."""
    cols, rows = grid
    n = math.isqrt(view_tokens.shape[1])
    tiles = tile_grid(view_tokens[1:], rows, cols)
    r0, r1, c0, c1 = unpad_bounds(image_size, rows * n, cols * n)
    return tiles[r0:r1, c0:c1]


def arrange_anyres(
    view_tokens: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """[V, n*n, C] -> ([N, C], view shapes): the global view, then the unpadded tile map, no newlines.

    This is the candidate layout pruning methods see: padding tokens (black canvas) are removed
    exactly as LaViDa's unpad step would, so no budget is spent on them.
    """
    n = math.isqrt(view_tokens.shape[1])
    tiles = unpadded_tiles(view_tokens, image_size, grid)
    flat = torch.cat([view_tokens[0], tiles.reshape(-1, tiles.shape[-1])])
    return flat, [(n, n), tuple(tiles.shape[:2])]


def merge_spatial_unpad(
    view_tokens: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], newline: torch.Tensor
) -> torch.Tensor:
    """LaViDa's `spatial_unpad` merge: [global n*n ; unpadded tile rows each followed by `newline`]."""
    tiles = unpadded_tiles(view_tokens, image_size, grid)
    nl = newline.to(tiles.dtype).view(1, 1, -1).expand(tiles.shape[0], 1, -1)
    grid_tokens = torch.cat([tiles, nl], dim=1).reshape(-1, tiles.shape[-1])
    return torch.cat([view_tokens[0], grid_tokens])


class LlavaMetaForCausalLM:
    """Mixin for the multimodal model: needs `self.model` with vision_tower, mm_projector,
    image_newline, embed_tokens, and `self.mm_config`."""

    # ---- single-stage services (prune methods that encode their own views call these) ----------
    def vision_features(self, pixel_values: torch.Tensor, with_attention: bool):
        """SigLIP on [V, 3, S, S] pixels -> features (and attention-received scores and keys)."""
        tower = self.model.vision_tower
        p = next(tower.parameters())
        return tower(pixel_values.to(device=p.device, dtype=p.dtype), return_attention=with_attention)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(features)

    def question_embedding(self, question_ids: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
        """Mean LM input embedding of the question's tokens (None for an empty question)."""
        if question_ids is None or len(question_ids) == 0:
            return None
        wte = self.model.transformer.wte
        ids = torch.as_tensor(list(question_ids), dtype=torch.long, device=wte.weight.device)
        return wte(ids).float().mean(0)

    # ---- the pipeline --------------------------------------------------------------------------
    def encode_image(
        self,
        image: Image.Image,
        prune_method: str | PruneMethod = "pool",
        question_ids: Optional[Sequence[int]] = None,
        options: Optional[dict | MethodOptions] = None,
        pool: Optional[bool] = None,
        timer: Optional[StageTimer] = None,
        seed: Optional[int] = None,
    ) -> VisualTokens:
        """Turn one (already validated, RGB) image into the visual tokens the LM will see.

        `options` are the method's options (a dict or its options dataclass); a "seed" key in a
        dict is taken as `seed` (the seed of any randomness in the selection).
        """
        method = get_method(prune_method)
        options = dict(options) if isinstance(options, dict) else options
        if isinstance(options, dict) and "seed" in options:
            seed = int(options.pop("seed")) if seed is None else seed
        request = EncodeRequest(image, question_ids, method.make_options(options), int(seed or 0), pool)
        timer = timer or NullTimer()
        if method.encode is not None:  # the method encodes its own views
            return method.encode(self, method, request, timer)
        if self.mm_config.image_aspect_ratio != "anyres":
            return self._encode_single_view(image, method, timer)
        return self._encode_anyres(method, request, timer)

    def _encode_single_view(self, image, method, timer) -> VisualTokens:
        """`square`/`pad` aspect (stage-1, low-res): one 384² view, 729 tokens, no merge. Upstream never pools
        this path; config `mm_2d_pool: true` (this project's key, never in an upstream config) pools it to 196
        like an any-res view: a curriculum stage on one-view images at a quarter of the LM's sequence."""
        if method.select is not None:
            raise InputError(f"--prune_method {method.name} needs image_aspect_ratio 'anyres'")
        with timer("preprocess"):
            if self.mm_config.image_aspect_ratio == "pad":
                side = max(image.size)
                canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in SIGLIP_MEAN))  # upstream: (127,)*3
                canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = canvas
            pixels = image_to_tensor(image, self.model.vision_tower.image_size).unsqueeze(0)
        with timer("vision"):
            feats = self.vision_features(pixels, False).features
        with timer("projector"):
            tokens = self.project(feats)
        side = self.model.vision_tower.num_patches_per_side
        if self.mm_config.mm_2d_pool is True:
            tokens = pool_2d(tokens, self.mm_config.mm_spatial_pool_mode)
            side = math.isqrt(tokens.shape[1])
            reason = "on (single view, config mm_2d_pool)"
        else:
            reason = "off (single view)"
        tokens = tokens[0]
        return VisualTokens(tokens, method.name, tokens.shape[0], [(side, side)], info={"pooling": reason})

    def _pooling_decision(self, method: PruneMethod, pool: Optional[bool]) -> tuple[bool, str]:
        if method.select is not None:
            return False, f"pooling off (--prune_method {method.name} selects from unpooled tokens)"
        if method.pool is None:
            return resolve_pooling(pool, self.mm_config.mm_2d_pool)
        if pool is not None and pool != method.pool:
            raise InputError(
                f"--prune_method {method.name} means pooling {'on' if method.pool else 'off'}; "
                f"drop --{'no-' if not pool else ''}pool or use --prune_method lavida"
            )
        reason = f"pooling {'on' if method.pool else 'off'} (--prune_method {method.name})"
        if os.environ.get(POOL_ENV):
            reason += f"; {POOL_ENV} is set but the method decides"
        return method.pool, reason

    def _encode_anyres(self, method: PruneMethod, request: EncodeRequest, timer) -> VisualTokens:
        """LaViDa's views; then either its own pool + merge, or the method's selection over the
        unpooled candidates (before the LM, or deferred to a prefill hook inside it)."""
        cfg, image = self.mm_config, request.image
        do_pool, reason = self._pooling_decision(method, request.pool)
        _log_once(reason)

        with timer("preprocess"):
            pixels = process_anyres_image(image, cfg.image_grid_pinpoints, self.model.vision_tower.image_size)
            grid = get_anyres_image_grid_shape(image.size, cfg.image_grid_pinpoints, self.model.vision_tower.image_size)
        want_attn = method.needs_attention or method.needs_keys
        with timer("vision"):
            vis = self.vision_features(pixels, want_attn)
        with timer("projector"):
            proj = self.project(vis.features)

        if method.select is None:
            with timer("merge"):
                views = pool_2d(proj, cfg.mm_spatial_pool_mode) if do_pool else proj
                if cfg.mm_patch_merge_type == "flat":
                    tokens = views.reshape(-1, views.shape[-1])
                else:
                    tokens = merge_spatial_unpad(views, image.size, grid, self.model.image_newline)
            return VisualTokens(tokens, method.name, tokens.shape[0], info={"pooling": reason, "grid": grid})

        with timer("selection"):
            flat_proj, shapes = arrange_anyres(proj, image.size, grid)

            def arrange(x):  # every per-token tensor gets the candidates' layout
                return None if x is None else arrange_anyres(x, image.size, grid)[0]

            n_candidates = flat_proj.shape[0]
            ctx = PruneContext(
                features=flat_proj,
                vision_features=arrange(vis.features),
                view_shapes=shapes,
                budget=request.options.budget_for(n_candidates),
                attn_received=None if vis.attn_received is None else arrange(vis.attn_received.unsqueeze(-1))[:, 0],
                keys=arrange(vis.keys),
                question_embedding=self.question_embedding(request.question_ids),
                seed=request.seed,
                options=request.options,
            )
            info = {"pooling": reason, "grid": grid}
            note = request.options.budget_note(n_candidates)
            if note:
                info["budget_note"] = note
            if method.prefill_hook is not None:
                # all candidates enter the prompt; the LM prunes them once during prefill
                visual = VisualTokens(flat_proj, method.name, flat_proj.shape[0], shapes, info=info,
                                      context=ctx, lm_tokens=ctx.budget)
                visual.prefill_hook = functools.partial(method.prefill_hook, ctx, visual)
                return visual
            sel = run_select(method.select, ctx)
            tokens = sel.tokens if sel.tokens is not None else flat_proj[sel.indices]
        return VisualTokens(tokens, method.name, flat_proj.shape[0], shapes, kept=sel.indices,
                            info={**info, **sel.info})

    # ---- prompt assembly -----------------------------------------------------------------------
    def prepare_inputs_embeds(
        self, input_ids: Sequence[int] | torch.Tensor, visual: Sequence[VisualTokens]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Splice each image's tokens at its -200 placeholder; returns ([1, P, D], image spans).

        Text past `tokenizer_model_max_length` is cut (with a warning), as upstream; a cut that would reach an
        image's tokens is an InputError instead, so the reported visual-token count is what the LM sees."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1) or ids.numel() == 0:
            # flattening a [B>1, T] batch would silently glue the prompts into one
            raise InputError(f"expected one non-empty prompt ([T] or [1, T] ids), got shape {tuple(ids.shape)}")
        ids = ids.flatten().tolist()
        n_images = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        if n_images != len(visual):
            raise InputError(f"prompt has {n_images} <image> placeholders but {len(visual)} images were given")
        wte = self.model.transformer.wte
        device = wte.weight.device
        pieces, spans, chunk, pos, it = [], [], [], 0, iter(visual)

        def flush():
            nonlocal pos
            if chunk:
                pieces.append(wte(torch.tensor(chunk, device=device)))
                pos += len(chunk)
                chunk.clear()

        for t in ids:
            if t == IMAGE_TOKEN_INDEX:
                flush()
                v = next(it).tokens.to(device=device, dtype=wte.weight.dtype)
                pieces.append(v)
                spans.append((pos, pos + v.shape[0]))
                pos += v.shape[0]
            else:
                chunk.append(t)
        flush()
        embeds = torch.cat(pieces).unsqueeze(0)
        limit = self.mm_config.tokenizer_model_max_length
        if embeds.shape[1] > limit:
            if any(end > limit for _, end in spans):
                # upstream cuts silently; an image whose tokens the LM never sees would make every count wrong
                n_visual = sum(end - start for start, end in spans)
                raise InputError(
                    f"the prompt is {embeds.shape[1]} tokens ({n_visual} of them visual) but the config's "
                    f"tokenizer_model_max_length is {limit}: truncating would cut into the image tokens; raise "
                    "tokenizer_model_max_length or use a method with fewer visual tokens"
                )
            logger.warning("prompt of %d tokens truncated to tokenizer_model_max_length=%d", embeds.shape[1], limit)
            embeds = embeds[:, :limit]  # text after the last image only: every span is still whole
        return embeds, spans


def build_prefill_hook(visual: Sequence[VisualTokens], spans: Sequence[tuple[int, int]], n_layers: int):
    """The prefill callback of the one image whose method prunes inside the LM, or None."""
    plans = [(v, span) for v, span in zip(visual, spans) if v.prefill_hook is not None]
    if not plans:
        return None
    if len(plans) > 1:
        raise InputError("in-LM pruning supports one image per prompt")
    v, (start, end) = plans[0]
    if end - start != v.tokens.shape[0]:
        raise InputError("the image's tokens were truncated by tokenizer_model_max_length; in-LM pruning needs all")
    return v.prefill_hook(start, end, n_layers)
