"""Modern everyday English, generated offline by the packaged SmolLM2-135M-Instruct from committed prompts.

The bundled corpora are a 17th-century Bible translation, Shakespeare and a 1911 encyclopaedia; a masked-LM
head fitted on them alone answers everyday sentences from the Bible. This module writes the ``smollm``
corpus: one sampled answer per prompt of ``embviz/data/generation_prompts.txt`` (a fixed, varied list of
everyday requests written for embviz), with a seed per batch, so a run is a deterministic function of the
prompts, the model and :class:`GenerationConfig` on one machine (sampling on another CPU or a GPU may pick
other tokens where two are within rounding of each other).

The generation runs once: answers are appended to a JSONL file in the cache batch by batch, so an
interrupted run resumes where it stopped, then written as the corpus text file with its provenance in a
``#`` header. The text embviz ships (``embviz/data/smollm_everyday.txt``) was made with
``embviz generate-text`` and is what the ``smollm`` corpus reads; CI does not regenerate it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from embviz.artifacts import versions
from embviz.backbones import Backbone
from embviz.cache import atomic_write_bytes, cache_dir, config_key, locked, sha256_file
from embviz.corpora import PROMPTS_FILE, package_data
from embviz.errors import BadInputError
from embviz.progress import Progress, ProgressCallback, quiet

DEFAULT_MODEL = "smollm2"
SYSTEM_PROMPT = "You are a helpful assistant who writes clear, natural, everyday English."


@dataclass(frozen=True)
class GenerationConfig:
    """Everything the generated text depends on (besides the prompts and the model's weights)."""

    model: str = DEFAULT_MODEL
    seed: int = 0
    max_new_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    batch_size: int = 16

    def key(self, prompts: list[str]) -> str:
        return config_key({**asdict(self), "prompts": prompts})


@dataclass(frozen=True)
class GenerationResult:
    """Where the corpus text was written, what it holds and what it took."""

    path: Path
    prompts: int
    words: int
    seconds: float
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def read_prompts(path: Path | None = None) -> list[str]:
    """The prompts, one per line (``#`` lines are the file's header)."""
    path = path or package_data(PROMPTS_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BadInputError(f"cannot read the prompts file {path} ({exc.__class__.__name__})") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise BadInputError(f"{path} holds no prompts")
    return prompts


def _answers_file(config: GenerationConfig, prompts: list[str]) -> Path:
    return cache_dir("generated") / f"{config.model}-{config.key(prompts)}.jsonl"


def _done(path: Path) -> list[dict[str, Any]]:
    """The answers saved so far; a torn last line (a killed run) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def _clean_answer(text: str) -> str:
    paragraphs = [" ".join(block.split()) for block in text.replace("\r", "").split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _generate_batch(
    backbone: Backbone, prompts: list[str], config: GenerationConfig, seed: int, device: str
) -> list[str]:
    tokenizer = backbone.tokenizer
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]
    tokenizer.padding_side = "left"
    encoded = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = backbone.model.generate(
            **encoded,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = output[:, encoded["input_ids"].shape[1] :]
    return [_clean_answer(text) for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_text(
    *,
    load: Callable[[str], Backbone],
    config: GenerationConfig | None = None,
    prompts_file: Path | None = None,
    output: Path | None = None,
    progress: ProgressCallback | None = None,
    device: str = "cpu",
) -> GenerationResult:
    """Generate one answer per prompt (resuming a cached partial run) and write the corpus text file.

    ``output`` defaults to the cache (``$EMBVIZ_HOME/generated/``); pass the package's
    ``embviz/data/smollm_everyday.txt`` to refresh the shipped corpus.

    Raises:
        BadInputError: bad settings, an unreadable prompts file, or a model without a chat template.
    """
    config = config or GenerationConfig()
    if config.batch_size < 1 or config.max_new_tokens < 1 or not 0 < config.temperature <= 5:
        raise BadInputError("batch_size and max_new_tokens must be positive, temperature in (0, 5]")
    prompts = read_prompts(prompts_file)
    report = progress or quiet
    answers_path = _answers_file(config, prompts)
    started = time.perf_counter()
    with locked(answers_path):
        records = _done(answers_path)
        cached = len(records) == len(prompts)
        if not cached:  # a batch is sampled as a whole: redo a batch that was cut short
            records = records[: len(records) // config.batch_size * config.batch_size]
        if not cached:
            backbone = load(config.model)
            if backbone.kind != "causal" or not getattr(backbone.tokenizer, "chat_template", None):
                raise BadInputError(f"{config.model} is not a chat model; generate-text needs one")
            backbone.model.to(device)
            # Rewrite what survived (drops a torn line), then append batch by batch.
            atomic_write_bytes(answers_path, "".join(json.dumps(r) + "\n" for r in records).encode())
            with answers_path.open("a", encoding="utf-8") as handle:
                for start in range(len(records), len(prompts), config.batch_size):
                    batch = prompts[start : start + config.batch_size]
                    report(
                        Progress(start, len(prompts), f"generating answers {start + 1}-{start + len(batch)}")
                    )
                    texts = _generate_batch(backbone, batch, config, config.seed * 1_000_003 + start, device)
                    for offset, (prompt, text) in enumerate(zip(batch, texts, strict=True)):
                        record = {"index": start + offset, "prompt": prompt, "text": text}
                        records.append(record)
                        handle.write(json.dumps(record) + "\n")
                    handle.flush()
            report(Progress(len(prompts), len(prompts), "generated"))
    target = output or answers_path.with_suffix(".txt")
    header = {
        "what": "modern everyday English generated by embviz generate-text (the smollm corpus)",
        "model": config.model,
        "config": asdict(config),
        "config_key": config.key(prompts),
        "prompts_sha256": sha256_file(prompts_file or package_data(PROMPTS_FILE)),
        "prompts": len(prompts),
        "versions": versions(),
        "rebuild": "embviz generate-text --output embviz/data/smollm_everyday.txt",
    }
    body = "".join(f"## {r['index']}\n{r['text']}\n\n" for r in records)
    head = "".join(f"# {line}\n" for line in json.dumps(header, indent=1).splitlines())
    atomic_write_bytes(target, (head + "\n" + body).encode())
    return GenerationResult(
        target,
        len(records),
        sum(len(r["text"].split()) for r in records),
        round(time.perf_counter() - started, 1),
        cached,
    )


__all__ = ["DEFAULT_MODEL", "GenerationConfig", "GenerationResult", "generate_text", "read_prompts"]
