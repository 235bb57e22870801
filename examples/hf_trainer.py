"""Bypass inside the Hugging Face Trainer: one callback, nothing else changes.

A tiny GPT-2 (random weights, no download) learns a toy next-token task with the Trainer's own
AdamW, linear schedule, gradient accumulation and checkpoints. ``BypassCallback`` extends the
model in place when the loss plateaus (here also forced at step 5, so the run shows a cycle),
folds the branches back into GPT-2's own Conv1D weights, and keeps the cycle only if the mean
training loss beat the pre-extension model's. Runs in well under a minute on CPU:

    pip install 'morphc[hf]'
    python examples/hf_trainer.py
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import morphc  # noqa: E402
from morphc.integrations.hf import BypassCallback  # noqa: E402


class Counting(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary: next token = this token + 1."""

    def __init__(self, n=256, length=16, vocab=32):
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    keys = list(model.state_dict())
    callback = BypassCallback(morphc.Plateau(window=10) | morphc.Schedule(at=[5]),
                              bypass_steps=6, return_steps=6, width=4)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=40, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=2, learning_rate=3e-3,
                                 save_steps=20, report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=10, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Counting(),
                          callbacks=[callback])
        trainer.train()
        print("checkpoints:", sorted(os.listdir(out)))
    for event in callback.history:
        print({k: event[k] for k in ("event", "step", "loss_before", "loss_after", "deviation",
                                     "reason") if event.get(k) is not None})
    print("same object, same keys:", trainer.model is model and list(model.state_dict()) == keys)


if __name__ == "__main__":
    main()
