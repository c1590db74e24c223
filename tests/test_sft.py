"""LoRA SFT of multimodal generators: token-level loss masks, LoRA-only updates, vLLM-safe adapters, resume."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from tiny_vlms import make_tiny_vlm

from medcap.config import DataConfig, GenerationConfig, GeneratorConfig, LoraConfig, TrainConfig
from medcap.data import load_split
from medcap.generators.sft_data import IGNORE, PromptDriftError, SFTCollator
from medcap.generators.sft_eval import forward_losses
from medcap.generators.train import _load, check_adapter_config, train_generator, verify_adapter
from medcap.models.families import Family, get_family
from medcap.models.training import label_tokens, train_step
from medcap.records import Neighbour, NeighbourList

FAMILIES = ["llava", "qwen2_5_vl", "medgemma", "smolvlm"]
END_OF_TURN = {
    "llava": "</s>",
    "qwen2_5_vl": "<|im_end|>",
    "medgemma": "<end_of_turn>",
    "smolvlm": "<end_of_utterance>",
}


@pytest.fixture(scope="module")
def splits(phantom_dir):
    data = DataConfig(root=str(phantom_dir))
    return load_split(data, "train").examples, load_split(data, "valid").examples


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_models")
    return {f: make_tiny_vlm(f, root / f) for f in FAMILIES}


def gen_cfg(family, model_dir, **train):
    steps = dict(max_steps=4, batch_size=2, grad_accum=2, eval_every=2, save_every=2, eval_samples=2, lr=5e-3)
    return GeneratorConfig(
        name="sft",
        kind=family,
        model=str(model_dir),
        mode="sft",
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        train=TrainConfig(**(steps | train)),
        generation=GenerationConfig(max_new_tokens=3),
    )


def pairs_of(examples, n, neighbours=False):
    out = []
    for i, ex in enumerate(examples[:n]):
        others = [o for o in examples if o.id != ex.id][i : i + 2]
        nl = NeighbourList(ex.id, tuple(Neighbour(o.id, 0.9, o.caption) for o in others)) if neighbours else None
        out.append((ex, nl))
    return out


def collator_for(family, model_dir, train_examples, **cfg_changes):
    fam = get_family(family)
    model, proc = fam.load(str(model_dir))
    cfg = replace(gen_cfg(family, model_dir), **cfg_changes)
    index = {ex.id: ex for ex in train_examples}
    eos = model.generation_config.eos_token_id
    return SFTCollator(cfg, fam, proc, max_length=512, index_examples=index, eos_ids=[eos]), proc


# --------------------------------------------------------------------------- loss masks


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_mask_prompt_and_padding_token_by_token(family, tiny_dirs, splits):
    train, _ = splits
    modes = [{}, {"mode": "few-shot", "shot_images": True}]
    for changes in modes:
        collator, proc = collator_for(family, tiny_dirs[family], train, **changes)
        pairs = pairs_of(train, 3, neighbours=True)
        batch = collator(pairs)
        ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == labels.shape
        for i, (ex, _) in enumerate(pairs):
            # the prompt alone, tokenised as inference does: every one of its tokens is masked
            request = collator.requests([pairs[i]])[0]
            prompt = get_family(family).render(proc, request.messages, add_generation_prompt=True)
            n_prompt = len(get_family(family).encode(proc, [prompt], [list(request.images)])["input_ids"][0])
            n = int(attn[i].sum())
            assert attn[i, :n].all() and not attn[i, n:].any()  # right padding
            assert (labels[i, :n_prompt] == IGNORE).all()
            assert (labels[i, n:] == IGNORE).all()  # padding
            kept = (labels[i] != IGNORE).nonzero().flatten().tolist()
            assert kept == list(range(n_prompt, kept[-1] + 1))  # one run, right after the prompt
            assert n - (kept[-1] + 1) <= 1  # after the end-of-turn token at most the template's newline
            learned = labels[i, kept]
            assert torch.equal(learned, ids[i, kept])
            text = proc.tokenizer.decode(learned)
            assert text.strip() == ex.caption + END_OF_TURN[family]


def test_truncation_cuts_the_caption_and_counts(tiny_dirs, splits):
    train, _ = splits
    collator, _ = collator_for("qwen2_5_vl", tiny_dirs["qwen2_5_vl"], train)
    pairs = pairs_of(train, 2)
    full = collator(pairs)
    n_prompt = next(j for j, t in enumerate(full["labels"][0].tolist()) if t != IGNORE)
    collator.max_length = n_prompt + 3
    cut = collator(pairs)
    assert cut["input_ids"].shape[1] == n_prompt + 3 and cut["attention_mask"].shape[1] == n_prompt + 3
    assert int((cut["labels"][0] != IGNORE).sum()) == 3
    assert collator.truncated == 2
    collator.max_length = n_prompt - 1
    with pytest.raises(ValueError, match="prompt alone"):
        collator(pairs)


def test_prompt_drift_is_refused(tiny_dirs, splits):
    class Drifting(Family):
        def render(self, processor, messages, *, add_generation_prompt):
            text = super().render(processor, messages, add_generation_prompt=add_generation_prompt)
            return text if add_generation_prompt else text.replace("USER:", "USER: Hi.")

    train, _ = splits
    collator, _ = collator_for("llava", tiny_dirs["llava"], train)
    collator.family = Drifting(**{f: getattr(get_family("llava"), f) for f in Family.__dataclass_fields__})
    with pytest.raises(PromptDriftError, match="not a prefix"):
        collator(pairs_of(train, 1))


# --------------------------------------------------------------------------- LoRA


def test_two_steps_change_only_lora_weights(tiny_dirs, splits):
    train, _ = splits
    cfg = gen_cfg("llava", tiny_dirs["llava"])
    family = get_family("llava")
    model, proc = _load(cfg, family, "cpu", bf16=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".language_model." in n for n in trainable)
    collator = SFTCollator(cfg, family, proc, max_length=512)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    window = [collator(pairs_of(train[2 * s :], 2)) for s in range(2)]  # two accumulated micro-batches
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lambda b: forward_losses(model, b, "cpu", False, 0.0).sum()  # noqa: E731
    losses = [train_step(window, loss, lambda b: label_tokens(b["labels"]), params, opt, sched) for _ in range(2)]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero, so the adapter now does something


def test_adapter_config_refuses_what_vllm_rejects():
    family = get_family("qwen2_5_vl")
    check_adapter_config(LoraConfig(), family)
    for targets in (["q_proj", "lm_head"], ["embed_tokens"], r".*(lm_head|q_proj)"):
        with pytest.raises(ValueError, match="vLLM"):
            check_adapter_config(LoraConfig(target_modules=targets), family)

    class WithSaved(LoraConfig):
        modules_to_save = ["lm_head"]

    with pytest.raises(ValueError, match="modules_to_save"):
        check_adapter_config(WithSaved(), family)


def test_train_resume_matches_uninterrupted_run_and_adapter_serves(tiny_dirs, splits, tmp_path):
    train, valid = splits
    # keep_checkpoints: a finished training otherwise removes them; they are compared below
    cfg = gen_cfg("smolvlm", tiny_dirs["smolvlm"], grad_accum=1, eval_samples=1, keep_checkpoints=True)
    train_pairs, valid_pairs = pairs_of(train, 6), pairs_of(valid, 1)
    whole = train_generator(cfg, train_pairs, valid_pairs, tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_at_2(step):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        train_generator(cfg, train_pairs, valid_pairs, tmp_path / "resumed", on_step=crash_at_2)
    assert (tmp_path / "resumed/checkpoints/step-0000002/state.pt").is_file()
    assert not (tmp_path / "resumed/adapter").exists()
    resumed = train_generator(cfg, train_pairs, valid_pairs, tmp_path / "resumed")

    def weights(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def checkpoint(folder):
        return torch.load(folder / "state.pt", weights_only=False)["trainable"]

    a, b = (
        checkpoint(tmp_path / "whole/checkpoints/step-0000004"),
        checkpoint(tmp_path / "resumed/checkpoints/step-0000004"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    first = checkpoint(tmp_path / "whole/checkpoints/step-0000002")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # steps 3-4 did train

    # a standard PEFT adapter with LoRA weights only, and a report beside it
    for folder in (whole, resumed):
        verify_adapter(folder)
        assert all(".lora_" in k for k in weights(folder))
        assert json.loads((folder / "adapter_config.json").read_text()).get("modules_to_save") is None
    report = json.loads((whole / "medcap_train.json").read_text())
    assert (
        report["steps"] == 4 and report["history"] == json.loads((resumed / "medcap_train.json").read_text())["history"]
    )
    evals = [row for row in report["history"] if "val_loss" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert all(math.isfinite(r["val_loss"]) and 0.0 <= r["val_rouge1"] <= 1.0 for r in evals)
    assert report["best_val_loss"] == min(r["val_loss"] for r in evals)

    # the adapter loads with peft onto the base model and generates
    from peft import PeftModel

    model, proc = get_family("smolvlm").load(str(tiny_dirs["smolvlm"]))
    peft_model = PeftModel.from_pretrained(model, str(whole))
    fam = get_family("smolvlm")
    collator = SFTCollator(cfg, fam, proc, max_length=512)
    request = collator.requests(valid_pairs[:1])[0]
    enc = fam.encode(proc, [fam.render(proc, request.messages, add_generation_prompt=True)], [list(request.images)])
    out = peft_model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
