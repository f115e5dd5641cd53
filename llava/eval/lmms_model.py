"""lmms-eval entry: LaViDa-LLaDA with any registered prune method, as lmms-eval model `shirg_lavida`.

    lmms-eval --model shirg_lavida --model_args pretrained=/ckpt/lavida-llada-hd,prune_method=shirg \\
        --tasks chartqa,docvqa_val,vqav2_val_lite --batch_size 1

`--model_args` (lmms-eval's `key=value,...`): `pretrained` (a local LaViDa folder or `builtin:lavida-small`),
`model_base` (then `pretrained` is a LoRA adapter folder, loaded as `load_pretrained_model(pretrained,
model_base)`), `prune_method` (default shirg), any option of that method (`keep_ratio=0.8`, `fovea=saliency`,
`budget=300`, ...; another method's option is an error), `block_length`, `steps` (default: one token per step),
`prefix_cache` (default True), `seed`, `device`, `batch_size`. Generation is greedy (LaViDa's wrapper forces
temperature 0); the answer length is the task's `max_new_tokens` (16 for ChartQA / VQAv2, 32 for DocVQA in
lmms-eval's task files, LaViDa's settings), block length min(128, that); the decoded answer is cut at the first
`until` string. The prompt is the `llada` template around `<image>\\n` + the task's context (question and
post-prompt), as `llava.eval.evaluate` builds it. SHIRG's text relevance scores the doc's bare `question` field
when it has one (lmms-eval's ChartQA, DocVQA and VQAv2 docs and this project's EntityGrid task do), as the
harness does, and the whole context otherwise (`relevance_text`).

Registration: setup.py declares the entry point `lmms_eval.models: shirg_lavida = llava.eval.lmms_model:manifest`
(lmms-eval >= 0.7 reads that group), and importing this module with lmms-eval installed also registers the class
through `lmms_eval.api.registry.register_model`. Without lmms-eval the module still imports (the class then
derives from `object`), so the request handling is unit-tested against stub requests: objects with `.args` =
(context, gen_kwargs, doc_to_visual, doc_id, task, split), and `task_dict[task][split][doc_id]` the doc.
`loglikelihood` is not supported (a masked-diffusion LM has no left-to-right likelihood; LaViDa's own
wrapper does not provide one either) and raises NotImplementedError.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from llava.errors import InputError

MODEL_NAME = "shirg_lavida"

try:  # lmms-eval is optional: install it in its own environment (see README, Evaluation)
    from lmms_eval.api.model import lmms as _Base
    from lmms_eval.api.registry import register_model as _register

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object
    HAVE_LMMS_EVAL = False

    def _register(*names):
        return lambda cls: cls


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InputError(f"{MODEL_NAME}: expected a boolean, got {value!r}")


@_register(MODEL_NAME)
class ShirgLavida(_Base):
    """lmms-eval model: `generate_until` over LaViDa-LLaDA's batched greedy sampler (see the module doc)."""

    def __init__(self, pretrained: str = "builtin:lavida-small", model_base: Optional[str] = None,
                 prune_method: str = "shirg", block_length: Optional[int] = None, steps: Optional[int] = None,
                 prefix_cache: Any = True, seed: int = 0, device: Optional[str] = None, batch_size: Any = 1,
                 **options):
        import torch

        from llava.model.builder import load_pretrained_model
        from shirg_patches import get_method

        if _Base is not object:
            super().__init__()
        self.task_dict = getattr(self, "task_dict", {})
        self._rank = int(os.environ.get("RANK", "0") or 0)
        self._world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        method = get_method(prune_method)
        # lmms-eval passes a few generic settings every model may ignore
        for generic in ("max_batch_size", "trust_remote_code"):
            options.pop(generic, None)
        raw = {k: str(v) for k, v in options.items()}
        method.make_options(raw)  # an option of another method: an error naming the method
        specs = {s.name: s for s in method.options.specs()}
        self.prune_options = {k: v if specs[k].type is str else specs[k].parse(v) for k, v in raw.items()}
        self.prune_method = method.name
        self.block_length = int(block_length) if block_length else None
        self.steps = int(steps) if steps else None
        self.prefix_cache = _as_bool(prefix_cache)
        self.seed = int(seed)
        self.batch_size_per_gpu = max(1, int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 1)
        if device is None or str(device) in ("", "None"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if model_base:
            self.tokenizer, self.model, _, _ = load_pretrained_model(pretrained, model_base, device=self._device)
        else:
            self.tokenizer, self.model, _, _ = load_pretrained_model(pretrained, device=self._device)
        self.model.eval()

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- lmms-eval API -------------------------------------------------------------------------
    def loglikelihood(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: loglikelihood is not defined for a masked-diffusion LM; "
                                  "use generation tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation is not supported")

    def generation_settings(self, gen_kwargs: dict) -> dict:
        """A task's gen_kwargs -> the sampler's settings (greedy; gen length = max_new_tokens)."""
        from llava.model.language_model.llada.generate import steps_per_block

        gen = int(gen_kwargs.get("max_new_tokens") or 32)
        block = self.block_length or min(128, gen)
        if gen % block:
            gen = -(-gen // block) * block  # whole blocks: a few more slots, the answer is cut at `until` anyway
        steps = self.steps or gen
        steps_per_block(gen, block, steps)
        return dict(gen_length=gen, block_length=block, steps=steps, prefix_cache=self.prefix_cache, temperature=0.0)

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in request order; requests with equal gen_kwargs are sampled in batches."""
        from tqdm import tqdm

        from llava.eval.evaluate import decode_answer
        from llava.mm_utils import inference_ids, load_image

        answers: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items(), key=str)), []).append(i)
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc=MODEL_NAME)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = self.generation_settings(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                ids, images, qids = [], [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    doc = self.task_dict[task][split][doc_id]
                    visuals = [load_image(v) for v in (doc_to_visual(doc) or [])]
                    if len(visuals) > 1:
                        raise InputError(f"{MODEL_NAME}: {task} doc {doc_id} has {len(visuals)} images; "
                                         "LaViDa's prompt takes one")
                    text = context.replace("<image>", "").strip()
                    prompt_ids, question_ids = inference_ids(self.tokenizer, relevance_text(doc, text), text,
                                                             with_image=bool(visuals))
                    ids.append(prompt_ids)
                    images.append(visuals)
                    qids.append(question_ids)
                outs = self.model.generate_batch(ids, images, prune_method=self.prune_method, question_ids=qids,
                                                 prune_options={**self.prune_options, "seed": self.seed}, **settings)
                for i, out in zip(chunk, outs):
                    text = decode_answer(self.tokenizer, out.tokens[0])
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop, 1)[0]
                    answers[i] = text.strip()
                progress.update(len(chunk))
        progress.close()
        return answers


def relevance_text(doc: Any, context: str) -> str:
    """The text SHIRG scores its tokens against: the doc's bare `question` when it has one, else the context.
    lmms-eval's context is the question with the task's answer-format instruction appended ("Answer the question
    using a single word or phrase."); the harness scores the bare question, and scoring the instruction's words
    too changes which fovea tokens are kept, so the two runners would select differently on the same item."""
    question = doc.get("question") if isinstance(doc, dict) else None
    return question if isinstance(question, str) and question.strip() else context  # as given, as the harness passes it


def manifest():
    """The lmms-eval model manifest (entry-point group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.ShirgLavida")
