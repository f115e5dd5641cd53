"""The lmms-eval model class against stub request objects (lmms-eval itself is not installed in this venv):
each request has `.args` = (context, gen_kwargs, doc_to_visual, doc_id, task, split) and the model reads docs
from `task_dict[task][split][doc_id]`, as lmms-eval's evaluator sets them up."""
from dataclasses import dataclass

import pytest

from llava.conversation import build_prompt
from llava.errors import InputError
from llava.eval.datasets import SHORT_ANSWER_SUFFIX
from llava.eval.evaluate import decode_answer
from llava.eval.lmms_model import MODEL_NAME, ShirgLavida
from llava.mm_utils import load_image, tokenizer_image_token


@dataclass
class StubInstance:
    arguments: tuple

    @property
    def args(self):
        return self.arguments


def doc_to_visual(doc):
    return [load_image(doc["image"])]


@pytest.fixture(scope="module")
def lmms_model(sharp_checkpoint):
    model = ShirgLavida(pretrained=str(sharp_checkpoint), prune_method="shirg", keep_ratio="0.5", batch_size=2)
    return model


def reference_answer(model, doc, context, gen_length):
    ids = tokenizer_image_token(build_prompt(context), model.tokenizer)
    qids = model.tokenizer(context, add_special_tokens=False).input_ids
    out = model.model.generate(ids, [load_image(doc["image"])], prune_method="shirg", question_ids=qids,
                               prune_options={"keep_ratio": 0.5, "seed": 0}, gen_length=gen_length,
                               block_length=gen_length, steps=gen_length, prefix_cache=True, temperature=0.0)
    return decode_answer(model.tokenizer, out.tokens[0])


def test_generate_until_matches_single_answers_in_request_order(lmms_model, data_root):
    docs = [{"image": str(data_root / p), "q": q} for p, q in [
        ("chartqa/png/chart_a.png", "What is the value of the tallest bar?"),
        ("docvqa/documents/doc_1.png", "What is the date on the form?"),
        ("vqav2/val2014/COCO_val2014_000000000042.jpg", "Is there a dog?"),
    ]]
    lmms_model.task_dict = {"fix": {"test": docs}}
    short, long = {"max_new_tokens": 4, "temperature": 0}, {"max_new_tokens": 8, "until": ["\n\n"]}
    kwargs = [short, long, short]  # two gen_kwargs groups, interleaved: answers must come back in request order
    requests = [StubInstance((f"<image>\n{d['q']}", kw, doc_to_visual, i, "fix", "test"))
                for i, (d, kw) in enumerate(zip(docs, kwargs))]
    got = lmms_model.generate_until(requests)
    want = [reference_answer(lmms_model, d, d["q"], kw["max_new_tokens"]) for d, kw in zip(docs, kwargs)]
    assert got == want and len(set(want)) > 1


def test_until_cuts_the_answer(lmms_model, data_root):
    doc = {"image": str(data_root / "chartqa/png/chart_b.png"), "q": "In which year was the value highest?"}
    lmms_model.task_dict = {"fix": {"test": [doc]}}
    full = reference_answer(lmms_model, doc, doc["q"], 8)
    assert len(full) >= 3
    stop = full[1:3]
    got = lmms_model.generate_until([StubInstance((doc["q"], {"max_new_tokens": 8, "until": stop}, doc_to_visual,
                                                   0, "fix", "test"))])
    assert got == [full.split(stop, 1)[0].strip()]


def test_shirg_scores_the_bare_question_as_the_harness_does(lmms_model, data_root, monkeypatch):
    """lmms-eval's context carries the task's answer instruction; SHIRG's relevance must see the doc's question
    (what `llava.eval.evaluate` passes), or the two runners keep different fovea tokens on the same item."""
    question = "What is the value of the tallest bar?"
    context = f"<image>\n{question}{SHORT_ANSWER_SUFFIX}"
    docs = [{"image": str(data_root / "chartqa/png/chart_a.png"), "question": question},
            {"image": str(data_root / "chartqa/png/chart_a.png")}]  # no question field: the context is scored
    lmms_model.task_dict = {"fix": {"test": docs}}
    seen = []
    generate_batch = lmms_model.model.generate_batch

    def spy(ids, images, **kwargs):
        seen.extend(kwargs["question_ids"])
        return generate_batch(ids, images, **kwargs)

    monkeypatch.setattr(lmms_model.model, "generate_batch", spy)
    requests = [StubInstance((context, {"max_new_tokens": 4}, doc_to_visual, i, "fix", "test")) for i in (0, 1)]
    lmms_model.generate_until(requests)
    tok = lmms_model.tokenizer
    assert seen == [tok(question, add_special_tokens=False).input_ids,
                    tok(question + SHORT_ANSWER_SUFFIX, add_special_tokens=False).input_ids]
    assert seen[0] != seen[1]


def test_settings_and_unsupported_requests(lmms_model, sharp_checkpoint):
    assert lmms_model.generation_settings({"max_new_tokens": 16}) == dict(
        gen_length=16, block_length=16, steps=16, prefix_cache=True, temperature=0.0)
    with pytest.raises(InputError, match="does not apply to --prune_method pool"):
        ShirgLavida(pretrained=str(sharp_checkpoint), prune_method="pool", keep_ratio="0.5")
    with pytest.raises(InputError, match="unknown --prune_method"):
        ShirgLavida(pretrained=str(sharp_checkpoint), prune_method="nope")
    with pytest.raises(NotImplementedError, match=MODEL_NAME):
        lmms_model.loglikelihood([])
