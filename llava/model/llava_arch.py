"""The multimodal glue: image -> views -> SigLIP -> projector -> prune hook -> merge -> prompt.

LaViDa's order matters and is kept: every view goes through SigLIP and the projector first,
pooling (bilinear 27x27 -> 14x14) acts on the *projected* 4096-d grid, then the tiles are
merged spatially, unpadded to the image's aspect and given one `image_newline` per row.

The one hook for prune methods sits after the projector (`shirg_patches` registry): a method
either keeps LaViDa's merge (`pool`, `full`), or gets a `PruneContext` over candidate tokens
and returns what to keep. Everything here runs once per image, before the LM, so the prefix
K/V cache stays valid for every diffusion step.
"""
from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import DEFAULT_GRID_PINPOINTS, FOVEA_SIZE, IMAGE_TOKEN_INDEX
from llava.errors import ConfigError, InputError
from llava.mm_utils import get_anyres_image_grid_shape, image_to_tensor, process_anyres_image, unpad_bounds
from llava.utils import NullTimer, StageTimer, logger
from shirg_patches import ANYRES, GLOBAL_FOVEA, PruneContext, PruneMethod, get_method
from shirg_patches.context import run_select

POOL_ENV = "NOT_ALWASY_DO_2DPOOL"  # upstream's (misspelled) switch; any non-empty value disables pooling
DEFAULT_BUDGET = 980  # tokens kept by pruning baselines: SHIRG's count (= 5 x 196 nominal)


@dataclass
class MultimodalConfig:
    """The `mm_*` keys of a LaViDa config.json (same names as upstream), plus `mm_2d_pool`.

    `mm_2d_pool` is this project's explicit pooling switch (true/false; null = LaViDa default,
    which is to pool). `mm_vision_attn_implementation` picks SigLIP's attention kernel: `eager`
    (upstream's numerics, default) or `sdpa` (faster; ~1 % relative feature drift in bf16). `vision_config` holds the SigLIP config for checkpoints whose tower is not
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
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        cfg = cls(**kw)
        if isinstance(cfg.image_grid_pinpoints, str):  # upstream CLI writes "[(384, 768), ...]"
            cfg.image_grid_pinpoints = [list(p) for p in ast.literal_eval(cfg.image_grid_pinpoints)]
        cfg.image_grid_pinpoints = [tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints]
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


@dataclass
class VisualTokens:
    """The tokens one image contributes to the prompt, and how they were chosen."""

    tokens: torch.Tensor  # [T, D_lm] spliced into the prompt
    method: str
    candidates: int  # tokens available before selection (equal to T for pool/full)
    view_shapes: list = field(default_factory=list)
    kept: Optional[torch.Tensor] = None  # indices into the candidates, raster order
    lm_context: Optional[PruneContext] = None  # set for methods that prune inside the LM (TopV)
    lm_layer: Optional[int] = None
    info: dict = field(default_factory=dict)

    @property
    def lm_token_count(self) -> int:
        """Visual tokens the LM keeps past its pruning layer (= T unless pruned inside the LM)."""
        if self.lm_context is not None:
            return self.lm_context.budget
        return self.tokens.shape[0]


class LlavaMetaForCausalLM:
    """Mixin for the multimodal model: needs `self.model` with vision_tower, mm_projector,
    image_newline, embed_tokens, and `self.mm_config`."""

    # ---- single-stage helpers ----------------------------------------------------------------
    def _vision(self, pixel_values: torch.Tensor, with_attention: bool):
        tower = self.model.vision_tower
        p = next(tower.parameters())
        return tower(pixel_values.to(device=p.device, dtype=p.dtype), return_attention=with_attention)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
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
        options: Optional[dict] = None,
        pool: Optional[bool] = None,
        timer: Optional[StageTimer] = None,
    ) -> VisualTokens:
        """Turn one (already validated, RGB) image into the visual tokens the LM will see."""
        method = get_method(prune_method) if isinstance(prune_method, str) else prune_method
        timer = timer or NullTimer()
        options = dict(options or {})
        if method.views == GLOBAL_FOVEA:
            return self._encode_global_fovea(image, method, question_ids, options, timer)
        if self.mm_config.image_aspect_ratio != "anyres":
            return self._encode_single_view(image, method, timer)
        return self._encode_anyres(image, method, question_ids, options, pool, timer)

    def _encode_single_view(self, image, method, timer) -> VisualTokens:
        """`square`/`pad` aspect (stage-1, low-res): one 384² view, 729 tokens, no pooling or merge."""
        if method.select is not None or method.views != ANYRES:
            raise InputError(f"--prune_method {method.name} needs image_aspect_ratio 'anyres'")
        with timer("preprocess"):
            if self.mm_config.image_aspect_ratio == "pad":
                side = max(image.size)
                canvas = Image.new("RGB", (side, side), (127, 127, 127))  # SigLIP mean 0.5
                canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = canvas
            pixels = image_to_tensor(image, self.model.vision_tower.image_size).unsqueeze(0)
        with timer("vision"):
            feats = self._vision(pixels, False).features
        with timer("projector"):
            tokens = self._project(feats)[0]
        side = self.model.vision_tower.num_patches_per_side
        return VisualTokens(tokens, method.name, tokens.shape[0], [(side, side)], info={"pooling": "off (single view)"})

    def _encode_anyres(self, image, method, question_ids, options, pool, timer) -> VisualTokens:
        cfg = self.mm_config
        if method.select is None:  # LaViDa's own path: pool or not, merge with newlines
            if method.pool is not None:
                if pool is not None and pool != method.pool:
                    raise InputError(
                        f"--prune_method {method.name} means pooling {'on' if method.pool else 'off'}; "
                        f"drop --{'no-' if not pool else ''}pool or use --prune_method lavida"
                    )
                do_pool, reason = method.pool, f"pooling {'on' if method.pool else 'off'} (--prune_method {method.name})"
                if os.environ.get(POOL_ENV):
                    reason += f"; {POOL_ENV} is set but the method decides"
            else:
                do_pool, reason = resolve_pooling(pool, cfg.mm_2d_pool)
        else:
            do_pool, reason = False, f"pooling off (--prune_method {method.name} selects from unpooled tokens)"
        logger.info(reason)

        with timer("preprocess"):
            pixels = process_anyres_image(image, cfg.image_grid_pinpoints, self.model.vision_tower.image_size)
            grid = get_anyres_image_grid_shape(image.size, cfg.image_grid_pinpoints, self.model.vision_tower.image_size)
        want_attn = method.needs_attention or method.needs_keys
        with timer("vision"):
            vis = self._vision(pixels, want_attn)
        with timer("projector"):
            proj = self._project(vis.features)

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

            ctx = PruneContext(
                features=flat_proj,
                vision_features=arrange(vis.features),
                view_shapes=shapes,
                budget=_pop_budget(options, flat_proj.shape[0]),
                attn_received=None if vis.attn_received is None else arrange(vis.attn_received.unsqueeze(-1))[:, 0],
                keys=arrange(vis.keys),
                question_embedding=self.question_embedding(question_ids),
                seed=int(options.pop("seed", 0)),
                options=options,
            )
            if method.lm_layer is not None:
                # TopV: all candidates enter the prompt; the LM prunes them once during prefill.
                return VisualTokens(flat_proj, method.name, flat_proj.shape[0], shapes, lm_context=ctx,
                                    lm_layer=method.lm_layer, info={"pooling": reason, "grid": grid})
            sel = run_select(method.select, ctx)
            tokens = sel.tokens if sel.tokens is not None else flat_proj[sel.indices]
        return VisualTokens(tokens, method.name, flat_proj.shape[0], shapes, kept=sel.indices,
                            info={"pooling": reason, "grid": grid, **plain_values(ctx.options)})

    def _encode_global_fovea(self, image, method, question_ids, options, timer) -> VisualTokens:
        """SHIRG: global 384² view -> 256 tokens, 448² fovea -> 1024 scored tokens -> keep K."""
        from shirg_patches import foveal, shirg

        keep_ratio = options.pop("keep_ratio", shirg.DEFAULT_KEEP_RATIO)
        fovea_mode = options.pop("fovea", "center")
        foveal.check_fovea_mode(fovea_mode)  # before any encoding, not after the global view
        k = shirg.keep_count(keep_ratio, shirg.FOVEA_TOKENS)
        logger.info("pooling off (--prune_method %s encodes its own global + foveal views)", method.name)
        tower = self.model.vision_tower
        with timer("preprocess"):
            global_pixels = foveal.to_pixel_values(image, tower.image_size)
        with timer("vision"):
            g = self._vision(global_pixels, fovea_mode == "saliency")
        with timer("preprocess"):
            saliency = None
            if fovea_mode == "saliency":
                side = tower.num_patches_per_side
                saliency = g.attn_received[0].float().view(side, side).cpu()
            box = foveal.fovea_box(image.size, fovea_mode, saliency, FOVEA_SIZE)
            fovea_pixels = foveal.to_pixel_values(foveal.fovea_view(image, box, FOVEA_SIZE), FOVEA_SIZE)
        with timer("vision"):
            f = self._vision(fovea_pixels, True)
        with timer("projector"):
            g_proj = self._project(g.features)[0]
            f_proj = self._project(f.features)[0]
        with timer("selection"):
            side = math.isqrt(f_proj.shape[0])
            ctx = PruneContext(
                features=f_proj,
                vision_features=f.features[0],
                view_shapes=[(side, side)],
                budget=k,
                attn_received=f.attn_received[0],
                keys=f.keys[0] if f.keys is not None else None,
                question_embedding=self.question_embedding(question_ids),
                seed=int(options.pop("seed", 0)),
                options=options,
            )
            kept = run_select(method.select, ctx).indices
            global_tokens = shirg.resize_global_tokens(g_proj)
            tokens = shirg.assemble_tokens(global_tokens, f_proj, kept)
        info = {"fovea_box": box, "fovea": fovea_mode, "keep_ratio": keep_ratio, "global_tokens": global_tokens.shape[0],
                "pooling": "pooling off (SHIRG views)", "scores": ctx.options.get("shirg_scores"),
                **plain_values(ctx.options)}
        return VisualTokens(tokens, method.name, global_tokens.shape[0] + ctx.num_tokens,
                            [(16, 16), (side, side)], kept=kept, info=info)

    # ---- prompt assembly -----------------------------------------------------------------------
    def prepare_inputs_embeds(
        self, input_ids: Sequence[int] | torch.Tensor, visual: Sequence[VisualTokens]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Splice each image's tokens at its -200 placeholder; returns ([1, P, D], image spans)."""
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
            logger.warning("prompt of %d tokens truncated to tokenizer_model_max_length=%d", embeds.shape[1], limit)
            embeds = embeds[:, :limit]
            spans = [(s, min(e, limit)) for s, e in spans if s < limit]
        return embeds, spans


def _pop_budget(options: dict, candidates: int) -> int:
    budget = options.pop("budget", None)
    budget = DEFAULT_BUDGET if budget is None else int(budget)
    if not 1 <= budget <= candidates:
        raise InputError(f"--budget {budget} must be between 1 and the {candidates} candidate tokens")
    return budget


def plain_values(notes: dict) -> dict:
    """The entries worth showing to a user: plain values, not tensors or private keys."""
    return {k: v for k, v in notes.items() if isinstance(v, (str, int, float)) and not k.startswith("_")}


def make_lm_prune_hook(visual: Sequence[VisualTokens], spans: Sequence[tuple[int, int]]):
    """A prefill callback for methods that prune inside the LM (TopV), or None.

    At the method's layer it scores the image's candidate tokens from that layer's input and
    output hidden states and returns the sequence positions to keep: all text, plus the kept
    visual tokens. It fires once, during prefill, so the cache it shapes is static.
    """
    plans = [(v, span) for v, span in zip(visual, spans) if v.lm_context is not None]
    if not plans:
        return None
    if len(plans) > 1:
        raise InputError("in-LM pruning supports one image per prompt")
    v, (start, end) = plans[0]
    if end - start != v.tokens.shape[0]:
        raise InputError("the image's tokens were truncated by tokenizer_model_max_length; in-LM pruning needs all")
    fired = []

    def hook(layer_idx, hidden_in, hidden_out, positions):
        if layer_idx != v.lm_layer or fired:
            return None
        ctx = v.lm_context
        ctx.options["layer_inputs"] = hidden_in[0, start:end].float()
        ctx.options["layer_outputs"] = hidden_out[0, start:end].float()
        kept = run_select(get_method(v.method).select, ctx).indices
        v.kept = kept
        fired.append(True)
        seq = hidden_out.shape[1]
        dev = kept.device
        return torch.cat([torch.arange(0, start, device=dev), start + kept, torch.arange(end, seq, device=dev)])

    return hook
