"""Which ftune switch closes the GPU gap to TRL (1B Llama, LoRA): one run each, learned tokens/s and peak memory."""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_throughput as g  # noqa: E402
import train_throughput as tt  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tt.BATCH, tt.ACCUM, tt.STEPS = 4, 2, 8
folder = Path(tempfile.mkdtemp())
model = g.build_model(folder, tok, g.LLAMA_1B)
data = g.build_data(folder, tok, 64, 2048)
_, counts = tt.tokenize(data, folder, str(model), 2048)
VARIANTS = [("defaults", {}), ("gradient_checkpointing", {"gradient_checkpointing": True}),
            ("packing false", {"packing": False}), ("micro_batch_tokens 2048", {"micro_batch_tokens": 2048}),
            ("packing false + gc", {"packing": False, "gradient_checkpointing": True})]  # fmt: skip
for label, sets in VARIANTS:
    try:
        r = tt.ftune_run(tt.recipe(folder, data, "v", {"method": "lora", "max_length": 2048, **sets}, base=str(model)))
        print(f"| {label} | {counts['learned'] / r['seconds']:,.0f} | {r['gpu_mib']:,} | {r['final_loss']:.4f} |",
              flush=True)  # fmt: skip
    except SystemExit as exc:
        print(f"| {label} | failed {str(exc)[-400:]} |", flush=True)
