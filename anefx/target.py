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
        except TypeError as exc:
            raise TargetError(f"calling {description}() failed ({exc}); the factory must take no "
                              "arguments.") from exc
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
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import
        del sys.modules[name]
        raise TargetError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def load_hf_directory(path: Path) -> Target:
    """A local HF model directory, loaded offline with the class of config.architectures[0]."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TargetError(f"{path} has no config.json; pass a Hugging Face model directory (config.json + "
                          "weights) or file.py:attr.")
    import transformers

    config = json.loads(config_file.read_text())
    arch = (config.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise TargetError(f"{config_file}: architecture {arch!r} is not a class of transformers "
                          f"{transformers.__version__}; upgrade transformers or fix `architectures`.")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # anefx shows its own progress
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
        raise TargetError(f"loading {path} offline failed: {exc}. The directory needs the weights "
                          "(model.safetensors or pytorch_model.bin) next to config.json.") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return Target(model.eval(), path.resolve().name, f"{arch} from {path}",
                  default_examples=default_examples(model.config))


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
