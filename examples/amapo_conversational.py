"""AMaPO on a conversational dataset (message lists rendered with the tokenizer's chat template).

    python examples/amapo_conversational.py                                # SmolLM2 + UltraFeedback from the hub
    python examples/amapo_conversational.py --model ../shared/models/stories260K \
        --dataset ../shared/data/ultrafeedback/test_prefs_500.jsonl --max_steps 2   # offline, tiny
"""

import argparse

from datasets import load_dataset

from prefalign import PreferenceConfig, PreferenceTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
parser.add_argument("--dataset", default="HuggingFaceH4/ultrafeedback_binarized")
parser.add_argument("--output_dir", default="runs/amapo-chat")
parser.add_argument("--max_steps", type=int, default=100)
parser.add_argument("--chat_template", default=None, help="for a tokenizer without one")
cli = parser.parse_args()

if cli.dataset.endswith((".json", ".jsonl")):
    data = load_dataset("json", data_files=cli.dataset, split="train")
else:
    data = load_dataset(cli.dataset, split="train_prefs")
data = data.select(range(min(64, len(data)))).train_test_split(test_size=16, seed=0)

args = PreferenceConfig(
    output_dir=cli.output_dir,
    loss_type="amapo",
    beta=2.0,  # as AMaPO's official recipes (recipes/official/)
    max_length=256,
    per_device_train_batch_size=8,  # AMaPO's margin statistics pool one micro-batch: keep it at 8 or more
    learning_rate=1e-5,
    max_steps=cli.max_steps,
    logging_steps=1,
    report_to="none",
    chat_template=cli.chat_template,
)
trainer = PreferenceTrainer(model=cli.model, args=args, train_dataset=data["train"], eval_dataset=data["test"])
trainer.train()
print({k: v for k, v in trainer.evaluate().items() if "accuracy" in k})
trainer.save_model()
