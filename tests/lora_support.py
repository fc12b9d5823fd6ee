"""What a saved folder of a text encoder trained with LoRA (`model.lora`) must hold, however it was trained."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from embedtrain.models import load_text_encoder

TEXTS = ["the river runs fast through the city", "a computer program reads data", "green light on the hill"]


def check_folder(folder: Path, base_dir: Path, adapted: tuple[str, ...]) -> None:
    """The saved weights are the base's, changed exactly in the adapted layers; plain sentence-transformers and
    peft (base + adapter) give embedtrain's embeddings."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    base, saved = load_file(str(base_dir / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(base)  # merged: no lora_A / lora_B / base_layer keys
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    assert changed and all(k.endswith(tuple(f"{name}.weight" for name in adapted)) for k in changed), changed
    assert json.loads((folder / "embedtrain.json").read_text())["lora_adapter"] == "adapter"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    targets = ", ".join(f"`{name.rsplit('.', 1)[-1]}`" for name in sorted(n.rsplit(".", 1)[-1] for n in adapted))
    assert f"| LoRA | r 4, alpha 8 on {targets}: merged into the weights; the adapter alone is in `adapter/` (peft) |" \
        in (folder / "README.md").read_text()

    ours = load_text_encoder(str(folder)).encode(TEXTS)
    st = SentenceTransformer(str(folder), device="cpu")  # no trust_remote_code: sentence-transformers' own modules
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), ours, rtol=0, atol=1e-6)

    rebuilt = load_text_encoder(str(folder))
    original = load_text_encoder(str(base_dir)).backbone  # the untrained weights, and the adapter on top
    rebuilt.backbone = PeftModel.from_pretrained(original, str(folder / "adapter"))
    # W x + s B (A x) against (W + s B A) x in float32 on unit-scale activations: a few ulps of the hidden
    # width's sums, far below 1e-5
    torch.testing.assert_close(rebuilt.encode(TEXTS), ours, rtol=0, atol=1e-5)
