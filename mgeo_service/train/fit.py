"""The fine-tuning loop both stages share: length-bucketed batches, AdamW, optional distillation.

An example is ``(input_ids, token_type_ids, label, soft)``: ``label`` is -1 for a pair only the
teacher labels, ``soft`` the teacher's logits, or None for a pair the teacher never scored.
"""
from __future__ import annotations

import logging
import math
import os
import random
from typing import Callable, Sequence

import numpy as np
import torch

from ..checkpoint import LABELS, canonical_order
from ..dataset import LabelledPair
from ..evaluation import classification_report
from ..progress import progress_bar

log = logging.getLogger(__name__)

EncodePairs = Callable[[list[str], list[str]], list[tuple[list[int], list[int]]]]


def encode(encode_pairs: EncodePairs, pairs: Sequence[LabelledPair], order: str,
           soft: Callable[[str, str], np.ndarray | None] | None = None) -> list[tuple]:
    """Examples for ``pairs``, each read in ``order``: "given", "both" (as given, then reversed) or
    "canonical" (the smaller address first, as a model served in canonical order reads it)."""
    if order == "canonical":
        ordered = [(*canonical_order(p.address1, p.address2), p.label) for p in pairs]
    else:
        ordered = [(p.address1, p.address2, p.label) for p in pairs]
    if order == "both":
        ordered += [(b, a, label) for a, b, label in ordered]
    tokens = encode_pairs([a for a, _, _ in ordered], [b for _, b, _ in ordered])
    examples = [(ids, types, label, soft(a, b) if soft else None)
                for (ids, types), (a, b, label) in zip(tokens, ordered)]
    if any(label < 0 and logits is None for _, _, label, logits in examples):
        raise KeyError("an unlabelled pair without a soft label: re-run `mgeo-service train --stage teacher` "
                       "with --unlabelled at least the student's")
    return examples


def batches(examples, batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Length-bucketed batches: shuffled within pools of 50 batches when training."""
    order = list(range(len(examples)))
    if rng:
        rng.shuffle(order)
    pool = batch_size * 50
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: len(examples[i][0]))
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng:
        rng.shuffle(out)
    return out


def collate(examples, index, device):
    width = max(len(examples[i][0]) for i in index)
    ids = torch.zeros((len(index), width), dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(index):
        input_ids, type_ids = examples[i][0], examples[i][1]
        ids[row, :len(input_ids)] = torch.tensor(input_ids)
        types[row, :len(type_ids)] = torch.tensor(type_ids)
        mask[row, :len(input_ids)] = 1
    labels = torch.tensor([examples[i][2] for i in index])
    # Rows the teacher never scored get NaN, so the loss can tell them apart.
    soft = torch.tensor(np.stack([examples[i][3] if examples[i][3] is not None else np.full(len(LABELS), np.nan)
                                  for i in index]), dtype=torch.float32)
    return ids.to(device), types.to(device), mask.to(device), labels.to(device), soft.to(device)


@torch.inference_mode()
def logits_of(model, examples, device="cpu", batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = torch.zeros((len(examples), len(LABELS)))
    for index in batches(examples, batch_size, None):
        ids, types, mask, _, _ = collate(examples, index, device)
        with autocast(device):
            out[index] = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.float().cpu()
    return out


def autocast(device):
    """bf16 on a GPU and on a CPU with AMX (1.7x fp32's training steps on a 2-core Xeon); elsewhere fp32,
    since a CPU without AMX runs bf16 slower than fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16,
                          enabled=kind == "cuda" or (kind == "cpu" and torch.cpu._is_amx_tile_supported()))


def macro_f1(logits: torch.Tensor, labels: list[int], bias=None) -> float:
    scores = logits if bias is None else logits + torch.tensor(bias)
    return classification_report(labels, scores.argmax(-1).tolist())["macro_f1"]


def calibrate_bias(logits: torch.Tensor, labels: list[int]) -> list[float]:
    """Output biases (not_match fixed at 0) that maximise macro-F1, on a coarse grid."""
    grid = [x / 4 for x in range(-12, 13)]
    best = max(((0.0, b1, b2) for b1 in grid for b2 in grid),
               key=lambda bias: (macro_f1(logits, labels, bias), -abs(bias[1]) - abs(bias[2])))
    return list(best)


def class_weights(examples) -> torch.Tensor:
    """Inverse square root of each label's frequency among the labelled examples, mean 1."""
    counts = np.bincount([e[2] for e in examples if e[2] >= 0], minlength=len(LABELS))
    weights = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    return weights / weights.mean()


def example_losses(logits, labels, soft, weights, alpha: float, temperature: float,
                   undistilled_weight: float = 1.0) -> torch.Tensor:
    """Each example's loss, as ``fit`` describes it; ``soft`` is NaN where the teacher never scored."""
    targets = labels.clamp(min=0)  # unlabelled rows (-1) get a target, then a hard loss of 0
    hard = torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights[targets] * (labels >= 0)
    if not alpha:
        return hard
    distilled = ~soft.isnan().any(-1)
    teacher = torch.softmax(soft.nan_to_num() / temperature, dim=-1)
    student = torch.log_softmax(logits / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(student, teacher, reduction="none").sum(-1) * temperature ** 2
    return torch.where(distilled, alpha * kl + (1 - alpha) * hard, undistilled_weight * hard)


def fit(model, train_set, val_set, val_labels: list[int], *, epochs: int, batch_size: int,
        learning_rate: float, seed: int, device="cpu", alpha: float = 0.0, temperature: float = 2.0,
        undistilled_weight: float = 1.0, name: str = "model", resume: str | None = None, save_every: int = 200) -> dict:
    """Fine-tune in place; the epoch best on validation macro-F1 is loaded back at the end.

    Each example's loss is ``alpha * KL(teacher || student) * T^2 + (1 - alpha) * cross-entropy``
    (weighted by class); an unlabelled example has only the first term, and one the teacher never
    scored only the second, times ``undistilled_weight``. A batch's loss is their mean.

    With ``resume``, everything the rest of the run depends on (weights, optimiser, schedule, both
    random states, the batches done, the best epoch so far) is saved there every ``save_every``
    batches and after each epoch, and a run that finds the file goes on from it, to the same result
    as one uninterrupted run; the file is removed at the end.
    """
    model.to(device)
    weights = class_weights(train_set).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    rng = random.Random(seed)
    total_steps = math.ceil(len(train_set) / batch_size) * epochs
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / (total_steps - warmup))))
    progress = {"run": {"examples": len(train_set), "epochs": epochs, "batch_size": batch_size,
                        "learning_rate": learning_rate, "seed": seed, "alpha": alpha, "temperature": temperature,
                        "undistilled_weight": undistilled_weight},
                "epoch": 0, "step": 0, "running": 0.0, "history": [], "best": {"macro_f1": -1.0}}
    if resume and os.path.exists(resume):
        progress = _restore(resume, progress["run"], model, optimiser, scheduler)
        rng.setstate(progress["rng"])
        log.info("%s: resuming at epoch %d, batch %d, from %s", name, progress["epoch"] + 1,
                 progress.get("step", 0), resume)
    history, best = progress["history"], progress["best"]
    for epoch in range(progress["epoch"] + 1, epochs + 1):
        progress.update(rng=rng.getstate())  # what this epoch's batches are drawn from
        order = batches(train_set, batch_size, rng)
        skip = progress.get("step", 0) if epoch == progress["epoch"] + 1 else 0
        running = progress.get("running", 0.0) if skip else 0.0
        model.train()
        bar = progress_bar(total=len(order), desc=f"{name} epoch {epoch}/{epochs}", unit="batch", mininterval=30,
                           initial=skip)
        for step, index in enumerate(order[skip:], start=skip + 1):
            ids, types, mask, labels, soft = collate(train_set, index, device)
            with autocast(device):
                logits = model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.float()
            loss = example_losses(logits, labels, soft, weights, alpha, temperature, undistilled_weight).mean()
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            running += loss.item()
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running / step:.3f}")
            if step % save_every == 0 and step < len(order):
                log.info("%s epoch %d/%d: batch %d of %d, loss %.3f", name, epoch, epochs, step, len(order),
                         running / step)  # a log file's progress: the bar shows on a terminal only
                if resume:
                    _save_progress(resume, {**progress, "step": step, "running": running}, model, optimiser,
                                   scheduler)
        bar.close()
        score = macro_f1(logits_of(model, val_set, device), val_labels)
        history.append({"epoch": epoch, "train_loss": round(running / len(order), 4), "validation_macro_f1": score})
        log.info("%s epoch %d: validation macro-F1 %.4f", name, epoch, score)
        if score > best["macro_f1"]:
            best = {"macro_f1": score, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        progress.update(epoch=epoch, step=0, running=0.0, history=history, best=best, rng=rng.getstate())
        if resume:
            _save_progress(resume, progress, model, optimiser, scheduler)
    model.load_state_dict(best["state"])
    if resume and os.path.exists(resume):
        os.remove(resume)
    return {"history": history, "best_epoch": best["epoch"], "class_weights": [round(float(w), 4) for w in weights]}


def _save_progress(path, progress: dict, model, optimiser, scheduler):
    """``progress``: the run's settings, the epochs done (``epoch``), the batches done of the next one
    (``step``) and their summed loss, the random state its batches are drawn from (``rng``), history, best."""
    # Written aside, then renamed: a run cut off while saving leaves the previous file whole.
    torch.save({**progress, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, path + ".part")
    os.replace(path + ".part", path)


def _restore(path, run, model, optimiser, scheduler) -> dict:
    saved = torch.load(path, weights_only=False)
    if saved["run"] != run:
        raise ValueError(f"{path} was saved by a run with other settings ({saved['run']}, not {run}): "
                         "remove it to start again")
    model.load_state_dict(saved.pop("model"))
    optimiser.load_state_dict(saved.pop("optimiser"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    torch.set_rng_state(saved.pop("torch_rng"))
    return saved
