"""What a person sees while training: one progress bar carrying the loss and ranking accuracy, one short line
per logged step (a handful of numbers; everything is in metrics.jsonl), and the last step always logged."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback

from ..run_files import PADDING_SHARE, PAIRS_PER_SECOND, SHARE_MISRANKED


def _rate(v: float) -> str:  # 0.331, 52.4, 1234
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


# (metric, label, format) shown per logged training step
TRAIN_LINE = (("loss", "loss", "{:.4f}"), ("rewards/accuracies", "acc", "{:.2f}"), ("rewards/margins", "margin", "{:+.3f}"),
              (SHARE_MISRANKED, "grad on misranked", "{:.2f}"), ("learning_rate", "lr", "{:.2e}"),
              (PAIRS_PER_SECOND, "pairs/s", _rate), (PADDING_SHARE, "pad", "{:.0%}"))


def train_line(logs: dict, step: int, max_steps: int) -> str | None:
    if "loss" not in logs:
        return None
    parts = [f"{label} {fmt(logs[key]) if callable(fmt) else fmt.format(logs[key])}"
             for key, label, fmt in TRAIN_LINE if isinstance(logs.get(key), int | float)]
    return f"step {step}/{max_steps}  " + "  ".join(parts)


def eval_line(logs: dict, step: int) -> str | None:
    acc = next(((k, v) for k, v in logs.items() if k.endswith("ranking_accuracy") and k.startswith("eval")), None)
    if acc is None:
        return None
    name = acc[0][: -len("ranking_accuracy")].rstrip("_") or "eval"
    n = logs.get(acc[0].replace("ranking_accuracy", "n_pairs"))
    return f"step {step}  {name}: ranking accuracy {acc[1]:.3f}" + (f" ({n} pairs)" if n else "")


class Console(ProgressCallback):
    """transformers' progress bar, with short lines instead of the logs dict; plain lines without tqdm."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)
        if state.global_step == state.max_steps and not any(
            h.get("step") == state.global_step and "loss" in h for h in state.log_history
        ):
            control.should_log = True  # with max_steps < logging_steps no loss would be shown at all

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not args.disable_tqdm:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = train_line(logs, state.global_step, state.max_steps) or eval_line(logs, state.global_step)
        if line is None:
            return
        if self.training_bar is not None:
            if "loss" in logs:
                shown = {"loss": f"{logs['loss']:.4f}"}
                if isinstance(logs.get("rewards/accuracies"), int | float):
                    shown["acc"] = f"{logs['rewards/accuracies']:.2f}"
                self.training_bar.set_postfix(shown, refresh=False)
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

