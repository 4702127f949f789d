"""One process of the loss benchmark (bench/run.py part k): a LoRA training step of a Llama-shaped model with
Llama 3's vocabulary, its loss computed by transformers (``ForCausalLMLoss``) or by dist_lora in chunks of tokens.

argv[1] is JSON: {"loss": "hf"|"chunked", "dtype": "float32"|"bfloat16", "tokens", "vocab", "hidden", "layers",
"chunk", "result": file}. After one step to warm up, the kernel's high-water mark is reset (``/proc/self/clear_refs``)
and a second step is measured: the peak resident memory over the resident memory at its start (what the step
itself allocates: activations, logits, the loss's temporaries, gradients), its seconds, and its loss.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    spec = json.loads(sys.argv[1])
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_lora.config import LoraConfig
    from dist_lora.lora import apply_lora
    from dist_lora.loss import chunk_the_loss

    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["hidden"] * 2,
        num_hidden_layers=spec["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=spec["tokens"],
    )
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.config.use_cache = False
    if spec["loss"] == "chunked":
        assert chunk_the_loss(base, spec["chunk"])
    model = apply_lora(base, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, spec["vocab"], (1, spec["tokens"]))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = status("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    logits_bytes = spec["tokens"] * spec["vocab"] * torch.tensor([], dtype=dtype).element_size()
    result = {**spec, "peak_over_start": status("VmHWM") - start, "seconds": seconds, "loss_value": loss}
    result["logits_bytes"] = logits_bytes
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
