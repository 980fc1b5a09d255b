"""DPO with a reference model and LoRA, written the TRL way.

    python examples/dpo_reference_lora.py                                  # SmolLM2 + UltraFeedback from the hub
    python examples/dpo_reference_lora.py --model ../shared/models/stories260K \
        --dataset ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz --max_steps 2   # offline, tiny
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign import PreferenceConfig, PreferenceTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
parser.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized")
parser.add_argument("--output_dir", default="runs/dpo-lora")
parser.add_argument("--max_steps", type=int, default=100)
cli = parser.parse_args()

if cli.dataset.endswith((".json", ".jsonl", ".jsonl.gz")):
    data = load_dataset("json", data_files=cli.dataset, split="train")
else:
    data = load_dataset(cli.dataset, split="train")
data = data.select(range(min(64, len(data)))).train_test_split(test_size=16, seed=0)

tokenizer = AutoTokenizer.from_pretrained(cli.model)
model = AutoModelForCausalLM.from_pretrained(cli.model)
args = PreferenceConfig(
    output_dir=cli.output_dir,
    loss_type="sigmoid",  # TRL's name for DPO
    beta=0.1,
    max_length=256,
    per_device_train_batch_size=4,
    learning_rate=5e-5,
    max_steps=cli.max_steps,
    logging_steps=1,
    report_to="none",
)
trainer = PreferenceTrainer(
    model=model,
    args=args,
    train_dataset=data["train"],
    eval_dataset=data["test"],
    processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)  # with LoRA the reference is the model with its adapters disabled (no second copy)
trainer.train()
print(trainer.evaluate())
trainer.save_model()
