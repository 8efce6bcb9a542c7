"""Learning curves on the built-in task (`python bench.py curves` or `python curves.py`): the paper's estimator
against its ablations and PPO, from the same starting point, several seeds each.

Trains on the built-in task (train.py's demo) and records learning curves of
  remax      --baseline greedy   ReMax: the greedy response's reward as the baseline
  reinforce  --baseline none     REINFORCE, no baseline
  rloo       --baseline rloo     RLOO with 2 samples per prompt (ReMax's generation cost)
  ppo        --algo ppo          PPO (DS-Chat step 3), critic initialised from the RM, kl_ctl = the same beta
from the same SFT policy, RM, prompts and train.py's DEMO_COMMON + DEMO_REMAX hyperparameters (read at run
time), --seeds seeds each, evaluated every --eval_every steps (greedy RM reward, gold score, KL to the SFT policy):
    python bench.py curves                          # 4 algos x 3 seeds on CPU; runs `python train.py` first if needed
    python bench.py curves --algos remax ppo --seeds 2 --max_steps 30 --demo_dir out/demo --out out/curves
Each (algo, seed) run is a `train.py --stage remax` subprocess writing <out>/<algo>_seed<seed>/ (metrics.jsonl,
train.log). Written: <out>/curves.jsonl (a row per algo, seed and step; seconds = cumulative t_gen + t_train,
evaluation excluded), <out>/summary.json (mean and std over seeds per algo), and <out>/curves.png when matplotlib
is importable (it is optional).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import machine

# name -> train.py flags on top of the shared ones; the order is the table's and the plot's.
CURVE_ALGOS = {"remax": dict(algo="remax", baseline="greedy"), "reinforce": dict(algo="remax", baseline="none"),
               "rloo": dict(algo="remax", baseline="rloo"), "ppo": dict(algo="ppo")}
CURVE_KEYS = ("reward_mean", "grad_norm", "eval/reward_greedy", "eval/gold_greedy", "eval/kl")
SUMMARY_KEYS = {"gold": "eval/gold_greedy", "reward": "eval/reward_greedy", "kl": "eval/kl"}
TRAIN_PY = Path(__file__).resolve().parent / "train.py"


def _flags(options: dict) -> list[str]:
    """{name: value} as train.py command-line flags (None: left at train.py's default)."""
    argv = []
    for k, v in options.items():
        if v is None:
            continue
        argv += [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return argv


def _finite(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _child_env(args) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):   # each run: its own world of 1
        env.pop(k, None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def demo_files(root: Path) -> dict:
    return {"policy": root / "sft" / "final", "reward_model": root / "rm" / "final",
            "data": root / "data" / "prompts.jsonl", "eval_data": root / "data" / "eval_prompts.jsonl"}


def ensure_demo(args) -> dict:
    """The demo's SFT policy, RM and prompts under --demo_dir; `python train.py --out_dir DIR` makes them if absent."""
    root = Path(args.demo_dir)
    files = demo_files(root)
    if not (files["policy"].is_dir() and files["reward_model"].is_dir()):
        print(f"curves: {files['policy']} or {files['reward_model']} missing: running the demo "
              f"(python train.py --out_dir {root}) first", flush=True)
        argv = [sys.executable, str(TRAIN_PY), "--out_dir", str(root), "--device", args.device]
        rc = subprocess.run(argv, env=_child_env(args)).returncode
        if rc != 0:
            raise SystemExit(f"bench.py curves: the demo (python train.py --out_dir {root}) failed, exit code {rc}")
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"bench.py curves: --demo_dir {root}: missing {', '.join(missing)}")
    return files


def curve_options(args, algo: str, seed: int) -> dict:
    """train.py's flags for one run: DEMO_COMMON + DEMO_REMAX (imported now: they are tuned elsewhere), then ours."""
    from train import DEMO_COMMON, DEMO_REMAX
    opts = {**DEMO_COMMON, **DEMO_REMAX, "max_steps": args.max_steps or DEMO_REMAX["max_steps"],
            "eval_every": args.eval_every, "gold": "synthetic"}
    opts.pop("max_len")                  # SFT/RM only: train.py --stage remax refuses it
    if args.smoke:                       # tiny batch, responses and eval: exercises the pipeline only
        opts.update(batch_size=4, max_new_tokens=4, eval_size=4, eval_every=1)
    opts.update(CURVE_ALGOS[algo], seed=seed, device=args.device, dtype=args.dtype)
    if algo == "ppo":
        # The critic's learning rate: --critic_lr, else DEMO_REMAX's critic_lr if it names one, else the policy's
        # (train.py's own default, 5e-6, is DS-Chat's for a 7B model: next to the demo's lr it leaves the critic as
        # it started, the RM).
        opts["critic_lr"] = args.critic_lr or DEMO_REMAX.get("critic_lr") or opts["lr"]
    else:
        opts.pop("critic_lr", None)
    return opts


def run_curve(args, files: dict, algo: str, seed: int) -> dict:
    """One `train.py --stage remax` subprocess; returns its run record (rows from its metrics.jsonl)."""
    out = args.out / f"{algo}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    opts = curve_options(args, algo, seed)
    argv = [sys.executable, str(TRAIN_PY), "--stage", "remax", *_flags({k: str(v) for k, v in files.items()}),
            "--out_dir", str(out), *_flags(opts)]
    t = time.perf_counter()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(argv, env=_child_env(args), stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    metrics = out / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    record = dict(algo=algo, seed=seed, out_dir=str(out), returncode=rc, wall_s=wall, options=opts,
                  argv=argv[1:], rows=rows)
    if rc != 0:
        tail = (out / "train.log").read_text()[-2000:]
        print(f"curves: {algo} seed {seed} FAILED (exit code {rc}); the end of {out / 'train.log'}:\n{tail}", flush=True)
    return record


def curve_rows(record: dict) -> list[dict]:
    """curves.jsonl rows of one run: step, cumulative training seconds and the metrics present at that step."""
    seconds, out = 0.0, []
    for r in sorted(record["rows"], key=lambda r: r["step"]):
        seconds += (_finite(r.get("t_gen")) or 0.0) + (_finite(r.get("t_train")) or 0.0)
        row = dict(algo=record["algo"], seed=record["seed"], step=r["step"], seconds=seconds)
        row.update({k: _finite(r[k]) for k in CURVE_KEYS if k in r})
        out.append(row)
    return out


def _mean_std(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return dict(mean=None, std=None, n=0)
    return dict(mean=statistics.fmean(xs), std=statistics.stdev(xs) if len(xs) > 1 else 0.0, n=len(xs))


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def summarize_curves(rows: list[dict], algos: list[str]) -> dict:
    """Per algo, mean and sample std over seeds of the final eval metrics, the mean grad norm, the seconds."""
    out = {}
    for algo in algos:
        runs = {}
        for r in rows:
            if r["algo"] == algo:
                runs.setdefault(r["seed"], []).append(r)
        per_seed = {k: [_last(rs, key) for rs in runs.values()] for k, key in SUMMARY_KEYS.items()}
        per_seed["grad_norm"] = [_mean_std([r.get("grad_norm") for r in rs])["mean"] for rs in runs.values()]
        per_seed["seconds"] = [rs[-1]["seconds"] if rs else None for rs in runs.values()]
        per_seed["steps"] = [rs[-1]["step"] if rs else None for rs in runs.values()]
        out[algo] = dict(seeds=sorted(runs), **{k: _mean_std(v) for k, v in per_seed.items()})
    # Step 0 is the SFT policy, the same for every run (greedy decoding: the same answers); the first run's.
    first = [r for r in rows if r["step"] == 0]
    start = {k: first[0].get(key) for k, key in SUMMARY_KEYS.items()} if first else {}
    return dict(algos=out, sft=start)


def plot_curves(rows: list[dict], algos: list[str], path: Path) -> str:
    """curves.png: mean over seeds with a min-max band; returns a one-line note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib for curves.png)"
    panels = [("step", "reward_mean", "training reward (RM, sampled)"),
              ("step", "eval/reward_greedy", "eval RM reward (greedy)"),
              ("step", "eval/gold_greedy", "eval gold score (greedy)"),
              ("seconds", "eval/gold_greedy", "eval gold score (greedy)"),
              ("step", "grad_norm", "policy gradient norm (before clipping)"),
              ("step", "eval/kl", "eval KL to the SFT policy")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (x, y, title) in zip(axes.flat, panels):
        lowest = math.inf
        for algo in algos:
            by_step = {}
            for r in rows:
                if r["algo"] == algo and r.get(y) is not None:
                    by_step.setdefault(r["step"], []).append(r)
            steps = sorted(by_step)
            if not steps:
                continue
            xs = [statistics.fmean(r[x] for r in by_step[s]) for s in steps]
            ys = [[r[y] for r in by_step[s]] for s in steps]
            lowest = min(lowest, *(min(v) for v in ys))
            line, = ax.plot(xs, [statistics.fmean(v) for v in ys], label=algo, marker="." if y.startswith("eval") else None)
            ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training seconds (mean over seeds)" if x == "seconds" else "step")
        ax.set_title(title)
        if y == "grad_norm" and 0 < lowest < math.inf:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("built-in task: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def run_curves(args) -> dict:
    from train import DEMO_COMMON, DEMO_REMAX
    t0, load0 = time.perf_counter(), os.getloadavg()
    algos = args.algos or (["remax", "ppo"] if args.smoke else list(CURVE_ALGOS))
    seeds = [args.seed + k for k in range(args.seeds)]
    files = ensure_demo(args)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (algo, seed) in enumerate((a, s) for a in algos for s in seeds):
        print(f"curves: [{i + 1}/{len(algos) * len(seeds)}] {algo} seed {seed} -> {args.out / f'{algo}_seed{seed}'}",
              flush=True)
        records.append(run_curve(args, files, algo, seed))
        rows = curve_rows(records[-1])
        if rows:
            g = lambda k: "-" if _last(rows, k) is None else f"{_last(rows, k):.3f}"
            print(f"curves:   {records[-1]['wall_s']:.0f} s; step {rows[-1]['step']}: eval gold {g('eval/gold_greedy')}, "
                  f"RM {g('eval/reward_greedy')}, KL {g('eval/kl')}", flush=True)
    rows = [r for rec in records for r in curve_rows(rec)]
    path = args.out / "curves.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    note = plot_curves(rows, algos, args.out / "curves.png")
    failed = [dict(algo=r["algo"], seed=r["seed"], returncode=r["returncode"], log=str(Path(r["out_dir"]) / "train.log"))
              for r in records if r["returncode"] != 0]
    opts = curve_options(args, algos[0], seeds[0])
    return dict(cmd="curves", device=args.device, machine=machine(args.device), dtype=args.dtype,
                threads=args.threads, torch=torch.__version__, demo_dir=str(args.demo_dir), seeds=seeds,
                smoke=args.smoke, max_steps=opts["max_steps"], eval_every=opts["eval_every"],
                batch_size=opts.get("batch_size"), demo_common=DEMO_COMMON, demo_remax=DEMO_REMAX,
                flags={a: {k: v for k, v in CURVE_ALGOS[a].items()} for a in algos},
                critic_lr=curve_options(args, "ppo", seeds[0])["critic_lr"],
                summary_stats="per algo: mean and sample std (n-1; 0 for one seed) over seeds of each run's last "
                              "eval (gold, RM reward of greedy answers, KL), its mean grad norm over steps and its "
                              "cumulative t_gen + t_train seconds",
                **summarize_curves(rows, algos), curves=str(path), plot=note, failed=failed,
                runs=[{k: r[k] for k in ("algo", "seed", "out_dir", "returncode", "wall_s")} for r in records],
                wall_s=time.perf_counter() - t0, loadavg_start=list(load0), loadavg_end=list(os.getloadavg()),
                cpus=os.cpu_count())


def print_curves(r: dict):
    print(f"\ncurves on the built-in task, {r['device']} ({r['machine']}): {len(r['seeds'])} seed(s) {r['seeds']}, "
          f"{r['max_steps']} steps of {r['batch_size']} prompts, eval every {r['eval_every']}; "
          f"wall {r['wall_s']:.0f} s, load average {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f} "
          f"on {r['cpus']} CPUs")
    f = lambda s: "-" if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"
    print(f"{'':11}{'gold (greedy)':>15}{'RM (greedy)':>15}{'KL':>15}{'grad norm':>15}{'train s':>13}")
    sft = r["sft"]
    if sft:
        g = lambda k: "-" if sft.get(k) is None else f"{sft[k]:.3f}"
        print(f"{'SFT':11}{g('gold'):>15}{g('reward'):>15}{g('kl'):>15}")
    for algo, s in r["algos"].items():
        sec = "-" if s["seconds"]["mean"] is None else f"{s['seconds']['mean']:.0f}±{s['seconds']['std']:.0f}"
        print(f"{algo:11}{f(s['gold']):>15}{f(s['reward']):>15}{f(s['kl']):>15}{f(s['grad_norm']):>15}{sec:>13}")
    print(f"mean±std over seeds; {r['curves']}; {r['plot']}")
    for x in r["failed"]:
        print(f"FAILED: {x['algo']} seed {x['seed']} (exit code {x['returncode']}), see {x['log']}")


def parse_args(argv=None):
    cur = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cur.add_argument("--algos", nargs="+", choices=list(CURVE_ALGOS), default=None,
                     help="default: all four (--smoke: remax ppo)")
    cur.add_argument("--seeds", type=int, default=3, help="runs per algorithm, seeds --seed, --seed + 1, ...")
    cur.add_argument("--seed", type=int, default=2023, help="the first seed (train.py's default: the demo's run)")
    cur.add_argument("--max-steps", "--max_steps", type=int, default=None, help="default: DEMO_REMAX's")
    cur.add_argument("--eval-every", "--eval_every", type=int, default=10)
    cur.add_argument("--critic-lr", "--critic_lr", type=float, default=None,
                     help="PPO's critic learning rate (default: DEMO_REMAX's critic_lr if set, else its lr)")
    cur.add_argument("--demo-dir", "--demo_dir", default="out/demo",
                     help="the layout `python train.py --out_dir DIR` writes (run first if sft/ or rm/ is missing)")
    cur.add_argument("--device", default="cpu")
    cur.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cur.add_argument("--threads", type=int, default=None, help="torch CPU threads of each run (default: torch's)")
    cur.add_argument("--out", default="out/curves", help="a folder; the JSON result is its summary.json")
    cur.add_argument("--smoke", action="store_true", help="two algorithms, one seed, two steps (tests)")
    args = cur.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_steps, args.threads = 1, 2, args.threads or 1
    if args.seeds < 1:
        cur.error("curves: --seeds must be >= 1")
    args.out = Path(args.out)
    return args


def main(argv=None) -> dict:
    result = run_curves(parse_args(argv))
    path = Path(result["curves"]).parent / "summary.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_curves(result)
    if result["failed"]:
        raise SystemExit(f"bench.py curves: {len(result['failed'])} run(s) failed (listed above; {path} written)")
    return result


if __name__ == "__main__":
    main()
