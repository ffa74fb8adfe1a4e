"""Command-line options of ``python -m experiments.finetune`` (and of ``experiments.sweep``): parser and configs.

Every option has a default and a help line; ``--config file.json|.yaml`` supplies option values
(keys are the long option names, with ``-`` or ``_``; keys starting with ``_`` are comments) that the
command line overrides. This module imports no JAX, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_FULL_LR",
    "DEFAULT_LR",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_METHODS",
    "LORA_PRO_FORMS",
    "LLM_TASKS",
    "METHODS",
    "TASK_DEFAULTS",
    "METHOD_VARIANTS",
    "TASK_MAX_LENGTH",
    "add_run_arguments",
    "build_parser",
    "finish_args",
    "max_length_for",
    "parse_args",
    "resolve_method",
]

LORA_PRO_FORMS: tuple[str, ...] = ("adamw", "efficient", "lean", "sgd")
"""Values of ``--lora-pro-form``; ``adamw`` is the library's ``lora_pro_adamw(form="full")`` (the CLI name avoids
a second meaning of "full", which is full fine-tuning: ``--method full``)."""

METHOD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rslora": ("lora", {"rslora": True}),
    "lora-pro-sgd": ("lora-pro", {"lora_pro_form": "sgd"}),
    "lora-pro-efficient": ("lora-pro", {"lora_pro_form": "efficient"}),
    "lora-pro-lean": ("lora-pro", {"lora_pro_form": "lean"}),
}
"""Named settings of a base method, so that one ``--method`` list (one sweep) compares them: ``name -> (base
method, option values that override the command line's for that method's runs)``. ``lora-pro`` itself uses
``--lora-pro-form`` (default ``adamw``) and ``lora`` uses ``--rslora``."""

METHODS: tuple[str, ...] = ("lora", "rslora", "lora-pro", "lora-pro-sgd", "lora-pro-efficient", "lora-pro-lean",
                            "lora-ga", "lora-plus", "prilora", "alora", "full")
"""Every value accepted by ``--method``, in the order tables list them."""


def resolve_method(method: str, args: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """``(base method, options of its runs)``: a :data:`METHOD_VARIANTS` name becomes its base method and a copy
    of ``args`` with the variant's option values; any other method is returned with ``args`` itself."""
    if method not in METHOD_VARIANTS:
        return method, args
    base, overrides = METHOD_VARIANTS[method]
    return base, argparse.Namespace(**{**vars(args), **overrides})

DEFAULT_METHODS: tuple[str, ...] = ("lora", "lora-pro", "full")
"""Methods compared when ``--method`` is not given."""

#: Learning rate used when ``--lr`` is not given (``--full-lr`` for full fine-tuning).
DEFAULT_LR = 1e-3
DEFAULT_FULL_LR = 1e-4

#: Tokens per example when ``--max-length`` is not given: per task, else :data:`DEFAULT_MAX_LENGTH`. BBC News
#: articles are cut to their headline and first sentence (32 tokens) so that the embedded default (three runs)
#: stays within 3 minutes on a 2-core CPU; at 64 tokens it took 3 min 38 s (idle 2-core CPU) for
#: similar test accuracies (LoRA / LoRA-Pro / full: 74.5 / 91.0 / 93.4 % at 64 tokens, 74.5 / 91.5 / 92.5 % at 32).
TASK_MAX_LENGTH: dict[str, int] = {"bbc": 32, "arith": 104, "sft": 512}
DEFAULT_MAX_LENGTH = 128

#: The causal-LM (instruction-tuning) tasks: ``sft`` (your files) and ``arith`` (embedded); see
#: :mod:`experiments.lm_tasks`. Their default ``--model`` is SmolLM2-135M-Instruct (GGUF).
LLM_TASKS: tuple[str, ...] = ("sft", "arith")

#: Option values of a task when the command line and the config leave them unset (else the global defaults
#: in :data:`_GLOBAL_DEFAULTS`). ``arith`` is sized for a few minutes on a 2-core CPU: 400 training problems,
#: one epoch of batches of 4 (100 steps).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arith": {"batch_size": 4, "epochs": 1, "max_train_examples": 400},
    "sft": {"batch_size": 4, "epochs": 1},
}
_GLOBAL_DEFAULTS: dict[str, Any] = {"batch_size": 16, "epochs": 2}


def max_length_for(args: argparse.Namespace, task: str) -> int:
    """``--max-length`` if given, else the task's default (:data:`TASK_MAX_LENGTH`, :data:`DEFAULT_MAX_LENGTH`)."""
    if args.max_length is not None:
        return args.max_length
    return TASK_MAX_LENGTH.get(task, DEFAULT_MAX_LENGTH)


def csv_list(text: Any) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def int_list(text: Any, flag: str = "--seeds") -> list[int]:
    """Comma-separated integers (or a list / an int from a config) -> a list of ints."""
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    if isinstance(text, int):
        return [text]
    try:
        return [int(s) for s in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help states its default itself.

    Options whose default is ``None`` must say in their help what happens when they are not given;
    flags (``store_true``) show no default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


def _run_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="JSON or YAML file of option values (the command line overrides it)")
    g.add_argument("--method", default=None,
                   help=f"one or more (comma-separated) of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    g.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (one run per seed)")
    g.add_argument("--out-dir", default="runs", help="each run writes <out-dir>/<run-name>/")
    g.add_argument("--run-name", default=None,
                   help="prefix of the run directories (default: the task name); a run is <prefix>-<method>-s<seed>")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--checkpoint-dir", default=None,
                   help="save orbax training checkpoints under <dir>/<run-name>/ at the end of each epoch "
                        "(default: no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--resume", action="store_true", help="resume each run from its latest checkpoint")
    g.add_argument("--save-adapters", default=None,
                   help="write the trained adapters (orbax) to <dir>/<run-name> (default: not saved)")
    g.add_argument("--export-peft", default=None,
                   help="export the trained adapters in Hugging Face PEFT format to <dir>/<run-name> "
                        "(default: not exported)")


def _data_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory, or a GGUF file (default: the installed "
                        "all-MiniLM-L6-v2; SmolLM2-135M-Instruct GGUF for --task sft / arith)")
    g.add_argument("--task", default="bbc",
                   help="bbc; local (your own labelled files, see --data-files); glue:<task> (cola, sst2, mrpc, "
                        "qqp, stsb, mnli, qnli, rte); or a causal-LM task: sft (your instruction files) or arith "
                        "(embedded arithmetic word problems); comma-separated for several")
    g.add_argument("--data-files", default=None,
                   help="local files 'train=PATH,validation=PATH[,test=PATH]' (csv/tsv/jsonl/parquet) for --task "
                        "local / sft (without test, validation is also the final split) and glue:<task>; a config may "
                        "give {task: {split: path}} (default: none; bbc and glue read installed data)")
    g.add_argument("--text-column", default="text", help="--task local: the column holding the text")
    g.add_argument("--text-pair-column", default=None,
                   help="--task local: a second text column for sentence pairs (default: none)")
    g.add_argument("--label-column", default="label",
                   help="--task local: the column holding the label (strings or integers)")
    g.add_argument("--head", choices=("auto", "classifier", "seq2seq"), default="auto",
                   help="classification head (auto: seq2seq for T5, classifier otherwise)")
    g.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="BERT pooling for the classifier")
    g.add_argument("--prompt", default=None,
                   help="seq2seq input template with {column} fields; a config may give {task: template} "
                        "(default: none; needed with --head seq2seq)")
    g.add_argument("--label-words", default=None,
                   help="seq2seq target words, comma-separated, by label id; a config may give {task: [...]} "
                        "(default: the label names)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base model dtype")
    g.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per example, longer texts truncated (default: {TASK_MAX_LENGTH['bbc']} for bbc, the "
                        "headline and first sentence, which keeps the no-argument run quick; "
                        f"{TASK_MAX_LENGTH['arith']} for arith, {TASK_MAX_LENGTH['sft']} for sft (longer examples "
                        f"are dropped, see --on-overflow); {DEFAULT_MAX_LENGTH} otherwise)")
    g.add_argument("--max-per-class", type=int, default=40,
                   help="bbc: training articles per class (from the seeded 80%% train split)")
    g.add_argument("--eval-max-per-class", type=int, default=None,
                   help="bbc: cap on validation / test articles per class (default: no cap, ~42 per class)")
    g.add_argument("--max-train-examples", type=int, default=None,
                   help="glue: seeded subsample of the train split; sft / arith: its first N examples (default: all; "
                        "400 for arith)")
    g.add_argument("--max-eval-examples", type=int, default=None,
                   help="glue: seeded subsample of the eval split; sft / arith: the first N of each evaluation "
                        "split (default: all)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the data split / subsampling (fixed over seeds)")


def _instruction_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instruction data and generation (--task sft / arith)")
    g.add_argument("--prompt-column", default="prompt",
                   help="sft: the field holding the prompt; comma-separated names: the first one a record has "
                        "(query,question reads MetaMathQA and GSM8K files)")
    g.add_argument("--response-column", default="response",
                   help="sft: the field holding the response; comma-separated names as for --prompt-column "
                        "(response,answer for MetaMathQA and GSM8K)")
    g.add_argument("--messages-column", default="messages",
                   help="sft: the field holding a chat ([{role, content}, ...], the last turn the assistant's "
                        "response), used for records that have it instead of a prompt field")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt text (the turns' contents joined by blank lines) instead of applying "
                        "the tokenizer's chat template")
    g.add_argument("--prompt-template", default=None,
                   help="without a chat template: a text with {prompt} that each raw prompt is put into, e.g. the "
                        "Alpaca template of MetaMathQA (default: the raw prompt alone)")
    g.add_argument("--on-overflow", choices=("drop", "error"), default="drop",
                   help="an example longer than --max-length (prompt + response + EOS) is never cut: drop it "
                        "(each split reports the count and the rows) or stop with an error")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per answer in evaluation (default: 40 for arith, 256 for sft)")


def _training_group(p: argparse.ArgumentParser, *, with_lr: bool) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None,
                   help="passes over the training split (default: 2; 1 for sft / arith)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many batches (0: all epochs)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="training examples per batch (default: 16; 4 for sft / arith)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="batches whose gradients are averaged into one optimizer update (optax.MultiSteps): "
                        "the effective batch is grad-accum x batch-size; the schedule counts updates")
    g.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation batch")
    if with_lr:
        g.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate of the LoRA methods (default: {DEFAULT_LR}; not tuned per method: "
                            "python -m experiments.sweep tunes it)")
        g.add_argument("--full-lr", type=float, default=None,
                       help=f"peak learning rate of full fine-tuning (default: {DEFAULT_FULL_LR}; when only --lr is "
                            "given, full fine-tuning follows --lr, and the output says so)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="learning-rate decay after the warm-up (cosine and linear decay to 0 at the last step)")
    g.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="linear warm-up over ceil(ratio x steps) steps w, from peak/(w+1) at step 1 to the peak "
                        "(never 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (AdamW) weight decay")
    g.add_argument("--clip-norm", type=float, default=1.0, help="clip the raw gradients' global norm (0: off)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end of each epoch)")
    g.add_argument("--log-alignment-every", type=int, default=0,
                   help="every N steps (and at step 1) log to metrics.jsonl the cosine between the step's update of "
                        "the target kernels and the full fine-tuning gradient there (experiments.alignment; costs "
                        "one extra forward/backward per measurement; 0: off)")
    g.add_argument("--no-train-head", action="store_true",
                   help="freeze the classification head at its random initialisation, for every method (full "
                        "fine-tuning included): everything is learned through the encoder's weights")


def _lora_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA)")
    g.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                   help="alpha/sqrt(r) scaling (default: on for lora-ga, off otherwise)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    g.add_argument("--targets", default=None,
                   help="LoRA targets: a regex (full match on the dotted module path) or comma-separated "
                        "module-name suffixes (default: the model family's attention query/value)")
    g.add_argument("--lora-pro-form", choices=LORA_PRO_FORMS + ("full",), default="adamw",
                   help="LoRA-Pro form of --method lora-pro: adamw (the paper's AdamW with full-size moments; "
                        "lora_pro_adamw(form='full') in the library), efficient (low-rank Adam state), lean (ours), or "
                        "sgd (the paper's SGD form: plain SGD on the adjusted gradients; the head and other trained "
                        "leaves get plain SGD too). The same forms are methods of their own (--method lora-pro-sgd, "
                        "lora-pro-efficient, lora-pro-lean), for comparing them in one run. 'full' is a deprecated "
                        "spelling of adamw (not full fine-tuning, which is --method full)")
    g.add_argument("--x-mode", choices=("sylvester", "zero", "symmetry"), default="sylvester",
                   help="LoRA-Pro's free r x r matrix X: the Sylvester solution closest to the raw gradients (paper), "
                        "zero, or the symmetric choice")
    g.add_argument("--lora-plus-ratio", type=float, default=16.0, help="LoRA+: lr(B) / lr(A)")
    g.add_argument("--on-nonfinite", choices=("raise", "skip", "ignore"), default="raise",
                   help="a step with NaN/inf gradients or updates (every method): raise (stop with one line naming "
                        "the step and the parameters), skip (keep params and optimizer state, count it) or ignore")
    g.add_argument("--max-consecutive-skips", type=int, default=10,
                   help="with --on-nonfinite skip: stop after more than this many non-finite steps in a row")
    g.add_argument("--lora-ga-batches", type=int, default=4, help="LoRA-GA: batches for the gradient estimate")
    g.add_argument("--lora-ga-batch-size", type=int, default=None,
                   help="LoRA-GA: their size (default: --batch-size)")
    g.add_argument("--lora-ga-direction", choices=("ArB2r", "ArBr", "A2rBr", "random"), default="ArB2r",
                   help="LoRA-GA: which singular vectors initialise A and B")
    g.add_argument("--lora-ga-scale", choices=("stable", "gd", "unit"), default="stable",
                   help="LoRA-GA: factor c on A0 and B0: stable m^(1/4)/sqrt(gamma), gd 1/s, unit 1")
    g.add_argument("--lora-ga-gamma", type=float, default=16.0, help="LoRA-GA: gamma of the stable scaling")


def _rank_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PRILoRA / ALoRA")
    g.add_argument("--prilora-r-min", type=int, default=None, help="PRILoRA: rank of the first layer (default: rank/2)")
    g.add_argument("--prilora-r-max", type=int, default=None,
                   help="PRILoRA: rank of the last layer (default: 2 x rank - r_min)")
    g.add_argument("--prilora-final-fraction", type=float, default=0.5,
                   help="PRILoRA: fraction of each row of A pruned by the end of the schedule")
    g.add_argument("--prilora-start", type=float, default=0.1, help="PRILoRA: pruning starts at this fraction of steps")
    g.add_argument("--prilora-end", type=float, default=0.8, help="PRILoRA: pruning ends at this fraction of steps")
    g.add_argument("--prilora-every", type=int, default=0, help="PRILoRA: prune every N steps (0: about 8 times)")
    g.add_argument("--alora-max-rank", type=int, default=None, help="ALoRA: rank slots per module (default: 2 x rank)")
    g.add_argument("--alora-n-prune", type=int, default=None,
                   help="ALoRA: slots pruned (and re-allocated) per ALoRA step (default: budget/16)")
    g.add_argument("--alora-start", type=float, default=0.2, help="ALoRA: reallocation starts at this fraction of steps")
    g.add_argument("--alora-end", type=float, default=0.8, help="ALoRA: reallocation ends at this fraction of steps")
    g.add_argument("--alora-every", type=int, default=0, help="ALoRA: one step every N steps (0: about 4 steps)")


def add_run_arguments(p: argparse.ArgumentParser, *, with_lr: bool = True) -> argparse.ArgumentParser:
    """Add every single-run option (run, data, training, LoRA, PRILoRA / ALoRA groups) to ``p``."""
    _run_group(p)
    _data_group(p)
    _instruction_group(p)
    _training_group(p, with_lr=with_lr)
    _lora_group(p)
    _rank_group(p)
    return p


_FINETUNE_DESCRIPTION = """Fine-tune with LoRA / LoRA-Pro / LoRA-GA / LoRA+ / PRILoRA / ALoRA / full FT.

With no arguments it runs the embedded comparison offline: all-MiniLM-L6-v2 on BBC News (5 topics), LoRA,
LoRA-Pro and full fine-tuning on one seed at fixed learning rates, reporting test accuracy (about 2-3
minutes on a 2-core CPU). Every run writes <out-dir>/<run-name>/ (summary.json, metrics.jsonl)."""

_FINETUNE_EPILOG = """examples:
  python -m experiments.finetune                                   # the embedded BBC comparison
  python -m experiments.finetune --method lora-pro --seeds 0,1,2   # one method, three seeds
  python -m experiments.finetune --task local --data-files train=a.csv,validation=b.csv,test=c.csv \\
      --text-column text --label-column label                      # your own labelled files
  python -m experiments.sweep --help                               # tune each method's lr instead
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m experiments.finetune`` (every option has a default)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.finetune",
        description=_FINETUNE_DESCRIPTION,
        epilog=_FINETUNE_EPILOG,
        formatter_class=HelpFormatter,
    )
    return add_run_arguments(p)


def _load_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is a transformers dependency
            raise SystemExit(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml)") from e
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option names to values")
    return cfg


def _apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the values of the config file ``path`` the parser's defaults."""
    cfg = _load_config(path)
    dests = {a.dest for a in parser._actions}
    values, unknown = {}, []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        dest = key.replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            unknown.append(key)
        else:
            values[dest] = value
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}; valid: {sorted(dests - {'help', 'config'})}")
    parser.set_defaults(**values)


def _check_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from lorapro_jax.data import get_glue_task

    for t in args.tasks:
        if t not in ("bbc", "local") + LLM_TASKS and not t.startswith("glue:"):
            parser.error(f"--task: expected 'bbc', 'local', 'glue:<task>', 'sft' or 'arith', got {t!r}")
        if t in ("local", "sft") and not args.data_files:
            parser.error(f"--task {t} needs --data-files train=PATH,validation=PATH[,test=PATH]")
        if t.startswith("glue:"):
            try:
                get_glue_task(t.split(":", 1)[1])
            except ValueError as e:
                parser.error(f"--task: {e}")
    llm = [t for t in args.tasks if t in LLM_TASKS]
    if llm and len(llm) != len(args.tasks):
        parser.error(f"--task: causal-LM tasks {llm} and classification tasks cannot share one invocation")


def _fill_task_defaults(args: argparse.Namespace) -> None:
    """Options left unset take the first task's :data:`TASK_DEFAULTS`, else :data:`_GLOBAL_DEFAULTS`."""
    task = TASK_DEFAULTS.get(args.tasks[0], {}) if args.tasks else {}
    for key in set(task) | set(_GLOBAL_DEFAULTS):
        if getattr(args, key, None) is None:
            setattr(args, key, task.get(key, _GLOBAL_DEFAULTS.get(key)))


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check parsed options and add ``methods``, ``seed_list`` and ``tasks`` (lists)."""
    methods = args.method if isinstance(args.method, list) else csv_list(args.method or ",".join(DEFAULT_METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--method: unknown {bad}; expected some of {', '.join(METHODS)}")
    args.methods = methods
    try:
        args.seed_list = int_list(args.seeds)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.tasks = args.task if isinstance(args.task, list) else csv_list(args.task)
    _check_tasks(parser, args)
    _fill_task_defaults(args)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.lora_pro_form == "full":
        # FutureWarning: shown to command-line users by default (DeprecationWarning is not)
        warnings.warn("--lora-pro-form full is deprecated: it names LoRA-Pro's AdamW form, not full fine-tuning "
                      "(--method full); use --lora-pro-form adamw", FutureWarning, stacklevel=2)
        args.lora_pro_form = "adamw"
    if args.epochs < 1 or args.batch_size < 1 or args.rank < 1 or args.grad_accum < 1:
        parser.error("--epochs, --batch-size, --grad-accum and --rank must be positive")
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    return args


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse the CLI; values from ``--config`` become defaults that command-line options override.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        parser: the parser (default :func:`build_parser`; ``experiments.sweep`` passes its own).

    Raises:
        SystemExit: unknown config keys (the message lists the valid ones) or bad values.
    """
    parser = parser or build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        _apply_config(parser, first.config)
    return finish_args(parser, parser.parse_args(argv))
