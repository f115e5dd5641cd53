"""Training data for LaViDa-LLaDA: LLaVA-format records -> (input_ids, labels, image, question ids).

Inputs
  * a `.json` file (a list of records) or `.jsonl` file (one record per line), images relative to `image_folder`;
  * a `.yaml` data list: `datasets: [{json_path, image_root?, sampling_strategy?}, ...]`, where `image_root`
    replaces `image_folder` for that file and `sampling_strategy` is `all`, `first:N`, `end:N` or `random:N`
    (N may be `K%` of the file). A relative `json_path` is tried from the working directory, then from the
    yaml's folder.

A record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`.

Preprocessing follows LaViDa's `llada` recipe (stage 2/3 of its training):
  * ONE human turn is picked uniformly among the human turns followed by a gpt turn; that turn and its answer are
    the whole sample (earlier and later history is dropped), so long conversations do not dominate the batch;
  * `<image>` is moved to the front of that human turn followed by a newline (prepended if the turn lacked it);
  * sequence = [BOS + system block] + [user block] + [assistant header] + [answer + `<|eot_id|>`]; only the answer
    tokens and its `<|eot_id|>` are targets, everything before is IGNORE_INDEX;
  * `<image>` becomes IMAGE_TOKEN_INDEX and the newline after it is KEPT. Inference (`tokenizer_image_token`)
    drops that newline because of an upstream quirk; LaViDa trained with it, so training keeps it by default —
    the train/inference mismatch is part of the published checkpoints and we reproduce both sides.
    `inference_prompt=True` (the trainer's `--inference_prompt`) tokenises the prompt with the inference rule
    instead, so training sees the exact ids `llava.eval.run` feeds. An 8B model shrugs off the one-token shift; a
    64-wide model trained from scratch learns its answer slot at an exact offset and does not: on a flat-colour
    probe it answered 100 % in the training layout and 30 % in the inference one.

Randomness (the picked turn, `random:N` sampling, extra EOS padding) is a pure function of (seed, epoch, index),
so a run is reproducible whatever the number of DataLoader workers. Upstream draws from Python's global RNG.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.errors import ImageError, LavidaError
from llava.mm_utils import load_image, tokenizer_image_token
from llava.utils import logger

ROLES = {"human": "user", "gpt": "assistant"}


class DataError(LavidaError):
    """A data file or record is unusable (missing file, malformed record, empty data set, missing image)."""


# ----------------------------------------------------------------------------------------------------------------
# reading records


@dataclass
class Record:
    """One validated conversation and where its image lives (None for text-only records)."""

    conversations: list[dict]
    image: Optional[Path]
    source: str  # "file.json record 12", for error messages
    id: str = ""


def _read_json_records(path: Path) -> list:
    """The raw records of a .json list or a .jsonl file, with line-precise errors for JSONL."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _check_record(raw, where: str, image_root: Optional[Path]) -> Record:
    """Validate one raw record; errors name the record and the field so bad data is found in seconds."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be an object, got {type(raw).__name__}")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field 'conversations[{j}]' must be an object")
        if turn.get("from") not in ROLES:
            got = turn.get("from")
            raise DataError(f"{where}: field 'conversations[{j}].from' must be 'human' or 'gpt', got {got!r}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: field 'conversations[{j}].value' must be a string")
    if not answerable_turns(convs):
        raise DataError(f"{where}: field 'conversations' has no human turn followed by a gpt turn")
    image = raw.get("image")
    if isinstance(image, list):  # upstream allows a list; one image per sample is all this trainer feeds
        if len(image) != 1:
            raise DataError(f"{where}: field 'image' lists {len(image)} images; only one image per record is supported")
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: field 'image' must be a non-empty string (a path)")
    path = None if image is None else (image_root / image if image_root is not None else Path(image))
    return Record(convs, path, where, str(raw.get("id", "")))


def answerable_turns(convs: Sequence[dict]) -> list[int]:
    """Indices of human turns directly followed by a gpt turn: the candidates for the one sampled turn."""
    return [i for i in range(len(convs) - 1) if convs[i]["from"] == "human" and convs[i + 1]["from"] == "gpt"]


def apply_sampling(n: int, strategy: str, seed: int, where: str) -> list[int]:
    """Indices kept by a yaml `sampling_strategy`; `random:N` is a seeded permutation prefix (reproducible)."""
    strategy = (strategy or "all").strip()
    if strategy == "all":
        return list(range(n))
    kind, _, amount = strategy.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise DataError(
            f"{where}: sampling_strategy {strategy!r} must be all, first:N, end:N or random:N (N may be K%)"
        )
    try:
        count = int(n * float(amount[:-1]) / 100) if amount.endswith("%") else int(amount)  # K% rounds down
    except ValueError:
        raise DataError(f"{where}: sampling_strategy {strategy!r}: {amount!r} is not a number or percentage") from None
    if count < 0:
        raise DataError(f"{where}: sampling_strategy {strategy!r} asks for a negative count")
    count = min(count, n)
    if kind == "first":
        return list(range(count))
    if kind == "end":
        return list(range(n - count, n))
    return np.random.default_rng(seed).permutation(n)[:count].tolist()


def read_records(data_path: str | Path, image_folder: Optional[str | Path] = None, seed: int = 0) -> list[Record]:
    """All validated records of a .json / .jsonl file or a .yaml data list, in order."""
    path = Path(data_path)
    folder = Path(image_folder) if image_folder else None
    if path.suffix in (".yaml", ".yml"):
        return _read_yaml(path, folder, seed)
    raw = _read_json_records(path)
    return [_check_record(r, f"{path.name} record {i}", folder) for i, r in enumerate(raw)]


def _read_yaml(path: Path, image_folder: Optional[Path], seed: int) -> list[Record]:
    import yaml  # pyyaml comes with transformers

    if not path.is_file():
        raise DataError(f"data list {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a top-level 'datasets:' list")
    records = []
    for k, entry in enumerate(entries):
        where = f"{path.name} datasets[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise DataError(f"{where}: field 'json_path' is missing")
        json_path = Path(entry["json_path"])
        if not json_path.is_absolute() and not json_path.exists():
            json_path = path.parent / json_path
        root = Path(entry["image_root"]) if entry.get("image_root") else image_folder
        raw = _read_json_records(json_path)
        # per-dataset seed: adding or reordering other datasets does not change this one's sample
        keep = apply_sampling(len(raw), entry.get("sampling_strategy", "all"), seed * 1000003 + k, where)
        records += [_check_record(raw[i], f"{json_path.name} record {i}", root) for i in keep]
        logger.info("%s: %d of %d records (%s)", json_path, len(keep), len(raw), entry.get("sampling_strategy", "all"))
    return records


# ----------------------------------------------------------------------------------------------------------------
# llada preprocessing


def tokenize_with_image(text: str, tokenizer) -> list[int]:
    """Token ids of `text` with each `<image>` replaced by IMAGE_TOKEN_INDEX, every chunk kept whole.

    This is the TRAINING rule (upstream registers `<image>` as a special token, so the text around it is tokenised
    as separate pieces and nothing is dropped): the newline after `<image>` stays. No special tokens are added
    (the template text already holds BOS).
    """
    ids: list[int] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    return ids


def image_first(text: str) -> str:
    """`<image>` moved to the front of a human turn, followed by a newline (LLaVA convention)."""
    return f"{DEFAULT_IMAGE_TOKEN}\n{text.replace(DEFAULT_IMAGE_TOKEN, '').strip()}"


def preprocess_llada(
    conversations: Sequence[dict], tokenizer, has_image: bool, rng: np.random.Generator, conv_template: str = "llada",
    inference_prompt: bool = False,
) -> dict:
    """One sampled (human, gpt) pair -> input_ids, labels (answer + eot are targets) and the question's ids.

    The prompt is the same chat-template rendering inference uses (system + one user turn + open assistant
    header); the answer is tokenised separately with `<|eot_id|>` appended. The two pieces meet at the header's
    trailing newlines, which no tokenizer merges with the first answer token, so this equals tokenising the whole
    text and masking the prompt — without hard-coding the header length (upstream assumes LLaDA's 6 tokens).
    """
    turn = int(rng.choice(answerable_turns(conversations)))
    question = conversations[turn]["value"]
    answer = conversations[turn + 1]["value"]
    if has_image:
        question = image_first(question)
    else:  # a stray `<image>` in a text-only record would be a placeholder with no image behind it
        question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    conv = conv_templates[conv_template].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    tokenize = tokenizer_image_token if inference_prompt else tokenize_with_image
    prompt_ids = tokenize(prompt, tokenizer)
    answer_ids = tokenizer(answer.strip() + conv.stop_str, add_special_tokens=False).input_ids
    text_question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return {
        "input_ids": torch.tensor(prompt_ids + answer_ids, dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long),
        # what SHIRG scores visual tokens against; same rule as inference (question text without `<image>`)
        "question_ids": tokenizer(text_question, add_special_tokens=False).input_ids if text_question else [],
    }


# ----------------------------------------------------------------------------------------------------------------
# dataset and collator


class LazySupervisedDataset(Dataset):
    """LLaVA-format records, tokenised and with their image decoded on access.

    Records are validated when the dataset is built (a malformed record is a DataError naming it and its field),
    and image files are checked for existence: missing ones are counted, logged and their records dropped, or
    fatal with `strict=True`. An image that exists but cannot be decoded makes `__getitem__` return None (the
    collator drops it) unless `strict`. Text-only records give `image=None` and no placeholder.
    """

    def __init__(
        self,
        data_path: str | Path,
        tokenizer,
        image_folder: Optional[str | Path] = None,
        model_max_length: int = 4096,
        strict: bool = False,
        seed: int = 0,
        conv_template: str = "llada",
        inference_prompt: bool = False,
    ):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.strict = strict
        self.seed = seed
        self.epoch = 0
        self.conv_template = conv_template
        self.inference_prompt = inference_prompt
        records = read_records(data_path, image_folder, seed)
        if not records:
            raise DataError(f"{data_path}: the data set is empty (no records after sampling)")
        missing = [r for r in records if r.image is not None and not r.image.is_file()]
        self.missing_images = len(missing)
        if missing:
            shown = "; ".join(f"{r.source}: {r.image}" for r in missing[:3])
            if strict:
                raise DataError(f"{len(missing)} image file(s) not found (--strict_data), e.g. {shown}")
            logger.warning("skipping %d of %d records whose image file is missing, e.g. %s",
                           len(missing), len(records), shown)
            missing_ids = {id(r) for r in missing}
            records = [r for r in records if id(r) not in missing_ids]
        if not records:
            raise DataError(f"{data_path}: no usable records (all {self.missing_images} images are missing)")
        self.records = records
        self.unreadable_images = 0  # counted per process (each DataLoader worker has its own copy)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the sampled turns for a new epoch (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough text length per record, negative for text-only ones (for length/modality-grouped samplers)."""
        lengths = []
        for r in self.records:
            words = sum(len(t["value"].split()) for t in r.conversations)
            lengths.append(words if r.image is not None else -words)
        return lengths

    def __getitem__(self, index: int) -> Optional[dict]:
        record = self.records[index]
        image = None
        if record.image is not None:
            try:
                image = load_image(record.image)
            except ImageError as e:
                if self.strict:
                    raise DataError(f"{record.source}: {e}") from None
                self.unreadable_images += 1
                logger.warning("skipping %s: %s", record.source, e)
                return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = preprocess_llada(record.conversations, self.tokenizer, image is not None, rng, self.conv_template,
                                self.inference_prompt)
        item["input_ids"] = item["input_ids"][: self.model_max_length]
        item["labels"] = item["labels"][: self.model_max_length]
        item.update(image=image, index=index, epoch=self.epoch, id=record.id)
        return item


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of dataset items into a batch, LLaDA style.

    * `input_ids` are right-padded with the pad id (= EOS for LLaDA) and every position holding that id becomes a
      TARGET labelled with it: LLaDA learns to fill unused answer slots with EOS, which is how generation ends.
      (Upstream turns pad ids into targets inside the model's forward; doing it here is the same.)
    * With e drawn uniformly from [-128, 128), e > 0 extra pad tokens are appended to the longest sample (so
      to the whole batch), to vary the answer length the model sees; e is a pure function of (seed, epoch,
      sample indices), so batches are reproducible.
    * Items that are None (unreadable image) are dropped; a batch with nothing left is None — skip it.

    Returns `input_ids [B,T]`, `labels [B,T]`, `images` (one PIL image or None per sample), `question_ids`
    (list of id lists) and `extra_padding` (the e used, for logging).
    """

    pad_token_id: int
    model_max_length: int = 4096
    seed: int = 0
    extra_pad_range: tuple[int, int] = field(default=(-128, 128))

    def __call__(self, items: Sequence[Optional[dict]]) -> Optional[dict]:
        items = [it for it in items if it is not None]
        if not items:
            return None
        ids = [it["input_ids"][: self.model_max_length] for it in items]
        labels = [it["labels"][: self.model_max_length] for it in items]
        key = [self.seed, int(items[0].get("epoch", 0)), *(int(it.get("index", 0)) for it in items)]
        low, high = self.extra_pad_range
        extra = max(int(np.random.default_rng(key).integers(low, high)), 0) if high > low else 0
        length = max(len(x) for x in ids) + extra
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            input_ids[i, : len(x)] = x
            out_labels[i, : len(y)] = y
        out_labels[input_ids == self.pad_token_id] = self.pad_token_id
        return {
            "input_ids": input_ids,
            "labels": out_labels,
            "images": [it["image"] for it in items],
            "question_ids": [list(it["question_ids"]) for it in items],
            "extra_padding": extra,
        }
