"""What the CLI compiles: a TARGET string → a model and its example inputs.

TARGET is one of
- `path/to/file.py:attr` — an nn.Module instance, or a zero-argument factory returning a module or
  `(module, args)` / `(module, args, kwargs)`;
- a local Hugging Face model directory (config.json + weights), loaded offline with the class named
  in `config.architectures`;
- `zoo:NAME` — one of anefx's small random-weight models (anefx.zoo).

Examples are `name:SHAPE[:DTYPE]`, e.g. `input_ids:1x128:int64` (dtype default float32), passed to the
model by keyword. Integer inputs are random in [0, vocab_size) (or [0, 100) without a vocabulary).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anefx.errors import AnefxError, InvalidExampleError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
DEFAULT_INT_HIGH = 100


class TargetError(AnefxError):
    """The TARGET of a CLI command cannot be loaded."""


@dataclass(frozen=True)
class ExampleSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(map(str, self.shape))}:{str(self.dtype).replace('torch.', '')}"


@dataclass
class Target:
    """A loaded model, its example inputs (when the target provides them) and where it came from."""

    model: torch.nn.Module
    name: str  # a short name for output files: the attribute, directory or zoo name
    description: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    default_examples: list[ExampleSpec] = field(default_factory=list)

    @property
    def vocab_size(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "vocab_size", None)


def parse_example(text: str) -> ExampleSpec:
    """'input_ids:1x128:int64' → ExampleSpec; the dtype defaults to float32."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isidentifier():
        raise InvalidExampleError(f"--example {text!r}: write NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64 "
                                  "or x:1x64x32 (float32 by default).")
    try:
        shape = tuple(int(d) for d in parts[1].lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InvalidExampleError(f"--example {text!r}: the shape {parts[1]!r} must be positive integers "
                                  "joined by 'x', e.g. 1x128.")
    dtype_name = parts[2] if len(parts) == 3 else "float32"
    if dtype_name not in DTYPES:
        raise InvalidExampleError(f"--example {text!r}: unknown dtype {dtype_name!r}; use one of "
                                  f"{', '.join(DTYPES)}.")
    return ExampleSpec(parts[0], shape, DTYPES[dtype_name])


def make_example(spec: ExampleSpec, vocab_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """A random tensor for the spec: normal floats, ints in [0, vocab_size or 100), random bools."""
    gen = torch.Generator().manual_seed(seed)
    if spec.dtype.is_floating_point:
        return torch.randn(spec.shape, generator=gen).to(spec.dtype)
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=gen).bool()
    return torch.randint(0, vocab_size or DEFAULT_INT_HIGH, spec.shape, generator=gen, dtype=spec.dtype)


def example_inputs(target: Target, specs: Sequence[ExampleSpec]) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for anefx.compile: the --example specs, else the target's own examples."""
    if not specs:
        if target.args or target.kwargs:
            return target.args, dict(target.kwargs)
        specs = target.default_examples
    if not specs:
        raise InvalidExampleError(f"{target.description} comes without example inputs: pass one "
                                  "--example NAME:SHAPE[:DTYPE] per model input, e.g. --example x:1x64x32.")
    check_names(target.model, specs)
    return (), {s.name: make_example(s, target.vocab_size, seed=i) for i, s in enumerate(specs)}


def check_names(model: torch.nn.Module, specs: Sequence[ExampleSpec]) -> None:
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for spec in specs:
        if spec.name not in params:
            raise InvalidExampleError(f"--example {spec}: {type(model).__name__}.forward has no argument "
                                      f"{spec.name!r}; its arguments: {', '.join(params)}.")


def load_target(text: str) -> Target:
    if text.startswith("zoo:"):
        return _load_zoo(text[4:])
    path_part, _, attr = text.rpartition(":")
    if path_part.endswith(".py") and attr:
        return load_file_target(Path(path_part), attr)
    path = Path(text)
    if path.is_dir():
        return load_hf_directory(path)
    if text.endswith(".py") or path.is_file():
        raise TargetError(f"TARGET {text!r}: name the module or factory in the file, e.g. {text}:model.")
    raise TargetError(f"TARGET {text!r} is neither file.py:attr, a model directory (config.json + weights) "
                      "nor zoo:NAME; check the path.")


def _load_zoo(name: str) -> Target:
    from anefx import zoo

    model, args, kwargs = zoo.build(name)
    return Target(model, name, f"zoo model {name!r}", args, kwargs)


def load_file_target(path: Path, attr: str) -> Target:
    if not path.is_file():
        raise TargetError(f"{path} does not exist; TARGET is path/to/file.py:attr.")
    module = _import_file(path)
    if not hasattr(module, attr):
        found = [k for k, v in vars(module).items()
                 if not k.startswith("_") and (isinstance(v, torch.nn.Module) or inspect.isfunction(v))]
        raise TargetError(f"{path} has no {attr!r}; modules and factories in it: "
                          f"{', '.join(found) or 'none'}.")
    obj = getattr(module, attr)
    description = f"{path}:{attr}"
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise TargetError(f"{description} is a {type(obj).__name__}; point at an nn.Module or a "
                              "zero-argument function returning one.")
        try:
            obj = obj()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's factory failed, even by sys.exit
            raise TargetError(f"calling {description}() failed: {_failure(exc)}. Fix the factory: it must take "
                              "no arguments and return a module, (module, args) or (module, args, kwargs).") from exc
    model, args, kwargs = _unpack(obj, description)
    return Target(model.eval(), attr, description, args, kwargs)


def _unpack(obj: Any, description: str) -> tuple[torch.nn.Module, tuple, dict]:
    if isinstance(obj, torch.nn.Module):
        return obj, (), {}
    if isinstance(obj, tuple) and obj and isinstance(obj[0], torch.nn.Module) and len(obj) in (2, 3):
        args = obj[1] if isinstance(obj[1], tuple) else (obj[1],)
        return obj[0], args, dict(obj[2]) if len(obj) == 3 else {}
    raise TargetError(f"{description} gave a {type(obj).__name__}; return an nn.Module, or "
                      "(module, args) / (module, args, kwargs).")


def _import_file(path: Path) -> Any:
    name = f"anefx_target_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's file failed to import, even by sys.exit
        del sys.modules[name]
        raise TargetError(f"importing {path} failed: {_failure(exc)}. Fix that error in {path.name}.") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _failure(exc: BaseException) -> str:
    """'ValueError: first line of the message at file.py:3: `source`' for one line of an error message."""
    from anefx.capture import user_frame

    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}{user_frame(exc)}"


def load_hf_directory(path: Path) -> Target:
    """A local HF model directory, loaded offline with the class of config.architectures[0]. Refused
    when any weight of the model is not in the checkpoint or has another shape (it would be random)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TargetError(f"{path} has no config.json; pass a Hugging Face model directory (config.json + "
                          "weights) or file.py:attr.")
    import transformers

    arch = _architecture(_read_config(config_file))
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise TargetError(f"{config_file}: architecture {arch!r} is not a model class of transformers "
                          f"{transformers.__version__}; upgrade transformers or fix `architectures`.")
    model, info = _from_pretrained(cls, path)
    _check_loading_info(info, path, arch)
    return Target(model.eval(), path.resolve().name, f"{arch} from {path}",
                  default_examples=default_examples(model.config))


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TargetError(f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                          f"{exc.colno}); fix it, or write the model again with save_pretrained.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"cannot read {config_file} ({exc}); check the file.") from exc
    if not isinstance(config, dict):
        raise TargetError(f"{config_file} holds a JSON {type(config).__name__}, not an object; write the model "
                          "again with save_pretrained.")
    return config


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or ["AutoModel"]
    return str(architectures[0] if isinstance(architectures, list) else architectures)


def _from_pretrained(cls: Any, path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, loading info), quietly: a size mismatch is loaded as reported (then refused), every
    other failure of transformers is a TargetError."""
    import transformers

    logging, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()  # anefx shows its own progress
    logging.set_verbosity_error()  # anefx reports missing and mismatched weights itself, in one line
    try:
        return cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                   ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001 - transformers' and safetensors' failures, re-raised readable
        raise TargetError(_loading_message(exc, path)) from exc
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _loading_message(exc: Exception, path: Path) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0].rstrip(".") if lines else type(exc).__name__
    if isinstance(exc, OSError) and "no file named" in first:
        advice = "the directory needs the weights (model.safetensors or pytorch_model.bin) next to config.json"
    elif "SafetensorError" in type(exc).__name__ or "deserializ" in first or "pickle" in first.lower():
        advice = "the weights file is truncated or corrupt: write the model again with save_pretrained"
    elif "model type" in first or "model_type" in first:
        advice = "set `model_type` and `architectures` in config.json to a model transformers knows"
    else:
        advice = "check that config.json and the weights belong together (save_pretrained writes both)"
    return f"loading {path} offline failed: {type(exc).__name__}: {first}. To fix: {advice}."


def _check_loading_info(info: dict[str, Any], path: Path, arch: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TargetError(f"{path}: {len(missing)} weights of {arch} are not in the checkpoint and would be "
                          f"random ({_some(missing)}); anefx does not compile a partly random model. Write the "
                          "complete model with save_pretrained, or fix config.json (layer counts, "
                          "`architectures`) to match the weights.")
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, stored, expected = mismatched[0]
        raise TargetError(f"{path}: the weights do not fit config.json: {key} is {tuple(stored)} in the "
                          f"checkpoint but {tuple(expected)} in the model ({len(mismatched)} weights differ); "
                          "fix config.json (sizes) to match the weights, or write both with save_pretrained.")


def _some(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def default_examples(config: Any) -> list[ExampleSpec]:
    """input_ids for text models; pixel_values for vision; input_features for speech encoders."""
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return [ExampleSpec("pixel_values", (1, config.num_channels, size, size))]
    if hasattr(config, "num_mel_bins"):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return [ExampleSpec("input_features", (1, config.num_mel_bins, frames))]
    if hasattr(config, "vocab_size"):
        seq = min(128, getattr(config, "max_position_embeddings", 128) or 128)
        return [ExampleSpec("input_ids", (1, seq), torch.int64)]
    return []
