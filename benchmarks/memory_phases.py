"""Peak memory of a prefalign training run by phase, against a plain loop doing the same work (the floor).

    python benchmarks/memory_phases.py                               # AMaPO, SmolLM2-135M fp32, batch 4, 3 steps
    python benchmarks/memory_phases.py --losses amapo,dpo --steps 1  # one step: before AdamW's states exist
    python benchmarks/memory_phases.py --model ../shared/models/stories260K --steps 2   # a smoke test

Every configuration runs in its own fresh process; "peak" is that process's ru_maxrss (Linux, so a peak is
never lowered by what is freed later) read at the end of each phase: after the model is loaded, after the
trainer is built (tokenized data, the start-up self-check), when training begins (after the reference pass
of `reference: precomputed`), after step 1 and after the last step. "now" is the resident set at that moment
(VmRSS: glibc keeps freed heap pages, so it is an upper bound on what is live). After the last step the
script also counts the non-parameter tensors Python can still reach (`gc`): with AdamW that should be its two
states (2 × the parameters' bytes); anything more is kept across steps.

The floor is the same model, batches (the trainer's own dataloader), forward (`pair_logps`) and fused AdamW
in a bare loop with a SimPO-like loss: weights + gradients + 2 AdamW states + one step's activations. What the
trainer's peak holds above it is prefalign's (or transformers.Trainer's) own. The step-1 peak comes before
the optimizer's first step allocates AdamW's states, so the second step's peak is higher by about their size
in any trainer, this floor included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "MEMORY_RESULT "


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def now_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def live_tensor_mb() -> float:
    """Bytes of the distinct storages of the non-parameter tensors Python can reach (gradients are reached
    only through their parameters, so they are not in it)."""
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - meta/fake tensors and the like
            continue
    return total / 2**20


def child(spec: dict) -> None:
    import torch
    from transformers import TrainerCallback

    from prefalign.config import load_config
    from prefalign.models import load_model, load_tokenizer
    from prefalign.training.pipeline import build_trainer, prepare_data

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    phases: list[tuple[str, float, float]] = []

    def mark(name):
        phases.append((name, peak_mb(), now_mb()))

    overrides = {
        "model_name_or_path": spec["model"], "dataset": spec["data"], "output_dir": spec["workdir"],
        "loss_type": spec["loss"], "use_cpu": True, "report_to": "none", "save_strategy": "no", "eval_strategy": "no",
        "logging_steps": 10_000, "disable_tqdm": True, "seed": 0, "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": 1e-5, "max_steps": spec["steps"],
        "max_length": spec["max_length"], "max_prompt_length": spec["max_prompt_length"],
        "train_sampling_strategy": "sequential", "ref_cache_dir": str(Path(spec["workdir"]) / "ref-cache"),
    }
    overrides.update(spec.get("overrides") or {})
    cfg = load_config(None, overrides)
    tok = load_tokenizer(spec["model"])
    model = load_model(spec["model"], dtype=torch.float32)
    mark("model loaded")
    trainer = build_trainer(cfg, model, tok, prepare_data(cfg, tok))
    mark("trainer built")
    params = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20

    if spec["floor"]:
        from prefalign.modeling import pair_logps

        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                      weight_decay=0.0, fused=True)
        mark("training begins")
        for step, batch in enumerate(trainer.get_train_dataloader(), start=1):
            b = batch["row_index"].shape[0]
            mean = pair_logps(model, batch).mean
            loss = -torch.nn.functional.logsigmoid(2.0 * (mean[:b] - mean[b:]) - 1.0).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss, mean
            if step in (1, spec["steps"]):
                mark(f"after step {step}")
            if step == spec["steps"]:
                break
    else:
        class Phases(TrainerCallback):  # added last: runs after the reference pass's on_train_begin
            def on_train_begin(self, args, state, control, **kwargs):
                mark("training begins")

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (1, state.max_steps):
                    mark(f"after step {state.global_step}")

        trainer.add_callback(Phases())
        trainer.train()
    out = {"phases": phases, "live_tensors_mb": live_tensor_mb(), "params_mb": params,
           "optim": "fused AdamW" if spec["floor"] else str(getattr(trainer.args.optim, "value", trainer.args.optim))}
    print(RESULT + json.dumps(out), flush=True)


def run(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"error": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--losses", default="amapo", help="comma-separated prefalign loss types, each at its defaults")
    ap.add_argument("--no-floor", action="store_true", help="skip the plain-loop floor")
    ap.add_argument("--prefix-sharing", choices=["default", "false"], default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_trainers import HH, prepare_pairs

    if not HH.exists():
        raise SystemExit(f"{HH} is needed; see shared/README.md")
    results = {}
    with tempfile.TemporaryDirectory(prefix="prefalign-memory-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        prepare_pairs(args.model, args.batch * args.steps, args.max_length, args.max_prompt_length, data)
        base = {"model": args.model, "data": str(data), "batch": args.batch, "steps": args.steps,
                "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "threads": args.threads,
                "overrides": {} if args.prefix_sharing == "default" else {"prefix_sharing": False}}
        names = [(f"prefalign {loss}", {"loss": loss, "floor": False}) for loss in args.losses.split(",")]
        if not args.no_floor:
            names.append(("floor: bare loop", {"loss": "simpo", "floor": True}))
        for name, extra in names:
            workdir = Path(tmp) / name.replace(" ", "-").replace(":", "")
            workdir.mkdir()
            results[name] = run({**base, **extra, "workdir": str(workdir)}, args.timeout)
    print(f"\npeak RSS by phase, MB (now = resident at that moment): {args.model} fp32, batch {args.batch}, "
          f"max_length {args.max_length}, {args.steps} steps")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:18} FAILED {r['error']}")
            continue
        cells = "  ".join(f"{phase}: {peak:.0f} (now {now:.0f})" for phase, peak, now in r["phases"])
        print(f"{name:18} {cells}")
        print(f"{'':18} live non-parameter tensors after the last step: {r['live_tensors_mb']:.0f} MB "
              f"({r['live_tensors_mb'] / r['params_mb']:.2f}x the parameters; {r['optim']}: 2.00x expected)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
