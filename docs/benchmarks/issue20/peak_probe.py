"""Peak RSS of one 16k prefill on a random model of SmolLM2's shape: python peak_probe.py SPEC LAYERS TOKENS [TRACK]."""
import sys, torch, json
import transformers as tf
import longreach
from longreach.plan import peak_resident_bytes, reset_peak_resident
from longreach.generation import generate
spec, layers, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
track = sys.argv[4] == "1" if len(sys.argv) > 4 else True
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32768, tie_word_embeddings=True)
model = tf.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 49152, (1, T))
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
with longreach.apply(model, spec, track_density=track):
    generate(model, {"input_ids": ids[:, :256], "attention_mask": torch.ones_like(ids[:, :256])}, 2)
    reset_peak_resident()
    base = peak_resident_bytes()
    run = generate(model, inputs, 2)
    print(json.dumps({"spec": spec, "track": track, "peak_mib": peak_resident_bytes() / 2**20, "start_mib": base / 2**20}))
