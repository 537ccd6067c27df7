"""The `anefx` command: a thin shell over the library. An AnefxError is one red line and exit code 2."""

from __future__ import annotations

import functools
import inspect
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape

from anefx.errors import AnefxError

app = typer.Typer(help="Compile PyTorch models into Apple Neural Engine friendly CoreML programs.",
                  no_args_is_help=True, add_completion=False)
console = Console(log_path=False)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """anefx: compile PyTorch models for the Apple Neural Engine."""
    # torch's own deprecation of its TreeSpec API fires on every graph copy: noise for a CLI user
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def friendly_errors(fn: Callable) -> Callable:
    """Every failure of a command is one red `error:` line on stderr and exit code 2: an AnefxError as
    it is, a file-system error with what to change, anything else as a bug to report. ANEFX_DEBUG=1
    (read at each call) re-raises the unexpected ones with their traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                click.exceptions.ClickException):
            raise
        except AnefxError as exc:
            fail(str(exc))
        except OSError as exc:
            if debugging():
                raise
            from anefx.files import os_error_message

            fail(os_error_message(exc))
        except Exception as exc:  # noqa: BLE001 - the last resort: no raw traceback for a user
            if debugging():
                raise
            lines = str(exc).strip().splitlines()
            fail(f"unexpected {type(exc).__name__}: {lines[0][:300] if lines else '(no message)'}. This is a bug "
                 "in anefx: please report it with the command you ran (ANEFX_DEBUG=1 shows the traceback).")

    return wrapper


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as one red `error:` line on stderr and exit with `code`."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def debugging() -> bool:
    return os.environ.get("ANEFX_DEBUG", "") not in ("", "0")


@app.command()
@friendly_errors
def demo(output: Annotated[Path, typer.Option("-o", "--output", help="where to write the package")] =
         Path("anefx-demo.mlpackage")) -> None:
    """Compile a built-in small Llama-style model and show what each rule changed."""
    from anefx.demo import run_demo

    run_demo(output, console)


Examples = Annotated[list[str] | None, typer.Option(
    "--example", "-e", help="an input as NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64 (repeatable)")]
Target = Annotated[str, typer.Argument(
    help="file.py:attr (a module or a zero-arg factory), a local HF model directory, or zoo:NAME")]
ComputeUnits = Annotated[str, typer.Option("--compute-units", help="CPU_AND_NE, ALL, CPU_ONLY, CPU_AND_GPU")]
Precision = Annotated[str, typer.Option("--precision", help="fp16 or fp32")]
DeploymentTarget = Annotated[str, typer.Option("--target", help="minimum deployment target, e.g. iOS18")]
FormatOrDeploymentTarget = Annotated[str, typer.Option("--target", help="minimum deployment target of the Core ML "
                                     "package, e.g. iOS18; or coreai: a Core AI model (.aimodel, iOS/macOS 27)")]
Rules = Annotated[str | None, typer.Option(
    "--rules", help="comma-separated rule names to run, in this order (default: anefx's rule list)")]
Quantize = Annotated[str | None, typer.Option(
    "--quantize", help="weights: int8, lut8, lut6 or lut4; or per part, e.g. embeddings=int8,head=lut6,default=lut4")]
GroupSize = Annotated[int | None, typer.Option("--group-size", help="with --quantize lutN: output channels per "
                      "lookup table (default 16)")]
Attention = Annotated[str | None, typer.Option(
    "--attention", help="split_heads (one attention per head, the default) or sdpa (keep fused attention)")]


@contextmanager
def staged(console: Console, what: str) -> Iterator[Callable[[str], None]]:
    """A spinner naming the running stage, and one log line per finished stage with its time."""
    started = {"name": None, "at": time.perf_counter()}

    def finish() -> None:
        if started["name"] is not None:
            console.log(f"{started['name']} [dim]{(time.perf_counter() - started['at']):.1f}s[/]")

    with console.status(what) as status:
        def progress(stage: str) -> None:
            finish()
            started["name"], started["at"] = stage, time.perf_counter()
            status.update(f"{what}: {stage}")

        yield progress
        finish()


def _compile(target: str, examples: list[str] | None, console: Console, *, compute_units: str,
             precision: str, deployment_target: str, attention: str | None, rules: str | None,
             progress: Callable[[str], None], buckets: list[str] | None = None, fmt: str = "coreml",
             quantize: str | dict | None = None):
    from anefx.api import compile as anefx_compile
    from anefx.backend import BackendOptions, accepts_attention
    from anefx.target import example_inputs, load_target, parse_example

    specs = [parse_example(e) for e in examples or []]
    options = BackendOptions.parse({"compute_units": compute_units, "precision": precision,
                                    "deployment_target": deployment_target, "attention": attention,
                                    "rules": _rule_names(rules)})
    if attention is not None and not accepts_attention():
        console.print(f"note: --attention {attention} is kept, but no rule of this anefx reads it yet.")
    progress("load")
    loaded = load_target(target)
    args, kwargs = example_inputs(loaded, specs)
    names = [*inspect.signature(loaded.model.forward).parameters][:len(args)]
    inputs = [*zip(names, args, strict=False), *kwargs.items()]
    console.print(f"[bold]{loaded.description}[/]: " + ", ".join(_describe(k, v) for k, v in inputs))
    extra = {} if fmt == "coreml" else {"target": fmt}  # another format: anefx.lower.target
    if quantize is not None:
        extra["quantize"] = quantize
    if buckets:  # one function per --bucket in one package (anefx.bucket_cli)
        from anefx.bucket_cli import bucket_calls

        extra["buckets"] = bucket_calls(loaded, args, kwargs, buckets)
    return loaded, anefx_compile(loaded.model, args, kwargs, progress=progress, **extra,
                                 **options.compile_kwargs())


def _rule_names(rules: str | None) -> list[str] | None:
    if rules is None:
        return None
    return [r.strip() for r in rules.split(",") if r.strip()]


def _describe(name, value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"{name} {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return f"{name}={value!r}"


@app.command("compile")
@friendly_errors
def compile_command(
        target: Target, example: Examples = None,
        output: Annotated[Path | None, typer.Option("-o", "--output", help="the package to write")] = None,
        compute_units: ComputeUnits = "CPU_AND_NE", precision: Precision = "fp16",
        deployment_target: FormatOrDeploymentTarget = "iOS18", attention: Attention = None,
        rules: Rules = None,
        partition: Annotated[bool, typer.Option("--partition", help="write a folder: a package per region that "
                             "converts, the ops that do not (or --cpu-ops) as CPU steps in partition.json")] = False,
        cpu_ops: Annotated[str | None, typer.Option("--cpu-ops", help="with --partition: comma-separated ops "
                           "(aten.histc) or module paths (encoder.layer.1) to keep in torch")] = None,
        bucket: Annotated[list[str] | None, typer.Option("--bucket", help="also compile these input shapes, one "
                          "function each in the same package: NAME:SHAPE[,NAME:SHAPE…], e.g. input_ids:1x128 "
                          "(repeatable; dtypes as the example's)")] = None,
        quantize: Quantize = None, group_size: GroupSize = None) -> None:
    """Compile TARGET into a .mlpackage (--target coreai: a .aimodel) and show what each rule did."""
    from anefx.lower.target import check_output, default_output, split_target
    from anefx.quantize_apply import check_quantize
    from anefx.quantize_cli import quantize_option
    from anefx.report import pass_table

    fmt, deployment_target = split_target(deployment_target)
    quantized = quantize_option(quantize, group_size)
    check_quantize(quantized, deployment_target, fmt)  # before loading the model
    if quantized is not None and (partition or cpu_ops is not None):
        fail("--quantize with --partition: quantize from Python (anefx.compile(..., partition=True, quantize=...)).")
    if partition or cpu_ops is not None:  # a folder of packages and CPU steps (anefx.partition_cli)
        from anefx.partition_cli import compile_partitioned_command

        return compile_partitioned_command(console, target, example, output, partition=partition, cpu_ops=cpu_ops,
                                           rules=rules, compute_units=compute_units, precision=precision,
                                           deployment_target=deployment_target, attention=attention)
    if output is not None:
        check_output(fmt, output)  # refuse before a long compile, not after
    with staged(console, "compiling") as progress:
        loaded, compiled = _compile(target, example, console, compute_units=compute_units,
                                    precision=precision, deployment_target=deployment_target,
                                    attention=attention, rules=rules, progress=progress, buckets=bucket, fmt=fmt,
                                    quantize=quantized)
        progress("save")
        path = compiled.save(output or default_output(fmt, loaded.name))
    for note in compiled.notes:
        console.print(f"note: {note}")
    console.print(pass_table(compiled))
    console.print(f"wrote [bold]{path}[/] (inputs: {', '.join(compiled.input_names)}; "
                  f"outputs: {', '.join(compiled.output_names)})")


@app.command("diff")
@friendly_errors
def diff_command(
        target: Target, example: Examples = None,
        html: Annotated[Path | None, typer.Option("--html", help="also write a standalone HTML page")] = None,
        compute_units: ComputeUnits = "CPU_AND_NE", precision: Precision = "fp16",
        deployment_target: DeploymentTarget = "iOS18", attention: Attention = None,
        rules: Rules = None) -> None:
    """Compile TARGET and show what each stage changed in the graph, module by module."""
    if html is not None:
        from anefx.files import check_file_target

        check_file_target(html)  # refuse before a long compile, not after
    with staged(console, "compiling") as progress:
        loaded, compiled = _compile(target, example, console, compute_units=compute_units,
                                    precision=precision, deployment_target=deployment_target,
                                    attention=attention, rules=rules, progress=progress)
    graph_diff = compiled.diff(title=f"anefx graph diff — {loaded.description}")
    graph_diff.show(console)
    if html is not None:
        console.print(f"wrote [bold]{graph_diff.to_html(html)}[/]")


@app.command("compile-llm")
@friendly_errors
def compile_llm_command(
        target: Target,
        output: Annotated[Path, typer.Option("-o", "--output", help="the folder to write (chunks + manifest)")],
        context: Annotated[int, typer.Option("--context", help="tokens a generation may hold")] = 256,
        prefill: Annotated[int, typer.Option("--prefill", help="tokens per prefill call")] = 64,
        max_chunk_mb: Annotated[float, typer.Option("--max-chunk-mb", help="largest chunk, in MB")] = 950.0,
        max_chunk_ops: Annotated[int, typer.Option("--max-chunk-ops", help="most MIL ops per chunk")] = 10_000,
        argmax: Annotated[bool, typer.Option("--argmax", help="return token ids, not logits")] = False,
        precision: Precision = "fp16", deployment_target: DeploymentTarget = "iOS18",
        quantize: Quantize = None, group_size: GroupSize = None) -> None:
    """Compile an HF causal LM into stateful CoreML chunks with prefill and decode functions."""
    from anefx.files import check_folder_target
    from anefx.llm.compile import compile_llm
    from anefx.llm.manifest import MANIFEST
    from anefx.quantize_apply import check_quantize
    from anefx.quantize_cli import quantize_option
    from anefx.target import load_target

    check_folder_target(output, MANIFEST, "a compiled LLM folder")  # refuse before a long compile
    quantized = quantize_option(quantize, group_size)
    check_quantize(quantized, deployment_target)
    with staged(console, "compiling") as progress:
        progress("load")
        loaded = load_target(target)
        lm = compile_llm(loaded.model, context_length=context, prefill_length=prefill, quantize=quantized,
                         max_chunk_bytes=int(max_chunk_mb * 1e6), max_chunk_ops=max_chunk_ops,
                         argmax_in_model=argmax, precision=precision, deployment_target=deployment_target,
                         progress=progress)
        progress("save")
        path = lm.save(output)
    for note in lm.notes:
        console.print(f"note: {note}")
    _llm_report(path)
    console.print(f"wrote [bold]{path}[/] ({len(lm.manifest.chunks)} chunk(s), context {context}, prefill {prefill})")


@app.command("generate")
@friendly_errors
def generate_command(
        folder: Annotated[Path, typer.Argument(help="a folder written by compile-llm")],
        prompt_ids: Annotated[str, typer.Option("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")],
        new_tokens: Annotated[int, typer.Option("-n", "--max-new-tokens", help="tokens to generate")] = 32,
        precision: Annotated[str | None, typer.Option(
            "--precision", help="the MIL interpreter's precision off macOS: fp16 (as on the device) or fp32")] = None,
        backend: Annotated[str, typer.Option("--backend", help="auto, coreml or interpreter")] = "auto") -> None:
    """Greedy generation from a compiled LLM folder; prints the new token ids."""
    from anefx.errors import OptionError
    from anefx.llm.runtime import load_llm

    try:
        ids = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
    except ValueError:
        raise OptionError(f"--prompt-ids {prompt_ids!r}: pass comma-separated integers, e.g. 1,2,3.") from None
    lm = load_llm(folder, precision=precision, backend=backend)
    started = time.perf_counter()
    new = lm.generate(ids, new_tokens)
    seconds = time.perf_counter() - started
    console.print(",".join(str(t) for t in new))
    err_console.print(f"[dim]{len(new)} tokens in {seconds:.2f}s ({lm.backend}, {lm.precision})[/]")


def _llm_report(folder: Path) -> None:
    from rich.table import Table

    from anefx.llm.manifest import LLMManifest
    from anefx.package_report import human_bytes

    manifest = LLMManifest.read(folder)
    table = Table(title=f"{folder.name}: {manifest.model}, context {manifest.context_length}, prefill "
                        f"{manifest.prefill_length}, output {manifest.output}")
    for column in ("chunk", "layers", "bytes", "ops (prefill / decode)", "functions", "states", "largest dim"):
        table.add_column(column, justify="right" if column in ("bytes", "largest dim") else "left",
                         no_wrap=column in ("chunk", "functions"))
    for chunk in manifest.chunks:
        states = f"{len(chunk.states)} × {chunk.states[0].shape}" if chunk.states else "-"
        ops = " / ".join(str(chunk.functions[f].ops) for f in ("prefill", "decode"))
        table.add_row(chunk.file.removesuffix(".mlpackage"), f"{chunk.layers[0]}–{chunk.layers[1] - 1}",
                      human_bytes(chunk.bytes), ops,
                      ", ".join(chunk.functions), states, str(chunk.largest_dim))
    console.print(table)


@app.command("report")
@friendly_errors
def report_command(package: Annotated[Path, typer.Argument(
        help="a saved .mlpackage or .aimodel, or a folder written by compile-llm")],
        as_json: Annotated[bool, typer.Option("--json", help="print everything as one JSON object")] = False,
        plan: Annotated[bool, typer.Option("--compute-plan", help="also CoreML's own plan: each op's device, "
                                           "the Neural Engine's share of the cost (macOS 14.4+)")] = False,
        compute_units: ComputeUnits = "ALL") -> None:
    """ANE readiness of a saved .mlpackage (ops, ranks, dimension limit, padding, unsupported ops, constraints), or
    the chunks of a compiled LLM folder (bytes, op counts, functions, states, largest dimension, constraints)."""
    from anefx.llm.manifest import MANIFEST
    from anefx.lower.coreai_report import aimodel_report, aimodel_tables, is_aimodel
    from anefx.package_report import package_report, report_tables
    from anefx.report_cli import llm_constraints, report_extras

    if as_json or (plan and not is_aimodel(package)):  # anefx.report_cli: --json, CoreML's compute plan
        report_extras(package, as_json=as_json, plan=plan, compute_units=compute_units, console=console)
        if as_json:
            return
    if (package / "partition.json").is_file():  # a folder of compile --partition (anefx.partition_cli)
        from anefx.partition_cli import partition_folder_report

        return partition_folder_report(console, package)
    if (package / MANIFEST).is_file():
        _llm_report(package)
        console.print(llm_constraints(package))
        return
    if is_aimodel(package):  # a Core AI model: its program read back from the asset
        for table in aimodel_tables(aimodel_report(package)):
            console.print(table)
        return

    from anefx.bucket_cli import show_functions

    report = package_report(package, show_functions(package, console))  # a table of functions first, if several
    for table in report_tables(report):
        console.print(table)
    if report.unsupported:
        names = ", ".join(f"{op} ×{n}" for op, (n, _) in report.unsupported.items())
        console.print(f"[yellow]ops the ANE does not run:[/] {names} — CoreML runs them on the CPU/GPU "
                      "(see docs/cli.md, ANE op table).")
    else:
        console.print("[green]no op from the ANE op table[/] (docs/cli.md): every op may run on the ANE.")


@app.command("verify")
@friendly_errors
def verify_command(
    package: Annotated[Path, typer.Argument(help="a saved .mlpackage")],
    module: Annotated[str, typer.Option("--module", "-m", help="the model it came from: file.py:attr, a "
                                        "local HF model directory, or zoo:NAME")],
    examples: Examples = None,
    precision: Annotated[str, typer.Option("--precision", help="fp16 (emulated, as on the device) or fp32")]
    = "fp16",
    min_psnr: Annotated[float | None, typer.Option(
        "--min-psnr", help="fail below this PSNR in dB (default: 40 when fp16 is involved, 80 for fp32)")] = None,
    rtol: Annotated[float | None, typer.Option(
        "--rtol", help="also fail any value with |package - model| > atol + rtol·|model|")] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="the absolute part of that bound")] = None,
) -> None:
    """Run a saved package with anefx's MIL interpreter, compare it with the PyTorch model, and judge:
    PASS (exit 0) or FAIL with the reasons (exit 1)."""
    from anefx.target import example_inputs, load_target, parse_example
    from anefx.verify import Criteria, package_verdict

    specs = [parse_example(e) for e in examples or []]
    if not package.exists():
        fail(f"{package} does not exist; pass the path of a saved .mlpackage.")
    loaded = load_target(module)
    args, kwargs = example_inputs(loaded, specs)
    verdict = package_verdict(package, loaded.model, args, kwargs, precision, Criteria(min_psnr, rtol, atol))
    console.print(_verdict_table(verdict, f"{package.name} vs {loaded.description} ({precision})"))
    console.print(_WEIGHTS_LINE[verdict.weights])
    if verdict.passed:
        tolerance = f"; within atol={atol or 0:g} + rtol={rtol or 0:g}·|ref|" if rtol or atol else ""
        console.print(f"[green]PASS[/]: every output is finite and ≥ {verdict.min_psnr:g} dB PSNR{tolerance}.")
        return
    console.print("[red]FAIL[/]: " + escape("; ".join(verdict.reasons)) + ".", soft_wrap=True)
    raise typer.Exit(code=1)


_WEIGHTS_LINE = {
    "same": "weights: the package was built from this model's weights (fingerprint matches).",
    "other": "weights: [red]the package was built from other weights than this model[/].",
    "unrecorded": "weights: not checked — the package records no weights fingerprint (not saved by anefx).",
}


def _verdict_table(verdict, title: str):
    from rich.table import Table

    table = Table(title=title)
    elementwise = any(o.outside is not None for o in verdict.outputs)
    columns = ["output", "max abs error", "max rel error", "PSNR (dB)", "nan/inf"]
    for col in [*columns, *(["outside tol"] if elementwise else []), "ok"]:
        table.add_column(col, justify="left" if col in ("output", "ok") else "right", no_wrap=col == "output")
    for o in verdict.outputs:
        ok = not any(r.startswith(f"{o.name}: ") for r in verdict.reasons)
        row = [o.name, f"{o.error.max_abs:.3g}", f"{o.error.max_rel:.3g}", f"{o.error.psnr_db:.1f}",
               str(o.non_finite), *([str(o.outside)] if elementwise else []), "[green]yes[/]" if ok else "[red]no[/]"]
        table.add_row(*row)
    return table


@app.command("quantize-report")
@friendly_errors
def quantize_report_command(
        target: Target, example: Examples = None,
        plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG of size against fidelity")] = None,
        modes: Annotated[str | None, typer.Option("--modes", help="comma-separated rungs, e.g. int8,lut6,lut4 "
                         "(default fp16,int8,lut6,lut4; fp16 is always measured first)")] = None,
        group_size: Annotated[int, typer.Option("--group-size", help="output channels per lookup table "
                              "(lut modes)")] = 16,
        deployment_target: DeploymentTarget = "iOS18") -> None:
    """Package bytes and fidelity of TARGET at fp16, int8, lut6 and lut4 (PSNR; causal LMs: top-1, perplexity)."""
    from anefx.quantize_cli import quantize_report_command as run

    run(console, staged, target, example, plot, modes, group_size, deployment_target)


@app.command("doctor")
@friendly_errors
def doctor_command() -> None:
    """Versions of torch / coremltools / transformers / anefx, the OS, and optional tools."""
    from rich.table import Table

    from anefx.doctor import checks

    table = Table(title="anefx doctor")
    for col in ("check", "found", "ok"):
        table.add_column(col, overflow="fold")
    found = checks()
    for c in found:
        table.add_row(c.name, c.value, "[green]yes[/]" if c.ok else "[red]no[/]")
    console.print(table)
    for c in found:
        if c.note:
            console.print(f"[bold]{c.name}[/]: {c.note}")


def main() -> None:  # pragma: no cover - console script entry
    app()
