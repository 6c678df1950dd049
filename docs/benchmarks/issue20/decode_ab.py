"""In-process A/B of decode at one prompt length: prefill once, then alternate the split-K kernel on and off over the
same cache (decoded tokens truncated back after each run)."""
import json, sys, time, torch, longreach
from longreach.kernels import decode
from longreach.compat import cache_kwargs, output_cache
from longreach.cache.growing import growing_cache
from longreach.provenance import provenance
torch.set_num_threads(2)
T, steps, reps = int(sys.argv[1]), 32, 4
spec = sys.argv[2] if len(sys.argv) > 2 else "dense"
model, tok = longreach.load_model(sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m")
ids = torch.randint(100, 20000, (1, T), generator=torch.Generator().manual_seed(0))
rows = {"kernel": [], "sdpa": []}
with longreach.apply(model, spec), torch.no_grad():
    past = growing_cache(model.config)
    out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, past), logits_to_keep=1)
    past = output_cache(out); first = out.logits[:, -1:].argmax(-1)
    # layers that cannot give tokens back (a model's sliding-window layers) are restored from a copy
    import copy
    saved = {i: copy.deepcopy(layer) for i, layer in enumerate(past.layers) if not hasattr(layer, "truncate")}
    for rep in range(reps):
        for mode in ("kernel", "sdpa") if rep % 2 == 0 else ("sdpa", "kernel"):
            decode.faster = (lambda *s: True) if mode == "kernel" else (lambda *s: False)
            token, mask, toks = first, torch.ones(1, T, dtype=torch.long), []
            start = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
                s = model(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(model, past))
                past, token = output_cache(s), s.logits[:, -1:].argmax(-1)
                toks.append(int(token))
            rows[mode].append({"tok_s": steps / (time.perf_counter() - start), "tokens": toks})
            for i, layer in enumerate(past.layers):
                if i in saved:
                    past.layers[i] = copy.deepcopy(saved[i])
                else:
                    layer.truncate(steps)
summary = {m: sorted(r["tok_s"] for r in rs) for m, rs in rows.items()}
same = all(a["tokens"] == rows["kernel"][0]["tokens"] for a in rows["kernel"] + rows["sdpa"])
print(json.dumps({"T": T, "spec": spec, "model": sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m", "steps": steps, "tok_s": summary, "same_tokens": same, "provenance": provenance()}, indent=1))
