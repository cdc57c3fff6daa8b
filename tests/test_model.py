"""The HealthGPT model on the tiny preset: vocabulary, templates, routing, trainable groups,
forward/generate consistency, and checkpoints (ours, PEFT layout, released key names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from healthgpt.model.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    encode_conversation,
    encode_prompt,
    vocab_ids,
)
from healthgpt.model.core import GROUP_NAMES, HealthGPT, parse_image_tokens
from healthgpt.model.presets import MissingWeightsError, build_model, tiny_tokenizer
from healthgpt.model.released import ReleasedWeightsError, load_released
from healthgpt.model.weights import CheckpointError, load_trainable, save_trainable
from healthgpt.sharing.peft import export_peft_adapter, import_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_plugins(model: HealthGPT, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("comprehension_plugin", "generation_plugin", "abstract_adapter", "concrete_adapter"):
            for p in model.parameter_groups()[name]:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def tiny() -> HealthGPT:
    model, _ = build_model("tiny", seed=3)
    return model


def _image(seed: int = 0, shape=(40, 30, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------- vocabulary


def test_vocab_extension_keeps_old_ids_and_mean_init() -> None:
    fresh = tiny_tokenizer()
    model, tok = build_model("tiny", seed=0)
    text = "<|im_start|>user\nIs there a fracture? é ü<|im_end|>"
    assert tok(text)["input_ids"] == fresh(text)["input_ids"]
    v = vocab_ids(tok)
    assert v.first_new == len(fresh) and len(tok) == len(fresh) + 8195
    assert tok.convert_tokens_to_ids(["<start_index>", "<idx_0>", "<idx_8191>", "<end_index>", "<pixel_newline>"]) \
        == [v.first_new, v.first_new + 1, v.first_new + 8192, v.first_new + 8193, v.first_new + 8194]
    # old rows are the base model's (same seed), new rows are their mean
    from healthgpt.model.presets import _tiny_llm

    base = _tiny_llm(len(fresh), "llama", 64, 2, 0)
    assert torch.equal(model.embed.old, base.get_input_embeddings().weight)
    assert torch.equal(model.lm_head.old, base.get_output_embeddings().weight)
    assert model.embed.new.shape == (8195, 64)
    torch.testing.assert_close(model.embed.new, base.get_input_embeddings().weight.mean(0).expand(8195, -1))
    torch.testing.assert_close(model.lm_head.new, base.get_output_embeddings().weight.mean(0).expand(8195, -1))
    # with all plugins fresh (B = 0) the model equals the base model on text
    ids = torch.tensor([fresh(text)["input_ids"]])
    with torch.no_grad():
        ours = model(ids, torch.ones_like(ids)).logits
        theirs = base(input_ids=ids).logits
    torch.testing.assert_close(ours[..., : v.first_new], theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("phi3", "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nQ?<|end|>"
                 "\n<|assistant|>\nA.<|end|>"),
        ("phi4", "<|im_start|>system<|im_sep|>\nYou are a medieval knight and must provide explanations to "
                 "modern people.<|im_end|>\n<|im_start|>user<|im_sep|>\n<image>\nQ?<|im_end|>"
                 "\n<|im_start|>assistant<|im_sep|>\nA.<|im_end|>"),
        ("qwen2", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                  "<|im_end|>\n<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"),
    ],
)
def test_released_templates(tiny: HealthGPT, template: str, expected: str) -> None:
    tok = tiny.tokenizer
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    enc = encode_conversation(tok, conv, template=template, image_tokens=16)
    ids = enc["input_ids"].tolist()
    assert ids.count(IMAGE_TOKEN_ID) == 1
    text = "".join("<image>" if i == IMAGE_TOKEN_ID else tok.decode([i]) for i in ids)
    assert text == expected
    labelled = tok.decode([i for i in enc["labels"].tolist() if i != IGNORE_INDEX])
    stop = {"phi3": "<|end|>", "phi4": "<|im_end|>", "qwen2": "<|im_end|>"}[template]
    assert labelled == "A." + stop
    # labels equal input ids where set, and cover a contiguous tail here
    lab = enc["labels"]
    mask = lab != IGNORE_INDEX
    assert torch.equal(lab[mask], enc["input_ids"][mask])
    # the prompt is the conversation up to the assistant role
    prompt = encode_prompt(tok, "Q?", template=template)
    assert ids[: len(prompt)] == prompt


def test_multi_turn_labels_and_generation_target(tiny: HealthGPT) -> None:
    tok, v = tiny.tokenizer, tiny.vocab
    conv = [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "One."},
            {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "Two."}]
    enc = encode_conversation(tok, conv, template="chatml")
    labelled = tok.decode([i for i in enc["labels"].tolist() if i != IGNORE_INDEX])
    assert labelled == "One.<|im_end|>Two.<|im_end|>"

    codes = np.arange(1024, dtype=np.int16) * 7 % 8192
    gen = [{"from": "human", "value": "<image>\nConvert this CT to MRI."}, {"from": "gpt", "value": "<target_image>"}]
    enc = encode_conversation(tok, gen, template="chatml", vq_indices=codes)
    ids, lab = enc["input_ids"].tolist(), enc["labels"].tolist()
    s = ids.index(v.start_index)
    assert ids[s + 1: s + 1025] == [v.idx_0 + int(c) for c in codes]
    assert ids[s + 1025] == v.end_index
    assert lab[s: s + 1026] == ids[s: s + 1026]
    assert all(x == IGNORE_INDEX for x in lab[:s])
    assert tok.decode(ids[s + 1026:]) == "<|im_end|>\n" and lab[s + 1026] != IGNORE_INDEX
    with_nl = encode_conversation(tok, gen, template="chatml", vq_indices=codes, pixel_newline=True)
    assert len(with_nl["input_ids"]) == len(ids) + 32
    assert with_nl["input_ids"].tolist().count(v.pixel_newline) == 32
    # truncation counts the image as image_tokens positions
    short = encode_conversation(tok, gen, template="chatml", vq_indices=codes, max_len=700, image_tokens=576)
    assert short["truncated"] and len(short["input_ids"]) == 700 - 575
    with pytest.raises(ValueError, match="vq_indices"):
        encode_conversation(tok, gen, template="chatml")
    with pytest.raises(ValueError, match="range"):
        encode_conversation(tok, gen, template="chatml", vq_indices=np.full(1024, 9000))
    with pytest.raises(KeyError, match="template"):
        encode_conversation(tok, conv, template="vicuna")


# ---------------------------------------------------------------------------- routing


def test_visual_features_are_clip_hidden_states(tiny: HealthGPT) -> None:
    pv = tiny.vision.preprocess([_image(1), _image(2, (30, 50, 3))])
    assert pv.shape == (2, 3, 32, 32)
    with torch.no_grad():
        hs = tiny.vision.tower(pixel_values=pv, output_hidden_states=True).hidden_states
        torch.testing.assert_close(tiny.vision.patch_features(pv, "comprehension"), hs[-2][:, 1:])
        torch.testing.assert_close(tiny.vision.patch_features(pv, "generation"), hs[1][:, 1:])
    assert tiny.vision.num_patches == 16


def test_switching_task_switches_plugin_and_features() -> None:
    model, tok = build_model("tiny", seed=5)
    _perturb_plugins(model)
    calls: dict[str, int] = {}

    def counter(name: str):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    model.vision.abstract_adapter.register_forward_hook(counter("abstract"))
    model.vision.concrete_adapter.register_forward_hook(counter("concrete"))
    for i, layer in enumerate(model.vision.tower.encoder.layers):
        layer.register_forward_hook(counter(f"clip{i}"))
    layer0 = next(m for n, m in model.llm.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    layer0.plugins["comprehension"].register_forward_hook(counter("comp_plugin"))
    layer0.plugins["generation"].register_forward_hook(counter("gen_plugin"))

    ids = torch.tensor([encode_prompt(tok, "What?", template="chatml")])
    pv = model.vision.preprocess([_image()])
    with torch.no_grad():
        comp = model(ids, pixel_values=pv, task="comprehension").logits
    assert calls == {"abstract": 1, "comp_plugin": 1, "clip0": 1, "clip1": 1}  # tower runs to layer -2 only
    calls.clear()
    with torch.no_grad():
        gen = model(ids, pixel_values=pv, task="generation").logits
    assert calls == {"concrete": 1, "gen_plugin": 1, "clip0": 1}
    assert model.active_task == "generation"
    assert not torch.allclose(comp, gen)
    model.set_task(None)  # adapters off -> neither plugin runs
    calls.clear()
    with torch.no_grad():
        model.llm.model(inputs_embeds=model.embed(ids.clamp(min=0)))
    assert "comp_plugin" not in calls and "gen_plugin" not in calls


# ---------------------------------------------------------------------------- trainable groups


STAGES = {
    "stage1_comprehension": ("abstract_adapter",),
    "stage1_generation": ("concrete_adapter", "generation_plugin", "new_token_rows"),
    "stage2": ("word_embeddings", "lm_head", "new_token_rows"),
    "stage3": ("abstract_adapter", "concrete_adapter", "comprehension_plugin", "generation_plugin"),
}


def test_parameter_groups_cover_the_model(tiny: HealthGPT) -> None:
    groups = tiny.parameter_groups()
    assert set(GROUP_NAMES) <= set(groups)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))  # disjoint (the tiny LLM is untied)
    assert set(ids) == {id(p) for p in tiny.parameters()}
    assert [tuple(p.shape) for p in groups["new_token_rows"]] == [(8195, 64), (8195, 64)]
    assert groups["word_embeddings"][0].shape == (259, 64)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_only_intended_parameters_require_and_get_grad(stage: str) -> None:
    model, tok = build_model("tiny", seed=1)
    _perturb_plugins(model)  # so that gradients reach A and the router
    names = STAGES[stage]
    params = model.set_trainable(*names)
    groups = model.parameter_groups()
    want = {id(p) for n in names for p in groups[n]}
    assert {id(p) for p in params} == want
    assert {id(p) for p in model.parameters() if p.requires_grad} == want
    task = "generation" if "generation" in stage else "comprehension"
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "<target_image>" if
                                                                    task == "generation" else "Lung."}]
    enc = encode_conversation(tok, conv, template="chatml",
                              vq_indices=np.zeros(1024, np.int16) if task == "generation" else None)
    batch = model.collate([enc])
    out = model(**batch, pixel_values=model.vision.preprocess([_image()]), task=task)
    out.loss.backward()
    # hard routing: the other task's adapter and plugin never run, so they get no gradient either;
    # the new input rows are only used when new ids are in the input (generation targets)
    idle = (["concrete_adapter", "generation_plugin"] if task == "comprehension"
            else ["abstract_adapter", "comprehension_plugin"])
    unused = {id(p) for n in idle for p in groups[n]}
    if task == "comprehension":
        unused.add(id(model.embed.new))
    assert want - unused
    for p in model.parameters():
        if id(p) in want - unused:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0)
        else:
            assert p.grad is None
    with pytest.raises(KeyError):
        model.set_trainable("everything")


# ---------------------------------------------------------------------------- forward / generate


def test_loss_matches_manual_and_padding_is_invariant() -> None:
    model, tok = build_model("tiny", seed=2)
    _perturb_plugins(model)
    convs = [[{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "The liver."}],
             [{"from": "human", "value": "<image>\nIs it normal? Answer yes or no."}, {"from": "gpt", "value": "No."}]]
    encs = [encode_conversation(tok, c, template="chatml") for c in convs]
    pv = model.vision.preprocess([_image(1), _image(2)])
    with torch.no_grad():
        out = model(**model.collate(encs), pixel_values=pv)
        logits, labels = out.logits, out.labels
        manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(out.loss, manual)
        lean = model(**model.collate(encs), pixel_values=pv, return_logits=False)
        assert lean.logits is None
        torch.testing.assert_close(lean.loss, out.loss)
        # each sample alone gives the same logits as inside the padded batch
        for i, enc in enumerate(encs):
            single = model(**model.collate([enc]), pixel_values=pv[i:i + 1]).logits[0]
            n = single.shape[0]
            torch.testing.assert_close(logits[i, :n], single, rtol=1e-4, atol=1e-4)


def test_loss_over_a_smaller_codebook_is_the_masked_softmax() -> None:
    """``n_codes``: the same loss as full logits with the dead code rows masked out, without computing them."""
    model, tok = build_model("tiny", seed=3)
    _perturb_plugins(model)
    with torch.no_grad():  # distinct new rows, so that a wrong row mapping changes the loss
        model.lm_head.new.normal_(0.0, 0.5)
    n = 16
    codes = np.arange(1024) % n
    conv = [{"from": "human", "value": "<image>\nConvert this CT slice to MRI."}, {"from": "gpt", "value": "<target_image>"}]
    batch = model.collate([encode_conversation(tok, conv, template="chatml", vq_indices=codes)])
    pv = model.vision.preprocess([_image(1)])
    v = model.vocab
    with torch.no_grad():
        full = model(**batch, pixel_values=pv, task="generation")
        masked = full.logits.clone()
        masked[..., v.idx_0 + n:v.end_index] = float("-inf")
        manual = torch.nn.functional.cross_entropy(masked[:, :-1].reshape(-1, masked.shape[-1]),
                                                   full.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        live = model(**batch, pixel_values=pv, task="generation", return_logits=False, n_codes=n)
        torch.testing.assert_close(live.loss, manual)
        assert float(live.loss) < float(full.loss)  # the dead rows no longer take probability mass
        # with the full logits returned: the same loss, the dead rows at -inf, the live ones untouched
        kept = model(**batch, pixel_values=pv, task="generation", n_codes=n)
        torch.testing.assert_close(kept.loss, manual)
        assert torch.isinf(kept.logits[..., v.idx_0 + n:v.end_index]).all()
        torch.testing.assert_close(kept.logits[..., :v.idx_0 + n], full.logits[..., :v.idx_0 + n])
        # 8192 codes (or none given): the plain loss
        torch.testing.assert_close(model(**batch, pixel_values=pv, task="generation", return_logits=False,
                                         n_codes=8192).loss, full.loss)
        with pytest.raises(ValueError, match=r"code \(16\) is beyond the 8-code codebook"):
            model(**model.collate([encode_conversation(tok, conv, template="chatml", vq_indices=np.full(1024, 16))]),
                  pixel_values=pv, task="generation", return_logits=False, n_codes=8)


def test_generate_with_cache_equals_full_recompute() -> None:
    model, tok = build_model("tiny", seed=4)
    _perturb_plugins(model, scale=0.2)
    prompts = [encode_prompt(tok, "Short?", template="chatml"),
               encode_prompt(tok, "A much longer question about the image?", template="chatml")]
    pv = model.vision.preprocess([_image(3), _image(4)])
    batch = model.collate([{"input_ids": torch.tensor(p)} for p in prompts])
    out = model.generate(batch["input_ids"], batch["attention_mask"], pixel_values=pv, max_new_tokens=8,
                         stop_token_ids=[])
    assert out.shape == (2, 8)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        for _ in range(8):
            with torch.no_grad():
                nxt = model(ids, pixel_values=pv[i:i + 1]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert ids[0, len(p):].tolist() == out[i].tolist()
    # text-only prompts, right-padded by collate, are re-packed too
    text_prompts = [encode_prompt(tok, q, template="chatml", image=False) for q in ("Hi?", "Hello there, doctor?")]
    batch = model.collate([{"input_ids": torch.tensor(p)} for p in text_prompts])
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=4, stop_token_ids=[])
    for i, p in enumerate(text_prompts):
        single = model.generate(torch.tensor([p]), max_new_tokens=4, stop_token_ids=[])
        assert single[0].tolist() == out[i].tolist()


def test_generate_image_tokens_constrained_is_well_formed() -> None:
    model, tok = build_model("tiny", seed=0)
    ids = torch.tensor([encode_prompt(tok, "Convert this CT to MRI.", template="chatml", task="generation")])
    assert ids[0, -1].item() == model.vocab.start_index
    codes, reports = model.generate_image_tokens(ids, pixel_values=model.vision.preprocess([_image()]),
                                                 constrained=True)
    assert codes.shape == (1, 1024) and codes.min() >= 0 and codes.max() < 8192
    assert reports[0].ok, reports[0].notes


def test_parse_image_tokens_repairs_and_reports(tiny: HealthGPT) -> None:
    v = tiny.vocab
    good = [v.idx(i % 8192) for i in range(1024)] + [v.end_index]
    codes, rep = parse_image_tokens(good, v)
    assert rep.ok and codes.tolist() == list(range(1024))
    codes, rep = parse_image_tokens([v.idx(5)] * 10, v)  # short, no end
    assert codes.shape == (1024,) and rep.padded == 1014 and not rep.had_end and (codes == 5).all()
    codes, rep = parse_image_tokens([v.idx(1)] * 1100 + [v.end_index], v)
    assert codes.shape == (1024,) and rep.truncated == 76 and rep.had_end
    codes, rep = parse_image_tokens([65, v.start_index, v.idx(3), v.pixel_newline, 66, v.end_index, v.idx(9)], v)
    assert rep.n_other_tokens == 2 and rep.n_index_tokens == 1 and codes[0] == 3 and (codes == 3).all()
    codes, rep = parse_image_tokens([], v)
    assert codes.shape == (1024,) and (codes == 0).all() and not rep.ok


# ---------------------------------------------------------------------------- checkpoints


def test_save_load_trainable_round_trip(tmp_path) -> None:
    a, tok = build_model("tiny", seed=10)
    _perturb_plugins(a)
    with torch.no_grad():
        a.embed.new.add_(1.0)
    keys = save_trainable(a, tmp_path / "ckpt.safetensors")
    assert "llm.model.embed_tokens.new" in keys and not any(k.endswith(".old") for k in keys)
    b, _ = build_model("tiny", seed=10)
    loaded = load_trainable(b, tmp_path / "ckpt.safetensors")
    assert loaded == keys
    ids = torch.tensor([encode_prompt(tok, "Q?", template="chatml", image=False) + [b.vocab.idx(7)]])
    with torch.no_grad():
        for task in ("comprehension", "generation"):
            torch.testing.assert_close(a(ids, task=task).logits, b(ids, task=task).logits)
    c, _ = build_model("tiny", seed=10, comp_r=4)
    with pytest.raises(CheckpointError, match="adapter configuration"):
        load_trainable(c, tmp_path / "ckpt.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_trainable(b, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("variant", ["hlora", "moelora"])
def test_peft_layout_export_round_trip(tmp_path, variant: str) -> None:
    a, tok = build_model("tiny", seed=11, variant=variant)
    _perturb_plugins(a)
    out = export_peft_adapter(a, "generation", tmp_path / "gen")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    from safetensors.torch import load_file

    keys = sorted(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_route.weight" in keys
    assert len(keys) == 2 * 7 * 3
    b, _ = build_model("tiny", seed=12, variant="hlora")  # other random init, merged variant
    import_peft_adapter(b, "generation", out)
    ids = torch.tensor([encode_prompt(tok, "Q?", template="chatml")])
    pv = a.vision.preprocess([_image()])
    with torch.no_grad():
        b.llm.load_state_dict({k: v for k, v in a.llm.state_dict().items() if "plugins" not in k}, strict=False)
        b.vision.tower.load_state_dict(a.vision.tower.state_dict())
        torch.testing.assert_close(a(ids, pixel_values=pv, task="generation").logits,
                                   b(ids, pixel_values=pv, task="generation").logits, rtol=1e-5, atol=1e-5)


def test_plain_lora_export_loads_in_peft(tmp_path) -> None:
    from peft import PeftModel

    from healthgpt.model.presets import _tiny_llm

    ours, tok = build_model("tiny", seed=13, variant="lora")
    _perturb_plugins(ours)
    export_peft_adapter(ours, "comprehension", tmp_path / "comp")
    base = _tiny_llm(len(tiny_tokenizer()), "llama", 64, 2, 13)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "comp"))
    ids = torch.tensor([tok("<|im_start|>user\nhello there<|im_end|>")["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = ours(ids, task="comprehension").logits[..., : want.shape[-1]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _released_state(model: HealthGPT, task_r: int, k: int, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict with the released HealthGPT key names (LLaVA-Phi3 under the peft fork) and small shapes."""
    cfg = model.llm.config
    d, inter, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = d // heads
    shapes = {"self_attn.qkv_proj": (d, (heads + 2 * kv) * head_dim), "self_attn.o_proj": (d, d),
              "mlp.gate_up_proj": (d, 2 * inter), "mlp.down_proj": (inter, d)}
    state: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        for path, (d_in, d_out) in shapes.items():
            pre = f"base_model.model.model.layers.{i}.{path}"
            state[f"{pre}.lora_A.weight"] = torch.randn(task_r, d_in, generator=rng)
            state[f"{pre}.lora_B.weight"] = torch.randn(d_out, task_r, generator=rng)
            state[f"{pre}.lora_route.weight"] = torch.randn(k, d_in, generator=rng)
    vis = model.vision.tower.config.hidden_size
    state["base_model.model.model.mm_projector.0.weight"] = torch.randn(d, vis, generator=rng)
    state["base_model.model.model.mm_projector.0.bias"] = torch.randn(d, generator=rng)
    state["base_model.model.model.mm_projector.2.weight"] = torch.randn(d, d, generator=rng)
    state["base_model.model.model.mm_projector.2.bias"] = torch.randn(d, generator=rng)
    return state


def test_released_key_names_load_and_every_key_is_used(tmp_path) -> None:
    model, _ = build_model("tiny", seed=0, arch="phi3")
    rng = torch.Generator().manual_seed(0)
    com = _released_state(model, 8, 4, rng)
    gen = _released_state(model, 16, 4, rng)
    total = model.vocab.total
    fusion = {"base_model.model.model.embed_tokens.weight": torch.randn(total, 64, generator=rng),
              "base_model.model.lm_head.weight": torch.randn(total, 64, generator=rng)}
    torch.save(com, tmp_path / "com_hlora_weights.bin")
    torch.save(gen, tmp_path / "gen_hlora_weights.bin")
    torch.save(fusion, tmp_path / "fusion_layer_weights.bin")
    from healthgpt.model.released import load_released_m3

    reports = load_released_m3(model, tmp_path)
    assert [len(r.used) for r in reports] == [len(com), len(gen), len(fusion)]
    assert sorted(reports[0].used) == sorted(com)
    layer = model.llm.get_submodule("model.layers.1.mlp.gate_up_proj")
    assert torch.equal(layer.plugins["comprehension"].lora_route.weight,
                       com["base_model.model.model.layers.1.mlp.gate_up_proj.lora_route.weight"])
    assert torch.equal(layer.plugins["generation"].lora_B.weight,
                       gen["base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"])
    assert torch.equal(model.vision.abstract_adapter[2].bias, com["base_model.model.model.mm_projector.2.bias"])
    assert torch.equal(model.vision.concrete_adapter[0].weight, gen["base_model.model.model.mm_projector.0.weight"])
    emb = fusion["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(model.embed.old, emb[: model.vocab.first_new])
    assert torch.equal(model.embed.new, emb[model.vocab.first_new:])
    assert torch.equal(model.lm_head.weight, fusion["base_model.model.lm_head.weight"])

    with pytest.raises(ReleasedWeightsError, match="map onto nothing"):
        load_released(model, {**com, "base_model.model.model.norm.weight": torch.ones(64)}, "comprehension")
    bad = dict(com)
    bad["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] = torch.zeros(9, 64)
    with pytest.raises(CheckpointError, match="shape"):
        load_released(model, bad, "comprehension")
    with pytest.raises(ReleasedWeightsError, match="lintw/HealthGPT-M3"):
        load_released_m3(model, tmp_path / "empty")


# ---------------------------------------------------------------------------- presets


def test_real_presets_need_local_paths(monkeypatch, tmp_path) -> None:
    for env in ("HEALTHGPT_PHI3_DIR", "HEALTHGPT_PHI4_DIR", "HEALTHGPT_QWEN25_32B_DIR", "HEALTHGPT_CLIP_DIR"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(MissingWeightsError, match="microsoft/Phi-3-mini-4k-instruct.*HEALTHGPT_PHI3_DIR"):
        build_model("m3")
    with pytest.raises(MissingWeightsError, match="microsoft/phi-4"):
        build_model("l14", llm_path=tmp_path)
    monkeypatch.setenv("HEALTHGPT_QWEN25_32B_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="config.json"):
        build_model("xl32")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")
    with pytest.raises(TypeError, match="unknown override"):
        build_model("tiny", rank=3)


def test_real_preset_loader_on_local_folders(tmp_path) -> None:
    """The m3 code path (from_pretrained on local folders) with a tiny Phi-3 and CLIP saved to disk."""
    from healthgpt.model.presets import _small_clip, _tiny_llm

    tok = tiny_tokenizer()
    llm = _tiny_llm(len(tok), "phi3", 64, 2, 0)
    llm.save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    tower, proc = _small_clip(32, 8, 0)
    tower.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    model, tok2 = build_model("m3", llm_path=tmp_path / "phi3", clip_path=tmp_path / "clip", dtype="float32",
                              comp_r=8, comp_alpha=16, gen_r=8, gen_alpha=16)
    assert model.template == "phi3" and model.vocab.first_new == len(tok)
    assert model.adapters["comprehension"].r == 8
    q = model.llm.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert set(q.plugins) == {"comprehension", "generation"}
    ids = torch.tensor([encode_prompt(tok2, "Q?", template="phi3")])
    with torch.no_grad():
        out = model(ids, pixel_values=model.vision.preprocess([_image()]))
    assert out.logits.shape[-1] == model.vocab.total


@pytest.mark.parametrize("stage", ["stage1_generation", "stage2", "stage3"])
def test_fp32_trainable_rows_in_a_bf16_model_without_autocast(stage: str) -> None:
    """The trainer keeps trainable tensors in fp32 (master weights) while a preset's frozen backbone
    may be bf16 (m3/l14/xl32 default). Without autocast (CPU, --precision fp32) the forward must still
    run: fp32 embedding rows must not leak fp32 activations into bf16 linears, nor the head mix dtypes."""
    model, tok = build_model("tiny", seed=6, dtype="bfloat16")
    params = model.set_trainable(*STAGES[stage])
    for p in params:
        p.data = p.data.float()
    task = "comprehension" if stage == "stage2" else "generation"
    conv = [{"from": "human", "value": "<image>\nConvert."},
            {"from": "gpt", "value": "<target_image>" if task == "generation" else "Lung."}]
    enc = encode_conversation(tok, conv, template="chatml", image_tokens=model.vision.num_patches,
                              vq_indices=np.zeros(1024, np.int16) if task == "generation" else None)
    pv = model.vision.preprocess([_image()])
    out = model(**model.collate([enc]), pixel_values=pv, task=task, return_logits=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None for p in params)
    ids = torch.tensor([encode_prompt(tok, "What?", template="chatml")])
    assert model.generate(ids, pixel_values=pv, task=task, max_new_tokens=2, stop_token_ids=[]).shape == (1, 2)


def test_llm_only_weights_load_into_any_plugin_configuration(tmp_path) -> None:
    # a text pre-training holds LLM weights only: its file records the default plugins, but the plugins
    # (and visual feature levels) of the model it is loaded into do not matter for it
    a, _ = build_model("tiny", seed=3)
    save_trainable(a, tmp_path / "text.safetensors", ["word_embeddings", "lm_head", "llm_base"])
    b, _ = build_model("tiny", variant="lora", comp_r=96, shared_plugin=True, comprehension_features="concrete")
    keys = load_trainable(b, tmp_path / "text.safetensors")
    assert keys and not any(".plugins." in k for k in keys)
    torch.testing.assert_close(b.embed.old, a.embed.old)
