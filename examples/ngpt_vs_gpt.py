"""nGPT vs a pre-norm GPT at small scale: does nGPT reach the same held-out loss in fewer steps?

A CPU-sized reproduction of the central claim of nGPT (Loshchilov et al., arXiv 2410.01131).

What it does:
  * Builds a byte-level corpus (vocab 256) at run time from a fixed, sorted list of Python
    standard-library sources read from the running interpreter (no downloads); the last 10% of
    the bytes are held out.
  * Trains the pre-norm GPT of examples/gpt.py (AdamW, weight decay 0.1, linear warmup then cosine
    decay to 0) and torchext.nn.NGPT (Adam, no weight decay, no warmup, cosine decay to 0, weights
    put back on the sphere after every step), both with betas (0.9, 0.95) and grad clip 1.0, at the
    same width, depth, heads, d_mlp, context and batch, so at equal token budgets.
  * Sweeps the peak learning rate of each model and evaluates the held-out loss periodically on
    the same fixed held-out windows.

What it measures (printed, and saved to <out>/ngpt_vs_gpt.json with a plot ngpt_vs_gpt.png):
  * the best learning rate of each model (lowest final held-out loss) and its final held-out loss;
  * the step at which GPT's best run reaches nGPT's final held-out loss (linear interpolation
    between evaluations), or a plain statement that it never does within the budget; and the
    converse, the step at which nGPT's best run reaches GPT's final loss;
  * training time per step of each model and the total wall time.

Caveat: "steps to reach" is read off one cosine run per model, not off separate runs per budget as
in the paper. A point in the middle of a run is worse than the end of a run whose schedule ends
there, so reading GPT's curve overstates nGPT's advantage, and reading nGPT's curve (the converse)
understates it: the true ratio lies between the two when both exist.

Run (measured on 2 CPU cores: 380 s at the default size; --quick, a smoke run, 15 s):
    .venv/bin/python examples/ngpt_vs_gpt.py
    .venv/bin/python examples/ngpt_vs_gpt.py --quick
    .venv/bin/python examples/ngpt_vs_gpt.py --steps 2000 --d-model 128 --layers 3 --out /tmp/bigger
"""

import argparse
import itertools
import json
import math
import multiprocessing
import platform
import sysconfig
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; write the PNG only
import matplotlib.pyplot as plt
import torch
from gpt import GPT, GPTConfig, adamw_param_groups  # examples/gpt.py, next to this file

from torchext.nn import NGPT, NGPTConfig, renormalize_after_step

# Stdlib source files present in CPython 3.9-3.13; any missing one is skipped (the JSON lists the files used).
CORPUS_FILES = sorted([
    "argparse.py", "ast.py", "asyncio/base_events.py", "bisect.py", "calendar.py", "codecs.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "csv.py", "dataclasses.py", "difflib.py",
    "doctest.py", "email/message.py", "enum.py", "fractions.py", "ftplib.py", "functools.py", "gettext.py",
    "heapq.py", "http/client.py", "imaplib.py", "inspect.py", "ipaddress.py", "json/decoder.py",
    "json/encoder.py", "locale.py", "logging/__init__.py", "mailbox.py", "mimetypes.py", "optparse.py", "os.py",
    "pickle.py", "platform.py", "plistlib.py", "pprint.py", "pstats.py", "pydoc.py", "random.py", "selectors.py",
    "shlex.py", "shutil.py", "smtplib.py", "socket.py", "socketserver.py", "ssl.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py",
    "trace.py", "traceback.py", "turtle.py", "typing.py", "unittest/case.py", "urllib/parse.py", "uuid.py",
    "weakref.py",
])
HELD_OUT_FRACTION = 0.1
BETAS = (0.9, 0.95)
GPT_WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (both models)")
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    # Peak LRs bracketing each model's optimum at the default size, found by wider sweeps (GPT 1e-3..1e-2,
    # nGPT 1e-3..4e-2). nGPT's is ~7x GPT's here: its scales (s_z above all) learn at lr * sqrt(d_model),
    # which at d_model 96 is far slower than at the paper's 1024, so short runs need a larger global LR.
    p.add_argument("--lrs-ngpt", type=float, nargs="+", default=[1e-2, 2e-2, 4e-2])
    p.add_argument("--lrs-gpt", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    p.add_argument("--warmup", type=float, default=0.05, help="GPT warmup, as a fraction of --steps")
    p.add_argument("--evals", type=int, default=24, help="held-out evaluations per run (plus one at step 0)")
    p.add_argument("--eval-batches", type=int, default=8, help="fixed held-out batches per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2,
                   help="runs trained in parallel, one thread each (faster than 2 threads per run on 2 cores, "
                        "and far less sensitive to other processes competing for the cores)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 40 steps, one LR each")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default examples/results, or examples/results/quick with --quick)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.d_model, args.evals, args.eval_batches = 40, 64, 4, 2
        args.lrs_ngpt, args.lrs_gpt = args.lrs_ngpt[1:2], args.lrs_gpt[1:2]
    results = Path(__file__).resolve().parent / "results"
    args.out = args.out or (results / "quick" if args.quick else results)
    return args


def build_corpus() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train bytes, held-out bytes, files used): the sources concatenated in sorted order, split at 90%."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    used = [name for name in CORPUS_FILES if (stdlib / name).is_file()]
    data = b"".join((stdlib / name).read_bytes() for name in used)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # uint8: cheap to send to the workers
    split = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return tokens[:split], tokens[split:], used


def held_out_batches(held_out: torch.Tensor, n_batches: int, batch: int, context: int) -> list[tuple]:
    """Fixed (x, y) batches of windows evenly spaced over the held-out bytes: every evaluation sees the same ones."""
    starts = torch.linspace(0, len(held_out) - context - 1, n_batches * batch).long()
    windows = torch.stack([held_out[s:s + context + 1] for s in starts.tolist()]).long()
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


def train_batch(train: torch.Tensor, batch: int, context: int, generator: torch.Generator) -> tuple:
    """A batch of random training windows; the generator is seeded per run, so both models see the same data."""
    starts = torch.randint(0, len(train) - context - 1, (batch,), generator=generator)
    windows = torch.stack([train[s:s + context + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps (none for nGPT), then cosine decay from `peak` to 0 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def make_model(kind: str, args: argparse.Namespace, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its optimizer, each set up as its paper recommends."""
    shape = {"vocab_size": 256, "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
             "max_seq_len": args.context}
    if kind == "gpt":
        model = GPT(GPTConfig(**shape))
        return model, torch.optim.AdamW(adamw_param_groups(model, GPT_WEIGHT_DECAY), lr=lr, betas=BETAS)
    model = NGPT(NGPTConfig(**shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS)  # nGPT: no weight decay
    renormalize_after_step(optimizer, model)  # the retraction: matrices back on the unit sphere after each step
    return model, optimizer


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[tuple]) -> float:
    return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


def train_run(task: tuple) -> dict:
    """One run, in a worker process: held-out curve, mean train loss since the previous evaluation, ms/step."""
    kind, lr, args, train, eval_batches = task
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # same init seed for every run; data order from its own generator below
    generator = torch.Generator().manual_seed(args.seed)
    model, optimizer = make_model(kind, args, lr)
    warmup = round(args.warmup * args.steps) if kind == "gpt" else 0
    eval_steps = {round(i * args.steps / args.evals) for i in range(args.evals + 1)}
    curve = {"step": [], "held_out": [], "train": []}
    train_losses, train_seconds = [], 0.0
    for step in range(args.steps + 1):
        if step in eval_steps:
            curve["step"].append(step)
            curve["held_out"].append(held_out_loss(model, eval_batches))
            curve["train"].append(sum(train_losses) / len(train_losses) if train_losses else None)
            train_losses = []
        if step == args.steps:
            break
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, lr, warmup)
        x, y = train_batch(train, args.batch, args.context, generator)
        loss = model(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        train_seconds += time.perf_counter() - start
        train_losses.append(loss.item())
    ms_per_step = 1000 * train_seconds / args.steps
    print(f"  {kind:4s} lr {lr:.1e}: final held-out {curve['held_out'][-1]:.4f}  ({ms_per_step:.0f} ms/step)",
          flush=True)
    return {"model": kind, "lr": lr, "warmup_steps": warmup, "ms_per_step": ms_per_step,
            "final_held_out": curve["held_out"][-1], **curve}


def steps_to_reach(run: dict, target: float) -> float | None:
    """First step at which the run's held-out curve is <= target, interpolated linearly; None if never."""
    points = list(zip(run["step"], run["held_out"]))
    if points[0][1] <= target:
        return float(points[0][0])
    for (s0, l0), (s1, l1) in itertools.pairwise(points):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def compare(runs: list[dict], steps: int) -> dict:
    """Best run per model, and how many steps each best run needs to reach the other's final loss."""
    best = {kind: min((r for r in runs if r["model"] == kind), key=lambda r: r["final_held_out"])
            for kind in ("gpt", "ngpt")}
    gpt_steps = steps_to_reach(best["gpt"], best["ngpt"]["final_held_out"])
    ngpt_steps = steps_to_reach(best["ngpt"], best["gpt"]["final_held_out"])
    return {
        "best_lr": {kind: r["lr"] for kind, r in best.items()},
        "final_held_out": {kind: r["final_held_out"] for kind, r in best.items()},
        "ms_per_step": {kind: r["ms_per_step"] for kind, r in best.items()},
        "gpt_steps_to_ngpt_final": gpt_steps,
        "ngpt_steps_to_gpt_final": ngpt_steps,
        # GPT steps / nGPT steps to the same loss (> 1: nGPT is faster); None where the curve never gets there
        "step_ratio": gpt_steps / steps if gpt_steps is not None else None,
        "step_ratio_converse": steps / ngpt_steps if ngpt_steps is not None else None,
    }


def summary_lines(result: dict, args: argparse.Namespace) -> list[str]:
    r, steps = result["comparison"], args.steps
    gpt_final, ngpt_final = r["final_held_out"]["gpt"], r["final_held_out"]["ngpt"]
    ms = r["ms_per_step"]
    lines = [
        (f"budget: {steps} steps x {args.batch} seq x {args.context} bytes = {steps * args.batch * args.context:,} "
         f"tokens per run; d_model {args.d_model}, {args.layers} layers, {args.heads} heads; "
         f"ms/step with 1 thread per run, {args.workers} runs at a time"),
        f"best GPT  lr {r['best_lr']['gpt']:.1e}: final held-out loss {gpt_final:.4f}  ({ms['gpt']:.0f} ms/step)",
        f"best nGPT lr {r['best_lr']['ngpt']:.1e}: final held-out loss {ngpt_final:.4f}  ({ms['ngpt']:.0f} ms/step)",
    ]
    if r["gpt_steps_to_ngpt_final"] is None:
        lines.append(f"GPT never reaches nGPT's final loss {ngpt_final:.4f} within the {steps}-step budget.")
    else:
        lines.append(f"GPT reaches nGPT's final loss {ngpt_final:.4f} at step {r['gpt_steps_to_ngpt_final']:.0f} "
                     f"(nGPT: {steps}): GPT/nGPT steps = {r['step_ratio']:.2f}")
    if r["ngpt_steps_to_gpt_final"] is None:
        lines.append(f"nGPT never reaches GPT's final loss {gpt_final:.4f} within the {steps}-step budget.")
    else:
        lines.append(f"nGPT reaches GPT's final loss {gpt_final:.4f} at step {r['ngpt_steps_to_gpt_final']:.0f} "
                     f"(GPT: {steps}): GPT/nGPT steps = {r['step_ratio_converse']:.2f}")
    lines.append("(GPT/nGPT steps > 1: nGPT needs fewer steps to the same held-out loss)")
    return lines


def plot(result: dict, path: Path) -> None:
    """Held-out loss curves of every run; the best run of each model drawn thick."""
    fig, ax = plt.subplots(figsize=(8, 5))
    best_lr = result["comparison"]["best_lr"]
    for kind, name, colormap in (("gpt", "GPT", plt.cm.Blues), ("ngpt", "nGPT", plt.cm.Reds)):
        runs = sorted((run for run in result["runs"] if run["model"] == kind), key=lambda run: run["lr"])
        for i, run in enumerate(runs):  # darker = higher learning rate
            is_best = run["lr"] == best_lr[kind]
            ax.plot(run["step"], run["held_out"], color=colormap(0.45 + 0.5 * i / max(1, len(runs) - 1)),
                    lw=2.4 if is_best else 1.0, label=f"{name} lr {run['lr']:.1e}{' (best)' if is_best else ''}")
    for kind, color in (("gpt", "tab:blue"), ("ngpt", "tab:red")):  # the losses the step counts are read at
        ax.axhline(result["comparison"]["final_held_out"][kind], color=color, lw=0.6, ls=":")
    finals = [run["final_held_out"] for run in result["runs"]]
    ax.set_ylim(min(finals) - 0.05, max(finals) + 1.0)  # the step-0 loss (ln 256 = 5.5) would squash the curves
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"nGPT vs GPT, byte-level stdlib corpus, d_model {result['config']['d_model']}, "
                 f"{result['config']['layers']} layers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    train, held_out, files = build_corpus()
    print(f"corpus: {len(files)} stdlib files, {len(train):,} train / {len(held_out):,} held-out bytes; "
          f"{len(args.lrs_gpt) + len(args.lrs_ngpt)} runs on {args.workers} workers of 1 thread", flush=True)
    eval_batches = held_out_batches(held_out, args.eval_batches, args.batch, args.context)
    tasks = [(kind, lr, args, train, eval_batches)
             for kind, lrs in (("gpt", args.lrs_gpt), ("ngpt", args.lrs_ngpt)) for lr in lrs]
    # spawn, not fork: a forked child of a process that has used OpenMP can hang
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(train_run, tasks, chunksize=1)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "corpus": {"files": files, "train_bytes": len(train), "held_out_bytes": len(held_out),
                         "python": platform.python_version()},
              "torch": torch.__version__, "threads_per_run": 1,
              "runs": runs, "comparison": compare(runs, args.steps)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "ngpt_vs_gpt.png")
    result["wall_seconds"] = time.perf_counter() - started
    (args.out / "ngpt_vs_gpt.json").write_text(json.dumps(result, indent=1))
    print("\n== summary ==")
    for line in summary_lines(result, args):
        print(line)
    print(f"results: {args.out / 'ngpt_vs_gpt.json'}, {args.out / 'ngpt_vs_gpt.png'}")
    print(f"wall time: {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
