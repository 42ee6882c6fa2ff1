"""The ``radfm`` command: ask, batch, eval, preview, demo, convert.

User errors (a missing file, an unreadable scan, a bad checkpoint, an empty region)
print one line on stderr and exit with status 2, without a traceback.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import __version__, cli_record
from .errors import PromptError, RadFMError
from .paths import check_kind

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a program ended by SIGPIPE


def quiet_third_party_logs() -> None:
    """torchao and torch print import-time warnings that are noise to a user."""
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --- argument groups shared by subcommands ------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required, help="RadFM folder: pytorch_model.bin + Language_files/")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA or with --quantization, float32 on CPU")
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "nf4"],
                   help="weight-only quantization of the LLM's linear layers (see README: precision tiers)")
    p.add_argument("--compile-decode", action="store_true",
                   help="static KV cache + torch.compile'd decode step: faster tokens on a GPU after a slow first answer")
    p.add_argument("--llm-backend", default="local", choices=["local", "vllm"],
                   help="vllm: keep the vision half here, generate on a vLLM server (README: Serve a reading room)")
    p.add_argument("--vllm-url", default=None, help="the vLLM server for --llm-backend vllm, e.g. http://gpu:8000")


def add_image_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--image", action="append", required=required, default=[],
                   help="scan file or DICOM folder; repeat for a prior study (first = current)")
    p.add_argument("--series", default=None, help="DICOM series UID or description to pick in a folder")
    p.add_argument("--region", action="append", default=[], metavar="MASK[:LABEL]",
                   help="label map aligned with the (first) image; optional label value after ':'")
    p.add_argument("--box", action="append", default=[], metavar="X0,Y0,Z0,X1,Y1,Z1",
                   help="region box corners in RAS mm")
    p.add_argument("--box-ijk", action="append", default=[], metavar="I0,J0,K0,I1,J1,K1",
                   help="region box corners in voxel indices of the (first) image")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--window", default=None, metavar="C,W", help="intensity window centre,width (e.g. 40,400)")
    window.add_argument("--preset", default=None, help="soft_tissue, lung, bone, brain or percentile")
    p.add_argument("--interpolation", default="nearest", choices=["nearest", "linear"])


def add_question_arguments(p: argparse.ArgumentParser) -> None:
    from .prompts import TASKS

    p.add_argument("--task", choices=TASKS, default=None, help="default: vqa with --question, else report")
    p.add_argument("--question", default=None, help="the question (vqa), or the finding (diagnosis)")
    p.add_argument("--history", default=None, help="clinical history, e.g. '58 y, male, cough for 3 weeks'")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _numbers(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise RadFMError(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values


def regions_from_args(args):
    from .ask import RegionInput

    regions = []
    for spec in args.region:
        path, _, label = spec.rpartition(":") if not os.path.exists(spec) and ":" in spec else (spec, "", "")
        if label and not label.lstrip("-").isdigit():
            raise RadFMError(f"--region {spec}: the label after ':' must be an integer (e.g. {path}:1)")
        regions.append(RegionInput(mask=path, label=int(label) if label else None))
    for spec in args.box:
        v = _numbers(spec, 6, "--box")
        regions.append(RegionInput(box_ras=[v[:3], v[3:]]))
    for spec in args.box_ijk:
        v = _numbers(spec, 6, "--box-ijk")
        regions.append(RegionInput(box_ijk=[v[:3], v[3:]]))
    return regions


def images_from_args(args, paths=None):
    from .ask import ImageInput

    paths = paths if paths is not None else args.image
    return [ImageInput(path=p, role="current" if k == 0 else "prior", series=args.series) for k, p in enumerate(paths)]


def request_from_args(args, image_paths=None, question=None, task=None):
    from .ask import AskRequest

    with settings_named_as_flags():
        return AskRequest.from_dict({
            **{k: getattr(args, k) for k in AskRequest.keys() if hasattr(args, k)},
            "task": task or args.task, "question": question if question is not None else args.question,
            "images": images_from_args(args, image_paths), "regions": regions_from_args(args),
            "window": args.window or args.preset,
        })


@contextlib.contextmanager
def settings_named_as_flags():
    """GenerationSettings' errors name its fields (``top_p must be ...``); the user typed flags (--top-p)."""
    from .generation import GenerationSettings

    try:
        yield
    except PromptError as exc:
        field = str(exc).split()[0]
        if field not in GenerationSettings.__dataclass_fields__:
            raise
        raise PromptError(f"--{field.replace('_', '-')}: {exc}") from None


def check_question_flag(args) -> None:
    """An empty --question is a question left out, not a report asked for (the default task without one)."""
    if args.question is not None and not args.question.strip() and args.task in (None, "vqa"):
        raise PromptError("--question is empty: task vqa needs a question; pass one, or choose --task report")


def vllm_url(args) -> str | None:
    """The vLLM server to generate on, or None for the local LLM."""
    if getattr(args, "llm_backend", "local") != "vllm":
        return None
    if not args.vllm_url:
        raise RadFMError("--llm-backend vllm needs --vllm-url http://HOST:PORT (a vllm serve --enable-prompt-embeds)")
    return args.vllm_url


def token_from_args(args) -> str | None:
    from .worker.http import read_token_file

    return read_token_file(args.token_file) if args.token_file else None


def add_server_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--server", default=None, metavar="URL", help=f"{what} a radfm serve instead of loading the model here")
    p.add_argument("--token-file", default=None, help="file holding the server's token (with --server)")


def remote_client(args):
    """The ``radfm serve`` at ``--server``, with the token of ``--token-file`` (ask and eval alike)."""
    from .remote import RemoteClient

    if args.checkpoint:
        raise RadFMError(f"radfm {args.command} takes --checkpoint FOLDER (the model here) or --server URL "
                         f"(a radfm serve), not both")
    here_only = [flag for flag, given in (("--device", args.device != "cpu"), ("--dtype", args.dtype),
                                          ("--quantization", args.quantization), ("--compile-decode", args.compile_decode),
                                          ("--llm-backend", args.llm_backend != "local"), ("--vllm-url", args.vllm_url))
                 if given]
    if here_only:
        raise RadFMError(f"{', '.join(here_only)} {'sets' if len(here_only) == 1 else 'set'} the model loaded here; "
                         f"with --server the server's own settings answer (give them to radfm serve)")
    return RemoteClient(args.server, token_from_args(args))


def engine_class():
    """:class:`~RadFMSlicer.engine.RadFMEngine`, imported only by commands that load the model: it
    brings torch and transformers, seconds on a cold start, said first on stderr (a quiet terminal
    looks hung). Help, flag errors, previews and ``--server`` never pay for it."""
    if "torch" not in sys.modules:
        print("Loading torch and transformers ...", file=sys.stderr, flush=True)
    from .engine import RadFMEngine

    return RadFMEngine


def check_model_arguments(args) -> None:
    """Checkpoint folder, device, dtype and quantization: checked before any scan is read, after
    the checks that need no torch (a typo costs no import)."""
    engine_class().load_options(args.checkpoint, args.device, args.dtype, args.quantization)


def load_engine(args):
    print(f"Loading {args.checkpoint} on {args.device} ...", file=sys.stderr, flush=True)
    engine = engine_class().load(args.checkpoint, device=args.device, dtype=args.dtype, quantization=args.quantization,
                             compile_decode=args.compile_decode, vllm_url=vllm_url(args))
    tier = f", LLM linears {engine.quantization}" if engine.quantization else ""
    print(f"Loaded as {str(engine.dtype).replace('torch.', '')}{tier}", file=sys.stderr, flush=True)
    return engine


_stdout_line_open = False  # streamed answer text not yet ended by a newline
_stdout_closed = False  # the reader of stdout went away (``radfm ask ... | head -c 5``)


def print_out(text: str, end: str = "\n") -> None:
    """Print to stdout; once its reader has gone, drop the rest quietly (see :func:`stdout_closed`)."""
    global _stdout_closed
    if _stdout_closed:
        return
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        _stdout_closed = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too


def stdout_closed() -> bool:
    """Whether stdout's reader went away: a command with a record to keep (--session) finishes it first."""
    return _stdout_closed


def print_delta(delta: str) -> None:
    """Stream answer text to stdout, remembering whether its line is still open (see :func:`main`)."""
    global _stdout_line_open
    if delta:
        print_out(delta, end="")
        _stdout_line_open = not delta.endswith("\n")


def print_image_notes(images) -> None:
    """Each note on what the model was given (the DICOM series picked, voxels replaced, a box clipped),
    one line on stderr; ``--json`` has them under ``images[].notes``."""
    from .session import image_notes

    for line in image_notes(images):
        print(f"note: {line}", file=sys.stderr)


# --- subcommands ----------------------------------------------------------------------------
def cmd_ask(args) -> int:
    from .ask import ask, prepare, validate
    from .session import DISCLAIMER, Session, append_turn
    from .storage import check_writable

    client = remote_client(args) if args.server else None  # the token file read before any scan
    if not args.server and not args.checkpoint:
        raise RadFMError("radfm ask needs --checkpoint FOLDER (or --server URL of a radfm serve)")
    if args.attention:
        from .attention import check_map_name

        if args.server:
            raise RadFMError("--attention needs the model in this process (--checkpoint), not --server")
        check_map_name(args.attention)
        check_writable(args.attention, "--attention")
    check_question_flag(args)
    cli_record.before_ask(args)  # a DICOMweb --image fetched, --sr checked: before the model loads
    request = request_from_args(args)
    request.include_previous_turns = args.include_previous_turns
    if args.session:
        check_writable(args.session, "session file")  # before the model runs, not after the answer
    session = Session.read(args.session) if args.session else Session()
    if not args.server:
        validate(request)  # paths, window and regions: before torch is imported
        check_model_arguments(args)
    words = []  # the answer so far: kept in --session if it is cut short

    def stream(delta: str) -> None:
        words.append(delta)
        if not args.json:
            print_delta(delta)
        if stdout_closed() and not args.session:  # nothing to keep: stop as Unix tools do
            raise BrokenPipeError

    prepared = engine = attention = None
    try:
        if args.server:
            from .remote import ask_server

            turn = ask_server(client, request, session, on_text=stream)
        else:
            prepared = prepare(request, session)  # every scan, region and path checked before the model loads
            engine = load_engine(args)
            if args.attention:  # computed with the encoding, which the answer then reuses
                from .attention import write_for_ask

                attention = write_for_ask(engine, prepared, args.attention)
            turn = ask(engine, request, session, on_text=stream, prepared=prepared)
    except (KeyboardInterrupt, RadFMError) as exc:
        if args.session and words:
            keep_cut_answer(args, request, "".join(words), exc, prepared, engine)
        raise
    if attention:
        turn.provenance["attention"] = attention
        if not args.json:
            print(f"attention map ({attention['label']}): {attention['file']}", file=sys.stderr)
    if args.json:  # the notice every answer carries, as text mode prints it
        print_out(json.dumps({**turn.to_dict(), "disclaimer": DISCLAIMER}, indent=2))
    else:
        print_delta("\n")
        print_image_notes(turn.images)
        if turn.stop_reason != "eos":
            print(f"[stopped: {turn.stop_reason}]", file=sys.stderr)
        print(DISCLAIMER, file=sys.stderr)
    if args.session:  # the answer is out first: a failed save loses nothing the user has not seen
        try:
            append_turn(args.session, turn)  # re-read under the file's lock: a concurrent ask's turn is kept
        except RadFMError as exc:
            raise RadFMError(f"the answer above was not added to {args.session}: {exc}") from None
    cli_record.after_ask(args, turn)
    if stdout_closed():  # the session is the record: kept whatever became of stdout
        print(f"radfm: stdout was closed before the whole answer was printed; the turn was added to {args.session}",
              file=sys.stderr)
        return EXIT_BROKEN_PIPE
    return 0


def keep_cut_answer(args, request, answer: str, exc: BaseException, prepared, engine) -> None:
    """Add an answer cut short by Ctrl-C or an error to ``--session``, as the panel keeps the words
    so far (stop reason "cancelled" or "error"), and raise ``exc`` again saying so."""
    from .ask import cut_turn
    from .session import append_turn

    interrupted = isinstance(exc, KeyboardInterrupt)
    turn = cut_turn(request, answer, "cancelled" if interrupted else "error", None if interrupted else str(exc),
                    prepared, engine.describe() if engine else None)
    if args.server:
        turn.provenance["server"] = args.server
    try:
        append_turn(args.session, turn)  # under the file's lock, atomically: the turns already there are kept
        told = f"the answer so far was added to {args.session} (stop reason: {turn.stop_reason})"
    except RadFMError as save_error:
        told = f"the answer so far could not be added to {args.session}: {save_error}"
    if interrupted:
        raise KeyboardInterrupt(told) from None
    raise RadFMError(f"{exc}; {told}") from None


def cmd_batch(args) -> int:
    from .ask import generation_settings
    from .batch import batch_items
    from .imaging import parse_window
    from .storage import check_writable, sole_writer

    out = Path(args.out)
    check_writable(out, "results file (--out)")
    parse_window(args.window or args.preset)  # options shared by every scan: one error, before anything runs
    regions_from_args(args)
    with settings_named_as_flags():
        generation_settings(vars(args))
    items = batch_items(Path(args.input))
    check_model_arguments(args)
    with sole_writer(out, "radfm batch"):  # a second batch on this --out is refused, naming this one
        return answer_batch(args, out, items)


def answer_batch(args, out: Path, items: list[dict]) -> int:
    """Answer the scans of ``items`` not yet answered in ``out`` (see :func:`cmd_batch`)."""
    from tqdm import tqdm

    from .ask import ask, validate
    from .batch import append_record, finished_ids, repair

    settings = run_settings(args)
    done = finished_ids(out, settings, args.force)
    todo = [item for item in items if item["id"] not in done]
    print(f"{len(items)} scans, {len(items) - len(todo)} already done, {len(todo)} to go -> {out}",
          file=sys.stderr, flush=True)
    if not todo:
        return 0
    failures = 0
    with open(out, "a") as f:
        ready = []
        for item in todo:  # a scan that fails a check is recorded without waiting for the model
            record = {"id": item["id"], "images": item["images"], "run_settings": settings}
            try:
                request = request_from_args(args, item["images"], item["question"], item["task"])
                validate(request)
                ready.append((request, record))
            except RadFMError as exc:
                failures += 1
                append_record(f, record | {"error": str(exc)})
        if ready:
            engine = load_engine(args)
            with tqdm(ready, unit="scan", file=sys.stderr) as bar:
                for request, record in bar:
                    try:
                        record.update(ask(engine, request).to_dict())
                    except RadFMError as exc:
                        failures += 1
                        record["error"] = str(exc)
                    append_record(f, record)
    repair(out)  # one record per scan: the earlier failure of a scan answered now goes
    print(f"done: {len(todo) - failures} answered, {failures} failed (rerun to retry them)", file=sys.stderr)
    return 0 if not failures else 1


def run_settings(args) -> dict:
    """What makes a batch's answers comparable; resuming a results file under others is refused."""
    keys = ("dtype", "quantization", "task", "question", "history", "window", "preset", "interpolation", "series",
            "region", "box", "box_ijk", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    return {"checkpoint": os.path.abspath(args.checkpoint), **{key: getattr(args, key) for key in keys}}


def cmd_preview(args) -> int:
    from .ask import prepare
    from .preview import check_image_name, render_montage
    from .storage import check_writable

    check_image_name(args.out)
    check_writable(args.out, "preview --out")
    if args.attention and not args.checkpoint:
        raise RadFMError("preview --attention needs --checkpoint FOLDER: the map comes from the model's resampler")
    if args.attention:
        check_model_arguments(args)
    request = request_from_args(args, task="report")
    prepared = prepare(request)
    titles = [f"{r.label} ({r.role})" for r in prepared.records]
    overlays = None
    if args.attention:
        from .attention import overlay, patch_map

        engine = load_engine(args)
        overlays = [overlay(patch_map(engine, image), image) for image in prepared.model_images]
    path = render_montage(prepared.model_images, args.out, titles=titles, edges=prepared.edges, overlays=overlays)
    for record in prepared.records:
        print(f"{record.role}: {record.source} -> tensor {record.shape}", file=sys.stderr)
    print_image_notes(prepared.records)
    print(path)
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on pydicom's CT_small.dcm with a tiny random checkpoint."""
    from . import storage

    if args.workdir:
        storage.check_writable(args.workdir, "--workdir", folder=True)
        return _demo(Path(args.workdir), args.max_new_tokens, keep=True)
    with tempfile.TemporaryDirectory(prefix="radfm-demo-") as work:  # nothing left behind
        return _demo(Path(work), args.max_new_tokens, keep=False)


def _demo(work: Path, max_new_tokens: int, keep: bool) -> int:
    import pydicom.data

    from . import storage
    from .ask import AskRequest, ImageInput, RegionInput, ask
    from .engine import RadFMEngine
    from .generation import GenerationSettings
    from .imaging import describe_window
    from .session import Session
    from .testing import make_tiny_checkpoint

    banner = "PIPELINE CHECK with a tiny RANDOM-WEIGHT model: the text below is noise, not a medical answer."
    print(banner, file=sys.stderr)
    scan = pydicom.data.get_testdata_file("CT_small.dcm")
    checkpoint = make_tiny_checkpoint(work / "tiny-checkpoint")
    print(f"scan: {scan}\ncheckpoint: {checkpoint} (random weights)", file=sys.stderr)
    engine = RadFMEngine.load(checkpoint)
    session = Session(title="RadFM demo (pipeline check, random weights)")
    request = AskRequest(
        task="report",
        images=[ImageInput(path=scan)],
        regions=[RegionInput(name="demo box", box_ijk=[[40, 40, 0], [80, 80, 0]])],
        history="demo patient",
        settings=GenerationSettings(max_new_tokens=max_new_tokens),
        preview_dir=str(work / "previews"),
    )
    print_delta("answer: ")
    turn = ask(engine, request, session, on_text=print_delta)
    print_delta("\n")
    seen = [f"{img.label}: tensor {img.shape}, window {describe_window(img.window)}" for img in turn.images]
    print("the model saw:\n  " + "\n  ".join(seen), file=sys.stderr)
    session.write(work / "session.json")
    storage.write_text(work / "session.md", session.to_markdown())
    if keep:
        print(f"previews: {', '.join(img.preview_png for img in turn.images)}", file=sys.stderr)
        print(f"session: {work / 'session.md'}", file=sys.stderr)
    else:
        print("checkpoint, previews and session were temporary and are removed; keep them with --workdir DIR",
              file=sys.stderr)
    print(banner, file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    """Score a manifest (logic in :mod:`RadFMSlicer.evaluation.run`), or compare two runs."""
    from .evaluation.datasets import load_manifest
    from .evaluation.run import format_table, run_eval
    from .generation import GenerationSettings
    from .storage import check_writable, sole_writer

    if args.eval_command == "compare":
        return cmd_eval_compare(args)
    if args.eval_command == "import":
        return cmd_eval_import(args)
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint or args.server),
                                        ("--manifest", args.manifest), ("--out", args.out)) if not value]
    if missing:
        raise RadFMError(f"radfm eval needs {', '.join(missing)} (or --server URL instead of --checkpoint; "
                         f"or: radfm eval compare RUN_A RUN_B)")
    with settings_named_as_flags():
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    client = remote_client(args) if args.server else None  # its token file read before the manifest
    if client is None:
        check_model_arguments(args)
    cases = load_manifest(args.manifest)  # every bad row named before the model loads or the server is asked
    check_writable(args.out, "run folder (--out)", folder=True)
    clinical = None
    if args.metrics:
        from .evaluation.metrics import ClinicalScorer

        clinical = ClinicalScorer([name.strip() for name in args.metrics.split(",") if name.strip()])
        for line in clinical.unavailable.values():
            print(f"radfm: {line}", file=sys.stderr, flush=True)
    if client is not None:
        print(f"Answering on the RadFM server at {args.server} ...", file=sys.stderr, flush=True)
    engine = client or (lambda: load_engine(args))  # loaded once the run folder accepts the settings
    with sole_writer(args.out, "radfm eval"):  # a second eval on this --out is refused, naming this one
        summary = run_eval(engine, cases, args.out, settings, window=args.window, interpolation=args.interpolation,
                           manifest=str(args.manifest), force=args.force, attention=args.attention,
                           clinical=clinical)
    print(format_table(summary))
    out = Path(args.out)
    print(f"cases: {out / 'cases.jsonl'}\nsummary: {out / 'summary.json'}\ngallery: {out / 'index.html'}",
          file=sys.stderr)
    return 0 if not summary["cases"]["failed"] else 1


def cmd_eval_compare(args) -> int:
    from .evaluation.compare import format_comparison, write_comparison

    run_a, run_b = (Path(r) for r in args.runs)
    out = Path(args.out or run_b / f"compare-{run_a.name}")
    print(format_comparison(write_comparison(run_a, run_b, out)))
    print(f"comparison: {out / 'compare.json'}\ngallery: {out / 'index.html'}", file=sys.stderr)
    return 0


def cmd_eval_import(args) -> int:
    """A published benchmark file (RadFM's, CT-RATE's) as a manifest, checked as radfm eval will read it."""
    from .evaluation.datasets import load_manifest
    from .evaluation.imports import benchmark_rows, write_manifest

    rebase = None
    if args.rebase is not None:
        old, sep, new = args.rebase.partition("=")
        if not sep or not old:
            raise RadFMError(f"--rebase needs OLD=NEW (a path prefix in the file and its place here), got {args.rebase!r}")
        rebase = (old, new)
    rows, fmt = benchmark_rows(args.file, args.modality_set, rebase, args.images)
    out = write_manifest(rows, args.out)
    print(f"{args.file}: {fmt}, {len(rows)} case(s) -> {out}", file=sys.stderr)
    try:
        cases = load_manifest(out)  # a missing image is named now, not when the run reaches it
    except RadFMError as exc:
        raise RadFMError(f"{exc} (images elsewhere? --rebase OLD=NEW or --images DIR; the manifest is written: "
                         f"fix it, or import again)") from None
    print(f"every case checked: run it with radfm eval --manifest {out} ({len(cases)} cases)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    """Serve the model to a reading room (logic in :mod:`RadFMSlicer.worker.http`)."""
    from .checkpoint import locate_checkpoint

    try:
        from .worker.http import ServeConfig, serve
    except ImportError as exc:
        raise RadFMError(f"radfm serve needs FastAPI and uvicorn: pip install -e '.[server]' in the RadFMSlicer checkout ({exc})") from None
    locate_checkpoint(args.checkpoint)  # a wrong folder is one line, before anything listens
    if args.vllm_max_num_seqs is not None and not vllm_url(args):
        raise RadFMError("--vllm-max-num-seqs is how many answers vLLM writes at once: it needs --llm-backend vllm")
    config = ServeConfig(
        checkpoint=args.checkpoint, host=args.host, port=args.port, token=token_from_args(args),
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, device=args.device, dtype=args.dtype,
        quantization=args.quantization, vllm_url=vllm_url(args), cache_dir=args.cache_dir, cache_mb=args.cache_mb,
        max_upload_mb=args.max_upload_mb, queue_limit=args.queue_limit,
        **({} if args.vllm_max_num_seqs is None else {"vllm_max_num_seqs": args.vllm_max_num_seqs}),
    )
    serve(config)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint, convert_for_vllm

    started = time.perf_counter()
    convert = convert_for_vllm if args.for_vllm else convert_checkpoint
    out = convert(args.checkpoint, args.out, args.dtype, args.shard_size_gb,
                  progress=lambda message: print(message, file=sys.stderr, flush=True))
    use = (f"serve it with: vllm serve {out} --enable-prompt-embeds --max-num-seqs 8, then radfm serve "
           f"--llm-backend vllm --vllm-url http://HOST:8000 --vllm-max-num-seqs 8" if args.for_vllm
           else f"load it with --checkpoint {out}")
    print(f"converted {args.checkpoint} -> {out} ({args.dtype}) in {time.perf_counter() - started:.0f} s; {use}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.metrics import CLINICAL as CLINICAL_METRICS

    parser = argparse.ArgumentParser(prog="radfm", description="Ask the RadFM model about CT/MR scans (research use only).")
    parser.add_argument("--version", action="version", version=f"radfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="answer one question about one scan (streams the answer)")
    add_model_arguments(p, required=False)
    add_server_arguments(p, "ask")
    add_image_arguments(p)
    add_question_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--session", default=None, help="JSON session file to append this turn to")
    p.add_argument("--include-previous-turns", action="store_true",
                   help="show the model earlier turns of --session (RadFM was not trained on dialogue)")
    p.add_argument("--preview-dir", default=None, help="write a PNG of what the model saw per image here")
    p.add_argument("--attention", default=None, metavar="FILE.nii.gz",
                   help="write where the resampler looked in the (first) scan, on its own grid "
                        "(resampler attention, not an explanation)")
    cli_record.add_arguments(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("batch", help="answer a folder or CSV of scans into JSON lines (resumable)")
    add_model_arguments(p)
    add_image_arguments(p, required=False)
    add_question_arguments(p)
    p.add_argument("--input", required=True, help="folder of scans, or CSV with an 'image' column")
    p.add_argument("--out", required=True, help="JSON-lines file; rerunning skips finished scans")
    p.add_argument("--force", action="store_true",
                   help="resume --out even though it was made with other settings (each record keeps its own)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("preview", help="PNG montage of exactly what the model receives")
    add_image_arguments(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--attention", action="store_true",
                   help="overlay the resampler's attention (needs --checkpoint; resampler attention, not an explanation)")
    add_model_arguments(p, required=False)
    p.set_defaults(func=cmd_preview, history=None, question=None, task=None, max_new_tokens=1, temperature=0.0,
                   top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None)

    p = sub.add_parser("demo", help="pipeline check on a real CT (pydicom's CT_small.dcm) with a random tiny model")
    p.add_argument("--workdir", default=None, help="where to write the tiny checkpoint, previews and session")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="answer a manifest of cases with references and score them (resumable)")
    add_model_arguments(p, required=False)
    add_server_arguments(p, "answer every case on")
    p.add_argument("--manifest", help="JSONL or CSV: images, task, question, reference (+ any extra columns)")
    p.add_argument("--out", help="run folder: cases.jsonl, summary.json; rerunning resumes")
    p.add_argument("--window", default=None, metavar="C,W|PRESET", help="intensity window for every scan (default: automatic)")
    p.add_argument("--interpolation", default="nearest", choices=["nearest", "linear"])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--force", action="store_true",
                   help="resume --out even though it was made with other settings (each record keeps its own)")
    p.add_argument("--attention", action="store_true",
                   help="also write each case's resampler attention (RUN/attention/ID.nii.gz and an overlaid "
                        "thumbnail; resampler attention, not an explanation)")
    p.add_argument("--metrics", default=None, metavar="NAME,...",
                   help="clinical metrics for open text, through radeval (pip install 'RadFMSlicer[metrics]'; "
                        "models from the Hugging Face cache): " + ", ".join(CLINICAL_METRICS)
                        + "; BLEU, ROUGE-L and accuracy are always scored")
    p.set_defaults(func=cmd_eval, eval_command=None)
    eval_commands = p.add_subparsers(dest="eval_command")
    compare = eval_commands.add_parser(
        "compare", help="per-case deltas and paired bootstrap intervals between two runs of one manifest")
    compare.add_argument("runs", nargs=2, metavar="RUN", help="two run folders made by radfm eval")
    compare.add_argument("--out", help="folder for compare.json (default: RUN_B/compare-<RUN_A name>)")
    imported = eval_commands.add_parser(
        "import", help="RadFM's test files or CT-RATE's report CSV as a manifest (README: Published benchmarks)")
    imported.add_argument("file", help="RadFM test CSV/JSON, VQA-RAD/SLAKE/PMC-VQA CSV, or CT-RATE reports CSV")
    imported.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    imported.add_argument("--modality-set", default=None, metavar="modality_set.json",
                          help="RadFM's modality set: adds a yes and a no modality question per scan")
    imported.add_argument("--rebase", default=None, metavar="OLD=NEW",
                          help="replace the image paths' prefix OLD by NEW (the files name their authors' disks)")
    imported.add_argument("--images", default=None, metavar="DIR", help="folder of CT-RATE's volumes")

    p = sub.add_parser("serve", help="serve the model over HTTP to a reading room (README: Serve a reading room)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", default=None, help="private file (chmod 600) holding the token clients must send")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM); with --ssl-keyfile turns https on")
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument("--cache-dir", default=None, help="private folder for uploaded scans (default: a new temporary one)")
    p.add_argument("--cache-mb", type=float, default=4096, help="uploads kept, in MB; least recently used go first")
    p.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload, unpacked, in MB")
    p.add_argument("--queue-limit", type=int, default=16, help="questions waiting at most; more get 'busy, N ahead'")
    p.add_argument("--vllm-max-num-seqs", type=int, default=None, metavar="N",
                   help="with --llm-backend vllm: answers written at once, the --max-num-seqs vLLM was started with "
                        "(default 8; vLLM does not say); more wait in this server's fair queue")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="the official pytorch_model.bin to sharded 16-bit safetensors (faster, leaner loads)")
    p.add_argument("--checkpoint", required=True, help="folder with pytorch_model.bin and Language_files/")
    p.add_argument("--out", required=True, help="new folder for the safetensors shards")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="precision stored on disk (default bfloat16: half the size, what GPUs load)")
    p.add_argument("--shard-size-gb", type=float, default=2.0,
                   help="largest shard in GB (default 2); converting needs about this much RAM")
    p.add_argument("--for-vllm", action="store_true",
                   help="write only the LLaMA part as a standard Hugging Face Llama folder for vLLM (README: Serve a reading room)")
    p.set_defaults(func=cmd_convert)
    return parser


def join_dashed_values(argv: list[str]) -> list[str]:
    """``--box -40,10,-200,...`` as the README writes it, not only ``--box=-40,...``.

    argparse takes a value that starts with '-' and is not a plain number for an option
    ("expected one argument"); a comma-separated number list after an option is its value.
    """
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-[\d.][\d.,eE+-]*", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def report_error(message: str) -> None:
    """The error as the last line of output, alone: an open answer line is ended first."""
    global _stdout_line_open
    if _stdout_line_open:
        print(flush=True)
        _stdout_line_open = False
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


# Flags whose empty value (an unset shell variable, say) would otherwise read as the flag left out or as
# a missing file -> what to give instead.
NOT_EMPTY = {"image": "give a scan file or a DICOM folder", "region": "give a label map file, MASK[:LABEL]",
             **dict.fromkeys(("checkpoint", "session", "preview_dir", "attention", "out", "series", "window", "server",
                              "token_file", "manifest", "input", "sr", "store_sr", "dicomweb_auth_file",
                              "dicomweb_cache", "modality_set", "rebase", "images", "metrics"),
                             "give a value, or leave the flag out")}


def refuse_empty_values(args) -> None:
    """``--session ""`` kept no conversation and said nothing: an empty value is refused by name."""
    for name, give in NOT_EMPTY.items():
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]  # --image and --region may be given again
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise RadFMError(f"--{name.replace('_', '-')} is empty: {give}")


# Every flag naming a path read or written. A device, FIFO or socket is refused by name before anything opens
# it (paths.check_kind); whether a file or a folder is wanted, each command's own checks say, in its words.
# A --region's path is checked with its region (ask.RegionInput.check): its value may end in ':LABEL'.
PATH_FLAGS = ("image", "checkpoint", "session", "preview_dir", "attention", "token_file", "manifest", "input", "out",
              "workdir", "cache_dir", "ssl_certfile", "ssl_keyfile", "runs", "sr", "dicomweb_auth_file", "dicomweb_cache",
              "modality_set", "images")


def check_path_flags(args) -> None:
    """``radfm batch --out /dev/full`` read the device until memory ran out: odd files are refused first."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str):
                check_kind(os.path.expanduser(path), "run" if name == "runs" else f"--{name.replace('_', '-')}")


def main(argv=None) -> int:
    quiet_third_party_logs()
    args = build_parser().parse_args(join_dashed_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        refuse_empty_values(args)
        check_path_flags(args)
        return args.func(args)
    except RadFMError as exc:
        report_error(f"radfm: error: {' '.join(str(exc).split())}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # its message, if any, says what was kept
        report_error(f"radfm: interrupted; {exc}" if str(exc) else "radfm: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (``radfm ask ... | head -1``): nothing left to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
